"""The Mamba ops' compiled path (torch.compile of the plain-torch conv + scan) against eager."""

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.models import mamba_ops
from megatron_vlm.models.ssd_scan import seq_idx_from_cu_seqlens

B, L, H, P, G, N, K, CHUNK = 2, 150, 4, 8, 2, 16, 4, 64  # L not a multiple of the chunk


def _conv_then_scan(inputs, seq_idx):
    """Conv + SiLU over [x | B | C], then the scan; returns y and the input gradients."""
    xbc, dt, weight, bias, dt_bias, A, D = [t.detach().clone().requires_grad_() for t in inputs]
    act = mamba_ops.causal_conv1d_silu(xbc, weight, bias, seq_idx, compile_ok=True)
    x, Bm, Cm = torch.split(act, [H * P, G * N, G * N], dim=-1)
    y = mamba_ops.ssd(x.reshape(B, L, H, P), dt, dt_bias, A, Bm.reshape(B, L, G, N),
                      Cm.reshape(B, L, G, N), D, CHUNK, seq_idx=seq_idx, dt_min=1e-3, compile_ok=True)
    (y.square().mean() + y.sum() * 1e-3).backward()
    return [y.detach()] + [t.grad for t in (xbc, dt, weight, bias, dt_bias, A, D)]


@pytest.mark.slow  # inductor compiles four graphs per layout: ~15 s each on 2 cores
@pytest.mark.parametrize("packed", [True, False])
def test_compiled_conv_and_scan_equal_eager(packed):
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(B, L, H * P + 2 * G * N, generator=g), torch.randn(B, L, H, generator=g) - 2.0,
              torch.randn(H * P + 2 * G * N, K, generator=g) * 0.4, torch.randn(H * P + 2 * G * N, generator=g),
              torch.randn(H, generator=g) * 0.1, -(torch.rand(H, generator=g) + 0.1), torch.randn(H, generator=g))
    # Three packed sequences per row, one boundary inside a convolution window and one chunk.
    seq_idx = seq_idx_from_cu_seqlens(torch.tensor([0, 2, 70, 150, 190, 300]), B, L) if packed else None
    try:
        mamba_ops.use_torch_compile(False)
        eager = _conv_then_scan(inputs, seq_idx)
        mamba_ops.use_torch_compile(True)
        mamba_ops._COMPILED.clear()  # so the check below sees this call's compilation
        compiled = _conv_then_scan(inputs, seq_idx)
        assert mamba_ops._COMPILED, "the compiled path did not run"
    finally:
        mamba_ops.use_torch_compile(False)
    names = ("y", "d xBC", "d dt", "d conv weight", "d conv bias", "d dt_bias", "d A", "d D")
    for name, a, b in zip(names, eager, compiled):
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 1e-5, f"{name}: relative difference {err:.1e}"


def test_conv_taps_equal_conv1d():
    """The tap sum the compiled path uses is the same causal convolution as conv1d."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 50, 12, generator=g), torch.randn(12, K, generator=g), torch.randn(12, generator=g)
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w.unsqueeze(1), b, groups=12).transpose(1, 2))
    torch.testing.assert_close(mamba_ops._conv_taps_silu(x, w, b, None), ref, rtol=1e-5, atol=1e-6)
