"""The plain-torch chunked SSD scan and causal conv against token-by-token references."""

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.models.mamba_ops import causal_conv1d_silu
from megatron_vlm.models.ssd_scan import (
    seq_idx_from_cu_seqlens,
    ssd_chunked_scan,
    ssd_reference_scan,
)

B, L, H, P, G, N = 2, 300, 4, 8, 2, 16
# Boundaries over the flattened 2 x 300 tokens: a length-1 sample, one ending exactly on a chunk
# edge (64), one crossing the row boundary (250..333 -> split at 300), and pack padding (>= 590).
CU = torch.tensor([0, 37, 38, 64, 250, 333, 420, 590])


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, P, generator=g)
    # Slow decay (|dt*A| ~ 0.01..0.1) so state carries across many chunks and resets matter.
    dt = F.softplus(torch.randn(B, L, H, generator=g) - 3.0)
    A = -(torch.rand(H, generator=g) * 0.5 + 0.05)
    Bm = torch.randn(B, L, G, N, generator=g)
    Cm = torch.randn(B, L, G, N, generator=g)
    D = torch.randn(H, generator=g)
    init = torch.randn(B, H, P, N, generator=g)
    return x, dt, A, Bm, Cm, D, init


def _rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def test_seq_idx_from_cu_seqlens():
    ids = seq_idx_from_cu_seqlens(torch.tensor([0, 2, 5]), batch=2, seqlen=4)
    # tokens 0-1 | 2-4 (crosses the row boundary at 4, so split there) | 5-7 padding
    row0, row1 = ids[0].tolist(), ids[1].tolist()
    assert row0[0] == row0[1] != row0[2] == row0[3]
    assert row1[0] != row0[3] and row1[1] != row1[0] and row1[1] == row1[2] == row1[3]


@pytest.mark.parametrize("chunk", [16, 37, 64, 128, 512])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("with_init", [False, True], ids=["zero_init", "init_state"])
def test_chunked_matches_recurrence(chunk, packed, with_init):
    x, dt, A, Bm, Cm, D, init = _inputs()
    seq_idx = seq_idx_from_cu_seqlens(CU, B, L) if packed else None
    init = init if with_init else None
    y, final = ssd_chunked_scan(x, dt, A, Bm, Cm, chunk, D=D, seq_idx=seq_idx,
                                initial_states=init, return_final_states=True)
    y_ref, final_ref = ssd_reference_scan(x, dt, A, Bm, Cm, D=D, seq_idx=seq_idx,
                                          initial_states=init)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert _rel(y, y_ref) <= 1e-5
    assert _rel(final, final_ref) <= 1e-5


def test_resets_change_the_output():
    """The packed test above is only meaningful if resets make a large difference."""
    x, dt, A, Bm, Cm, D, _ = _inputs()
    seq_idx = seq_idx_from_cu_seqlens(CU, B, L)
    plain = ssd_chunked_scan(x, dt, A, Bm, Cm, 64, D=D)
    packed = ssd_chunked_scan(x, dt, A, Bm, Cm, 64, D=D, seq_idx=seq_idx)
    assert (plain - packed).abs().max() > 0.1 * plain.abs().max()
    # ...while tokens of the first sample (before any boundary) are unaffected.
    torch.testing.assert_close(plain[0, :37], packed[0, :37])


def test_packed_equals_separate_sequences():
    x, dt, A, Bm, Cm, D, _ = _inputs()
    seq_idx = seq_idx_from_cu_seqlens(CU, 1, B * L)
    flat = lambda t: t.reshape(1, B * L, *t.shape[2:])  # noqa: E731
    packed = ssd_chunked_scan(flat(x), flat(dt), A, flat(Bm), flat(Cm), 64, D=D, seq_idx=seq_idx)
    bounds = CU.tolist() + [B * L]
    for s, e in zip(bounds[:-1], bounds[1:]):
        alone = ssd_chunked_scan(flat(x)[:, s:e], flat(dt)[:, s:e], A, flat(Bm)[:, s:e],
                                 flat(Cm)[:, s:e], 64, D=D)
        torch.testing.assert_close(packed[:, s:e], alone, rtol=1e-5, atol=1e-5)


def test_gradients_match_recurrence():
    x, dt, A, Bm, Cm, D, _ = _inputs(seed=1)
    seq_idx = seq_idx_from_cu_seqlens(CU, B, L)
    w = torch.randn(B, L, H, P, generator=torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_(True) for t in (x, dt, A, Bm, Cm, D)]
    (ssd_chunked_scan(*leaves[:5], 37, D=leaves[5], seq_idx=seq_idx) * w).sum().backward()
    ref_leaves = [t.double().clone().requires_grad_(True) for t in (x, dt, A, Bm, Cm, D)]
    y_ref, _ = ssd_reference_scan(*ref_leaves[:5], D=ref_leaves[5], seq_idx=seq_idx)
    (y_ref * w.double()).sum().backward()
    for name, a, r in zip("x dt A B C D".split(), leaves, ref_leaves):
        assert _rel(a.grad, r.grad) <= 1e-5, name


def test_packed_conv_does_not_leak():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 120, 6, generator=g)
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    cu = torch.tensor([0, 2, 50, 51, 90])
    packed = causal_conv1d_silu(x, w, b, seq_idx_from_cu_seqlens(cu, 1, 120))
    bounds = cu.tolist() + [120]
    for s, e in zip(bounds[:-1], bounds[1:]):
        torch.testing.assert_close(packed[:, s:e], causal_conv1d_silu(x[:, s:e], w, b))
    # and without packing the conv equals the F.conv1d path
    unpacked = causal_conv1d_silu(x, w, b, torch.zeros(1, 120, dtype=torch.long))
    torch.testing.assert_close(unpacked, causal_conv1d_silu(x, w, b))


def test_state_carried_over_many_chunks():
    """The chunk-to-chunk carry is one [chunks, chunks] decay matrix per head: over 128 chunks,
    with sequence resets and an initial state, it still equals the recurrence."""
    g = torch.Generator().manual_seed(5)
    length, chunk = 2048, 16
    x = torch.randn(1, length, H, P, generator=g)
    dt = F.softplus(torch.randn(1, length, H, generator=g) - 5.0)  # slow decay: long memory
    A = -(torch.rand(H, generator=g) * 0.2 + 0.01)
    Bm, Cm = torch.randn(2, 1, length, G, N, generator=g)
    init = torch.randn(1, H, P, N, generator=g)
    seq_idx = seq_idx_from_cu_seqlens(torch.tensor([0, 700, 703, 1500]), 1, length)
    y, final = ssd_chunked_scan(x, dt, A, Bm, Cm, chunk, seq_idx=seq_idx, initial_states=init,
                                return_final_states=True)
    y_ref, final_ref = ssd_reference_scan(x, dt, A, Bm, Cm, seq_idx=seq_idx, initial_states=init)
    assert _rel(y, y_ref) <= 1e-5
    assert _rel(final, final_ref) <= 1e-5
