"""The one seam between the Mamba2 mixer and its compute kernels.

On CUDA tensors, when ``causal_conv1d`` / ``mamba_ssm`` import, the fused kernels do the work
(the same ones megatron-core's MambaMixer uses). Everywhere else -- CPU, or a GPU box without the
kernels -- plain torch does: a depthwise causal convolution and the chunked SSD scan of
``ssd_scan.py``. Both paths take the same arguments and honour packed-sequence ids, so the mixer
does not know which one ran.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_vlm.models.ssd_scan import ssd_chunked_scan

try:  # GPU kernels; optional.
    from causal_conv1d import causal_conv1d_fn as _kernel_conv1d
except ImportError:  # pragma: no cover - depends on the machine
    _kernel_conv1d = None

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _kernel_ssd
except ImportError:  # pragma: no cover - depends on the machine
    _kernel_ssd = None

# Tests and benchmarks flip this to compare both paths on one GPU.
ALLOW_KERNELS = True

_COMPILE = False
_COMPILED: dict = {}


def use_torch_compile(enabled: bool = True) -> bool:
    """Run the plain-torch convolution and scan through torch.compile from now on (or not);
    returns the previous setting."""
    global _COMPILE
    previous, _COMPILE = _COMPILE, bool(enabled)
    return previous


def _compiled(fn):
    """fn through torch.compile, built on first use. The CPU platform layer turns dynamo off for
    the process (megatron's own compiled helpers stay eager); it is on for these calls only."""
    if fn not in _COMPILED:
        compiled = torch.compile(fn, dynamic=False)

        def run(*args, **kwargs):
            with torch._dynamo.config.patch(disable=False):
                return compiled(*args, **kwargs)
        _COMPILED[fn] = run
    return _COMPILED[fn]


def kernels_available(t: torch.Tensor) -> bool:
    """True when the fused kernels can run on tensor ``t``."""
    return ALLOW_KERNELS and t.is_cuda and _kernel_conv1d is not None and _kernel_ssd is not None


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor] = None, compile_ok: bool = False,
) -> torch.Tensor:
    """SiLU(depthwise causal conv1d) over time. x [b, l, d], weight [d, k], bias [d] -> [b, l, d].

    With ``seq_idx`` ([b, l] sequence ids) taps never reach into the previous packed sequence:
    each output only sees inputs with its own id (the sequence start sees zeros before it).
    """
    bsz, seqlen, dim = x.shape
    k = weight.shape[-1]
    if kernels_available(x):
        # The kernel wants channels-last memory ([b, d, l] view of a [b, l, d] tensor) for seq_idx.
        out = _kernel_conv1d(
            x.transpose(1, 2), weight, bias,
            seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
            activation="silu",
        )
        return out.transpose(1, 2)
    if compile_ok and _COMPILE:
        # The tap sum (not conv1d): inductor fuses it with the SiLU, forward and backward.
        return _compiled(_conv_taps_silu)(x, weight, bias, seq_idx)
    if seq_idx is None:
        # Causal: the k-1 zeros go on the left only, in the one copy that makes the input
        # channels-first anyway, so the convolution yields exactly l outputs (no slice of a
        # longer output, whose backward zero-fills and copies). Same sums as padding=k-1.
        xc = F.pad(x.transpose(1, 2), (k - 1, 0))
        out = F.conv1d(xc, weight.unsqueeze(1), bias, groups=dim)
        # Back to contiguous [b, l, d] before the SiLU: its backward then runs on matching
        # layouts, and the head reshapes downstream are views instead of copies.
        return F.silu(out.transpose(1, 2).contiguous())
    return _conv_taps_silu(x, weight, bias, seq_idx)


def _conv_taps_silu(x, weight, bias, seq_idx):
    """The causal convolution as a sum of k shifted taps, each masked (packed sequences) where
    the shifted token is in another sequence; then SiLU."""
    seqlen, k = x.shape[1], weight.shape[-1]
    xp = F.pad(x, (0, 0, k - 1, 0))
    ids = None if seq_idx is None else F.pad(seq_idx, (k - 1, 0), value=-1)  # -1: no real id
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype).expand_as(x)
    for shift in range(k):  # tap weight[:, k-1-shift] multiplies x[t - shift]
        start = k - 1 - shift
        tap = xp[:, start:start + seqlen] * weight[:, k - 1 - shift]
        if ids is not None:
            tap = tap * (ids[:, start:start + seqlen] == seq_idx).unsqueeze(-1).to(x.dtype)
        out = out + tap
    return F.silu(out)


def ssd(
    x: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, chunk_size: int,
    seq_idx: Optional[torch.Tensor] = None, dt_min: Optional[float] = None, compile_ok: bool = False,
) -> torch.Tensor:
    """Mamba2 selective scan with softplus(dt + dt_bias) discretisation.

    x [b, l, h, p], dt [b, l, h] (raw, before bias/softplus), A/D/dt_bias [h], B/C [b, l, g, n].
    ``dt_min`` optionally clamps the step from below (``transformers`` clamps at time_step_min;
    megatron-core's kernels do not clamp, so None is the megatron behaviour). Returns [b, l, h, p].
    """
    if kernels_available(x):
        return _kernel_ssd(
            x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias.float(), dt_softplus=True,
            seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
            dt_limit=(0.0 if dt_min is None else dt_min, float("inf")),
        )
    scan = _compiled(_torch_ssd) if compile_ok and _COMPILE else _torch_ssd
    return scan(x, dt, dt_bias, A, B, C, D, chunk_size, seq_idx, dt_min)


def _torch_ssd(x, dt, dt_bias, A, B, C, D, chunk_size, seq_idx, dt_min):
    step = F.softplus(dt.float() + dt_bias.float())
    if dt_min is not None:
        step = step.clamp(min=dt_min)
    return ssd_chunked_scan(x, step, A, B, C, chunk_size, D=D, seq_idx=seq_idx)
