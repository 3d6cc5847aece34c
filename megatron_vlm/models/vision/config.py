"""Vision tower YAML (recipes/models/radio_*.yaml) -> geometry dict + megatron TransformerConfig.

The YAML holds architecture only (flat keys named like Megatron-LM's). Parallel sizes and runtime
switches (dtype override, init on CPU / meta) come as arguments, as for the LLM
(``megatron_vlm.models.config``).
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.config import base_config_kwargs, config_fields, load_radio_config

# The activations models/config.py's VISION_ACTIVATIONS allows. transformers' "gelu" is the exact
# (erf) GELU, which is also megatron's default F.gelu.
_ACTIVATIONS = {"gelu": F.gelu}


def make_vision_transformer_config(
    vision_cfg: Union[str, dict],
    tp: Optional[int] = None,
    params_dtype: Optional[Union[str, torch.dtype]] = None,
    **overrides,
) -> TransformerConfig:
    """TransformerConfig for the ViT blocks.

    ``pipeline_model_parallel_size`` is always 1: the whole tower lives on the first pipeline
    stage, so megatron must not split its layers (nor offset their numbers) by the LLM's PP size.
    tp defaults to megatron's parallel_state when initialised (else 1).
    """
    cfg = load_radio_config(vision_cfg)
    heads = cfg["num_attention_heads"]
    kwargs = base_config_kwargs(cfg, tp, 1, params_dtype)
    kwargs.update(
        config_fields(cfg, "num_layers", "add_bias_linear", "add_qkv_bias"),
        num_query_groups=heads,  # plain multi-head attention
        kv_channels=cfg["hidden_size"] // heads,
        normalization="LayerNorm",
        activation_func=_ACTIVATIONS[cfg["activation"]],
        gated_linear_unit=False,
        sequence_parallel=False,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
    )
    kwargs.update(overrides)
    if kwargs.get("pipeline_model_parallel_size", 1) != 1:
        raise ValueError("the vision tower is never pipeline-split (it lives on the first stage)")
    return TransformerConfig(**kwargs)
