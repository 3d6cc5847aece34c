"""swap_batch_and_sequence: the transpose with the strides of a fresh tensor."""

import pytest
import torch

from megatron_vlm.models.layout import swap_batch_and_sequence


@pytest.mark.parametrize("shape", [(1, 5, 3), (5, 1, 3), (4, 5, 3), (1, 1, 2), (2, 3)])
def test_same_values_as_transpose_with_fresh_strides(shape):
    t = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
    out = swap_batch_and_sequence(t)
    assert torch.equal(out, t.transpose(0, 1))
    assert out.stride() == torch.empty(out.shape).stride()
    # What transpose().contiguous() gives for a batch of one: contiguous, but not these strides.
    if 1 in shape[:2] and shape[0] != shape[1]:
        assert t.transpose(0, 1).contiguous().stride() != out.stride()


def test_batch_of_one_feeds_matmul_as_one_matrix():
    """With the old strides a grad-free bf16 matmul against a 2-D weight copies the weight once
    per row (a batched matmul); with fresh strides it is one mm. Checked through the profiler's
    op names, not timings."""
    y = torch.randn(1, 64, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    from torch.profiler import profile

    def ops(x):
        with torch.no_grad(), profile() as prof:
            torch.matmul(x, w.t())
        return {e.key for e in prof.key_averages()}

    assert "aten::bmm" in ops(y.transpose(0, 1).contiguous())
    assert "aten::bmm" not in ops(swap_batch_and_sequence(y))
