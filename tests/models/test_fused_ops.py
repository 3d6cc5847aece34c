"""The hand-written backward passes of the CPU path (squared ReLU, the RMS norms, the SSD scan's
decayed scores) give the same bits as autograd on the plain-torch graphs they replace, so the
golden losses do not move. Small shapes; the input of each norm also feeds a residual, so the
order in which its gradients are summed is checked too."""

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.models.config import squared_relu
from megatron_vlm.models.norms import _GroupRMSNorm, rms_norm
from megatron_vlm.models.ssd_scan import _DecayedScores


def _grads(fn, *tensors, seed=0):
    """Output and input gradients of ``fn`` under a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _assert_bit_equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def test_squared_relu_matches_autograd():
    x = torch.randn(64, 2, 48, generator=torch.Generator().manual_seed(1))
    x[0, 0, :4] = 0.0  # relu's kink
    _assert_bit_equal(_grads(lambda t: squared_relu(t) + t, x),
                      _grads(lambda t: F.relu(t).square() + t, x))


def _rms_reference(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (w.float() * xf).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_autograd(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(37, 2, 64, generator=g) * 3).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    # x also feeds a residual: its three gradients must be summed in autograd's order.
    _assert_bit_equal(_grads(lambda a, b: rms_norm(a, b, 1e-5) + a, x, w),
                      _grads(lambda a, b: _rms_reference(a, b, 1e-5) + a, x, w))


def test_grouped_norm_matches_autograd():
    # As in the Mamba mixer's gated norm, whose input (y * silu(z)) feeds nothing else.
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 29, 96, generator=g), torch.randn(96, generator=g)

    def reference(h, w):
        hg = h.view(2, 29, 3, 32)
        return w * (hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + 1e-5)).view(h.shape)

    _assert_bit_equal(_grads(lambda h, w: _GroupRMSNorm.apply(h, h, w, 1e-5, 32), h, w),
                      _grads(reference, h, w))


@pytest.mark.parametrize("packed", [False, True])
def test_decayed_scores_match_autograd(packed):
    g = torch.Generator().manual_seed(4)
    b, c, h, q, groups = 1, 3, 4, 8, 2
    a_cumsum = torch.cumsum(-torch.rand(b, c, h, q, generator=g), dim=-1)
    cb = torch.randn(b, c, groups, q, q, generator=g)
    outside = ~torch.tril(torch.ones(q, q, dtype=torch.bool))
    if packed:
        seq = torch.tensor([0] * 11 + [1] * 13).view(b, c, q)
        outside = outside | (seq.unsqueeze(-1) != seq.unsqueeze(-2)).unsqueeze(2)

    def fused(a, cb):
        return _DecayedScores.apply(a.unsqueeze(-1), (-a).unsqueeze(-2), outside, cb) + a.unsqueeze(-1)

    def reference(a, cb):
        decay = torch.exp((a.unsqueeze(-1) + (-a).unsqueeze(-2)).masked_fill(outside, float("-inf")))
        scores = (decay.reshape(b, c, groups, h // groups, q, q) * cb.unsqueeze(3)).view(b, c, h, q, q)
        return scores + a.unsqueeze(-1)

    _assert_bit_equal(_grads(fused, a_cumsum, cb), _grads(reference, a_cumsum, cb))
