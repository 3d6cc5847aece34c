"""Batch-first <-> sequence-first, the one transpose the models do between their own code
([b, s, ...]) and megatron's layers ([s, b, ...])."""

import torch


def swap_batch_and_sequence(t: torch.Tensor) -> torch.Tensor:
    """[a, b, ...] -> [b, a, ...], contiguous with the strides of a fresh tensor.

    ``t.transpose(0, 1).contiguous()`` returns the transposed view itself when a or b is 1 (the
    batch of one): its strides keep the old order, and ``torch.matmul`` then cannot fold the
    input into one matrix. Megatron's linear layers call it with grad mode off inside their
    autograd function, where that means a batched matmul against the weight copied once per
    token (measured: 90% of a bf16-autocast training step of the tiny model at 4K tokens).
    With a or b equal to 1 the element order is unchanged, so a reshape gives the same tensor.
    """
    if t.shape[0] == 1 or t.shape[1] == 1:
        return t.reshape(t.shape[1], t.shape[0], *t.shape[2:])
    return t.transpose(0, 1).contiguous()
