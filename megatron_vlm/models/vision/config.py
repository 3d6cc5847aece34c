"""Vision tower YAML (recipes/models/radio_*.yaml) -> geometry dict + megatron TransformerConfig.

The YAML holds architecture only (flat keys named like Megatron-LM's). Parallel sizes and runtime
switches (dtype override, init on CPU / meta) come as arguments, as for the LLM
(``megatron_vlm.models.config``).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.config import (DTYPES, ModelConfigError, base_config_kwargs,
                                        config_fields, load_config_dict)


@dataclass
class VisionConfig:
    """The RADIO tower's YAML (recipes/models/radio_*.yaml)."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    patch_size: int
    max_img_size: int                # CPE table side in pixels (a multiple of patch_size)
    class_token_len: int             # cls + register tokens, dropped before the connector
    name: str = ""
    num_channels: int = 3
    layernorm_epsilon: float = 1e-6
    activation: str = "gelu"
    add_qkv_bias: bool = True
    add_bias_linear: bool = True
    # Random CPE crop in train mode (Megatron's RADIO); eval always uses the interpolated window.
    cpe_train_crop: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    params_dtype: str = "float32"


# transformers' "gelu" is the exact (erf) GELU, which is also megatron's default F.gelu.
_ACTIVATIONS = {"gelu": F.gelu}

VISION_CHOICES = {"activation": tuple(_ACTIVATIONS), "params_dtype": tuple(DTYPES)}


def load_radio_config(name_or_path: Union[str, Path, dict]) -> dict:
    """Tower config dict from a recipe name (``radio_tiny``), a YAML path or a dict."""
    cfg = load_config_dict(name_or_path, VisionConfig, "vision tower", VISION_CHOICES)
    what = cfg["name"] or "vision tower"
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ModelConfigError(f"{what}: hidden_size {cfg['hidden_size']} is not divisible by "
                               f"num_attention_heads {cfg['num_attention_heads']}")
    if cfg["max_img_size"] % cfg["patch_size"]:
        raise ModelConfigError(f"{what}: max_img_size must be a multiple of patch_size")
    return cfg


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
