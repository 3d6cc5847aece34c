"""Local (non-TransformerEngine) building block of the ViT layer spec; it runs on CPU.

:class:`LayerNormColumnParallelLinear`: LayerNorm (weight and bias) fused in front of megatron's
local ``ColumnParallelLinear``. It stands in for TE's ``TELayerNormColumnParallelLinear`` with the
same parameter names (``layer_norm_weight``, ``layer_norm_bias``, ``weight``, ``bias``), so a
checkpoint and the HF mapping serve both specs. (The LLM's ``NormColumnParallelLinear`` does the
same for RMSNorm; a ViT needs LayerNorm with bias.) The ViT's local core attention is the LLM's
``LocalCoreAttention`` with the ``no_mask`` mask type (full attention over each tile).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.norms import param_device


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
