"""Norm modules for the local (non-TransformerEngine) hybrid spec.

Parameter layout decision: the local spec reproduces TransformerEngine's parameter names exactly,
so one checkpoint (and one HF mapping) serves both specs:

* TE fuses each layer's pre-norm into the first linear (``TELayerNormColumnParallelLinear``):
  the norm weight is ``<linear>.layer_norm_weight`` inside ``mixer.in_proj``,
  ``self_attention.linear_qkv`` and ``mlp.linear_fc1``. :class:`NormColumnParallelLinear` does the
  same on top of megatron's local ``ColumnParallelLinear`` (norm, then the linear), instead of a
  separate ``input_layernorm`` / ``norm`` module.
* ``decoder.final_norm.weight``: :class:`RMSNorm` (TE's ``TENorm`` there).
* ``mixer.norm.weight``: :class:`GatedRMSNorm`, sharded over tensor-parallel ranks like megatron's
  ``ExtendedRMSNorm``.

All three compute in fp32 and cast back, like TE and the ``transformers`` reference.
"""

from typing import Optional

import torch
from torch import nn

from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class _GroupRMSNorm(torch.autograd.Function):
    """weight * h / rms(h), the rms taken over contiguous groups of ``group_size`` channels of
    the last axis (fp32 in, fp32 out).

    Forward: the same operations as ``h * rsqrt(h.pow(2).mean(-1) + eps)`` then ``* weight``.
    Backward: the same floating-point products and sums as autograd's for that graph (so the
    same bits), in fewer full-size passes: the mean's and the square's backward, which autograd
    runs as an expanded division, a ``pow(h, 1)`` copy, a doubling and a product, are one product
    of ``h`` with a per-group factor (scaling by 2 is exact, so where it is applied does not
    change a bit). ``h`` is passed twice, as the factor of the product with 1/rms and as the
    base of the square, and gets those two gradients separately, so that they are summed with
    its other gradients (the residual's) in autograd's order.
    """

    @staticmethod
    def forward(ctx, h, h_squared, weight, eps, group_size):
        out, hg, rstd, hn = _group_rms_norm_forward(h, weight, eps, group_size)
        ctx.save_for_backward(hg, rstd, hn, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        hg, rstd, hn, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[2]:
            lead = tuple(range(grad.dim() - weight.dim()))
            grad_weight = (grad * hn).sum(lead, keepdim=True).view(weight.shape)
        grad_hn = (grad * weight).view(hg.shape)
        grad_h = grad_hn * rstd
        grad_rstd = (grad_hn * hg).sum(-1, keepdim=True)
        grad_mean = (-0.5 * grad_rstd) * rstd.pow(3) / hg.shape[-1]  # rsqrt's, then mean's
        grad_h_squared = hg * (2.0 * grad_mean)  # square's backward: grad_mean * 2h
        return grad_h.view(grad.shape), grad_h_squared.view(grad.shape), grad_weight, None, None


def _group_rms_norm_forward(h, weight, eps, group_size):
    """The norm and the tensors its backward needs (normalised per group, 1/rms)."""
    shape = h.shape
    hg = h.view(*shape[:-1], shape[-1] // group_size, group_size)
    rstd = torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    hn = (hg * rstd).view(shape)
    return weight * hn, hg, rstd, hn


def group_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """weight * h / rms(h) over groups of the last axis (fp32). Without autograd (generation,
    evaluation) the same operations run directly: the autograd function's own cost is a large
    share of a one-token step."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _GroupRMSNorm.apply(h, h, weight, eps, group_size)
    return _group_rms_norm_forward(h, weight, eps, group_size)[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last axis, computed in fp32."""
    xf = x.float()
    return group_rms_norm(xf, weight.float(), eps, x.shape[-1]).to(x.dtype)


def param_device(config: TransformerConfig) -> Optional[torch.device]:
    """Device for new parameters: None (the ambient default, e.g. a meta-device context) when
    megatron is told to initialise on the CPU or there is no CUDA, else the current GPU."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def _check_normalization(config: TransformerConfig) -> None:
    if config.normalization != "RMSNorm":
        raise NotImplementedError(f"local hybrid spec supports RMSNorm only, got {config.normalization}")
    if config.layernorm_zero_centered_gamma:
        raise NotImplementedError("zero-centered gamma is not supported by the local hybrid spec")


class RMSNorm(nn.Module):
    """RMSNorm with megatron's module interface (``config, hidden_size, eps``).

    The weight is replicated over tensor-parallel ranks; with sequence parallelism it is marked
    ``sequence_parallel`` so megatron's finalize step all-reduces its gradient across TP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        _check_normalization(config)
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=param_device(config))
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Mamba2 output norm: y * silu(z), then RMS-normalised per group, then scaled.

    Groups are contiguous blocks of ``group_size`` channels (d_inner / ngroups), norm before gate
    is False: exactly mamba-ssm's ``RMSNormGated(norm_before_gate=False)``. Groups never straddle
    tensor-parallel ranks (heads and groups are split together), so the norm is rank-local.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float, config: TransformerConfig,
                 tp_group=None):
        super().__init__()
        assert hidden_size % group_size == 0
        self.group_size = group_size
        self.tp_group = tp_group
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=param_device(config))
        )
        setattr(self.weight, "tensor_model_parallel", True)
        setattr(self.weight, "partition_dim", 0)
        setattr(self.weight, "partition_stride", 1)

    def forward(self, y: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        """``z`` None: ``y`` is already gated (the Mamba mixer under context parallelism)."""
        dtype = y.dtype
        h = y.float() if z is None else y.float() * torch.nn.functional.silu(z.float())
        return group_rms_norm(h, self.weight.float(), self.eps, self.group_size).to(dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight sharded along axis 0 over TP ranks (megatron's ExtendedRMSNorm layout)."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        dp_cp_group = (metadata or {}).get("dp_cp_group")
        if self.tp_group is None or dp_cp_group is None:
            # megatron's helper falls back to the global parallel_state groups only when both
            # groups are missing.
            return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0},
                                                       sharded_offsets)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0}, sharded_offsets,
                                                   tp_group=self.tp_group, dp_cp_group=dp_cp_group)


class NormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm fused in front of megatron's local ColumnParallelLinear.

    Stand-in for ``TELayerNormColumnParallelLinear`` on machines without TransformerEngine: same
    constructor, same ``(output, bias)`` return, same parameters (``weight``, ``layer_norm_weight``,
    optional ``bias``). The norm runs on the (possibly sequence-parallel) input before the linear's
    TP region: without sequence parallelism its weight's gradient is complete on every rank; with
    it, each rank holds its shard's part and the ``sequence_parallel`` mark makes megatron's
    finalize_model_grads sum them over TP (as for TE).
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        _check_normalization(config)
        if kwargs.get("gather_output"):
            raise ValueError("NormColumnParallelLinear does not gather outputs (like TE)")
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype, device=param_device(config))
        )
        setattr(self.layer_norm_weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        return super().forward(
            rms_norm(input_, self.layer_norm_weight, self.eps),
            weight=weight,
            runtime_gather_output=runtime_gather_output,
        )
