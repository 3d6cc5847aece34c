"""Vision -> LLM connector: pixel shuffle, then ``mlp1`` = RMSNorm -> Linear -> ReLU^2 -> Linear.

    connector = build_connector(vision_hidden=1280, llm_hidden=5120, projector_hidden=20480)
    embeds = connector(features, grid)     # [N, rows*cols, 1280] -> [N, rows*cols/4, 5120]

The MLP is megatron's ``MLP`` with the RMSNorm fused into ``linear_fc1`` (TE's
``TELayerNormColumnParallelLinear``, or the LLM's local ``NormColumnParallelLinear``): fc1 is
column-parallel, fc2 row-parallel, no biases. Parameters and their released (HF) names::

    encoder.linear_fc1.layer_norm_weight  [4*vit]           mlp1.0.weight (RMSNorm, eps 1e-5)
    encoder.linear_fc1.weight             [proj, 4*vit]     mlp1.1.weight
    encoder.linear_fc2.weight             [llm, proj]       mlp1.3.weight

(``mlp1.2`` is the parameter-free squared ReLU.) Nemotron Nano V2 VL: 5120 -> 20480 -> 5120.
"""

import dataclasses
from typing import Optional

import torch

from megatron.core.activations import squared_relu
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.hybrid_specs import mlp_submodules, spec_modules
from megatron_vlm.models.vision.pixel_shuffle import shuffle_tokens


def connector_mlp_submodules(impl: str = "auto") -> MLPSubmodules:
    return mlp_submodules(spec_modules(impl, "connector"))


def make_connector_config(base: TransformerConfig, llm_hidden: int, projector_hidden: int,
                          norm_eps: float = 1e-5) -> TransformerConfig:
    """The connector's TransformerConfig: the LLM's parallel/dtype settings with the MLP's shape.

    megatron's MLP reads its output width from ``hidden_size`` and fc2's input width from
    ``ffn_hidden_size``; the input width (4 x ViT hidden) is passed to the MLP directly.
    """
    return dataclasses.replace(
        base, hidden_size=llm_hidden, ffn_hidden_size=projector_hidden, normalization="RMSNorm",
        layernorm_epsilon=norm_eps, activation_func=squared_relu, gated_linear_unit=False,
        add_bias_linear=False, bias_activation_fusion=False, sequence_parallel=False,
        num_layers=1, pipeline_model_parallel_size=1, num_layers_in_first_pipeline_stage=None,
        num_layers_in_last_pipeline_stage=None, pipeline_model_parallel_layout=None,
        virtual_pipeline_model_parallel_size=None, is_hybrid_model=False,
    )


class VisionConnector(MegatronModule):
    """Pixel shuffle + MLP projector from ViT features to LLM embeddings."""

    def __init__(self, config: TransformerConfig, vision_hidden: int, downsample_ratio: float = 0.5,
                 submodules: Optional[MLPSubmodules] = None):
        super().__init__(config=config)
        self.downsample_ratio = downsample_ratio
        merge = round(1 / downsample_ratio)
        self.input_size = vision_hidden * merge * merge
        self.encoder = MLP(config, submodules or connector_mlp_submodules(),
                           input_size=self.input_size, ffn_hidden_size=config.ffn_hidden_size)

    def forward(self, features: torch.Tensor, grid: tuple) -> torch.Tensor:
        """features [N, rows*cols, vit] (row-major patch grid ``grid``) -> [N, tokens, llm]."""
        merged = shuffle_tokens(features, grid, self.downsample_ratio)
        out, bias = self.encoder(merged)
        assert bias is None  # the projector has no biases
        return out


def build_connector(base_config: TransformerConfig, vision_hidden: int, llm_hidden: int,
                    projector_hidden: int, downsample_ratio: float = 0.5, norm_eps: float = 1e-5,
                    impl: str = "auto") -> VisionConnector:
    """Connector built from the LLM's TransformerConfig (``base_config``)."""
    config = make_connector_config(base_config, llm_hidden, projector_hidden, norm_eps)
    return VisionConnector(config, vision_hidden, downsample_ratio, connector_mlp_submodules(impl))
