"""Local (non-TransformerEngine) building blocks of the ViT layer spec; they run on CPU.

* :class:`LayerNormColumnParallelLinear`: LayerNorm (weight and bias) fused in front of megatron's
  local ``ColumnParallelLinear``. It stands in for TE's ``TELayerNormColumnParallelLinear`` with
  the same parameter names (``layer_norm_weight``, ``layer_norm_bias``, ``weight``, ``bias``), so a
  checkpoint and the HF mapping serve both specs. (The LLM's ``NormColumnParallelLinear`` does the
  same for RMSNorm; a ViT needs LayerNorm with bias.)
* :class:`BidirectionalCoreAttention`: full (non-causal) attention over each tile, a drop-in
  ``core_attention`` of megatron's ``SelfAttention``. megatron's local ``DotProductAttention``
  depends on CUDA's global memory buffer, and the LLM's local attention is causal only.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def param_device(config: TransformerConfig) -> Optional[torch.device]:
    """Device for parameters we allocate ourselves: None (the ambient default, e.g. a meta-device
    context) when megatron initialises on the CPU or there is no CUDA, else the current GPU."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """LayerNorm, then megatron's local ColumnParallelLinear; returns ``(output, bias)``.

    The norm runs before the tensor-parallel region on the full (replicated) input, so its
    parameters and their gradients are identical on every TP rank, as with TE.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        if config.normalization != "LayerNorm":
            raise NotImplementedError(f"expected LayerNorm, got {config.normalization}")
        if config.sequence_parallel:
            raise NotImplementedError("sequence parallelism is not supported in the ViT blocks")
        if kwargs.get("gather_output"):
            raise ValueError("LayerNormColumnParallelLinear does not gather outputs (like TE)")
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        device = param_device(config)
        self.layer_norm_weight = nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype, device=device))
        self.layer_norm_bias = nn.Parameter(
            torch.zeros(input_size, dtype=config.params_dtype, device=device))

    def forward(self, input_: Tensor, weight=None, runtime_gather_output=None):
        normed = F.layer_norm(input_, (input_.size(-1),), self.layer_norm_weight,
                              self.layer_norm_bias, self.eps)
        return super().forward(normed, weight=weight, runtime_gather_output=runtime_gather_output)


class BidirectionalCoreAttention(MegatronModule):
    """Scaled-dot-product attention without a causal mask, [s, b, heads, dim] -> [s, b, heads*dim].

    Every tile is its own batch row (all tiles of a batch have the same size), so no packing is
    needed. An optional boolean ``attention_mask`` (megatron convention: True = masked out,
    broadcastable to [b, 1, s, s]) is honoured.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("BidirectionalCoreAttention has no context parallelism")
        if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.padding):
            raise ValueError(f"a ViT attends bidirectionally; got mask type {attn_mask_type}")
        self.layer_number = layer_number
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention_bias / packed sequences are not used by the ViT")
        sq, bsz, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        mask = None if attention_mask is None else ~attention_mask.to(torch.bool)
        p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=mask, dropout_p=p, is_causal=False, scale=self.softmax_scale)
        if p > 0.0:
            with get_cuda_rng_tracker().fork():
                ctx = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return ctx.permute(2, 0, 1, 3).reshape(sq, bsz, heads * dim)
