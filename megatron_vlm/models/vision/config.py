"""Vision tower YAML (recipes/models/radio_*.yaml) -> geometry dict + megatron TransformerConfig.

The YAML holds architecture only (flat keys named like Megatron-LM's). Parallel sizes and runtime
switches (dtype override, init on CPU / meta) come as arguments, as for the LLM
(``megatron_vlm.models.config``).
"""

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
import yaml

from megatron.core.transformer.transformer_config import TransformerConfig

RECIPES_DIR = Path(__file__).resolve().parents[3] / "recipes" / "models"

_REQUIRED = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "patch_size",
             "max_img_size", "class_token_len")

_DEFAULTS = dict(
    num_channels=3,
    layernorm_epsilon=1e-6,
    activation="gelu",
    add_qkv_bias=True,
    add_bias_linear=True,
    # Random CPE crop in train mode (Megatron's RADIO); eval always uses the interpolated window.
    cpe_train_crop=True,
    init_method_std=0.02,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    params_dtype="float32",
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# transformers' "gelu" is the exact (erf) GELU, which is also megatron's default F.gelu.
_ACTIVATIONS = {"gelu": F.gelu}


def load_radio_config(name_or_path: Union[str, Path, dict]) -> dict:
    """Tower config dict from a recipe name (``radio_tiny``), a YAML path or a dict."""
    if isinstance(name_or_path, dict):
        cfg = dict(name_or_path)
    else:
        path = Path(name_or_path)
        if not path.suffix:
            path = RECIPES_DIR / f"{name_or_path}.yaml"
        with open(path) as f:
            cfg = yaml.safe_load(f)
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"vision tower config lacks {missing}")
    for key, value in _DEFAULTS.items():
        cfg.setdefault(key, value)
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"hidden_size {cfg['hidden_size']} is not divisible by "
                         f"num_attention_heads {cfg['num_attention_heads']}")
    if cfg["max_img_size"] % cfg["patch_size"]:
        raise ValueError("max_img_size must be a multiple of patch_size")
    if cfg["activation"] not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {cfg['activation']!r}")
    return cfg


def to_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    return DTYPES[value] if isinstance(value, str) else value


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
    if tp is None:
        from megatron.core import parallel_state

        tp = (parallel_state.get_tensor_model_parallel_world_size()
              if parallel_state.model_parallel_is_initialized() else 1)
    dtype = to_dtype(params_dtype if params_dtype is not None else cfg["params_dtype"])
    heads = cfg["num_attention_heads"]
    kwargs = dict(
        num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=heads,
        num_query_groups=heads,  # plain multi-head attention
        kv_channels=cfg["hidden_size"] // heads,
        normalization="LayerNorm",
        layernorm_epsilon=cfg["layernorm_epsilon"],
        activation_func=_ACTIVATIONS[cfg["activation"]],
        gated_linear_unit=False,
        add_bias_linear=cfg["add_bias_linear"],
        add_qkv_bias=cfg["add_qkv_bias"],
        hidden_dropout=cfg["hidden_dropout"],
        attention_dropout=cfg["attention_dropout"],
        init_method_std=cfg["init_method_std"],
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        # Fusions need CUDA/Apex; they do not change the math.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
    )
    kwargs.update(overrides)
    if kwargs.get("pipeline_model_parallel_size", 1) != 1:
        raise ValueError("the vision tower is never pipeline-split (it lives on the first stage)")
    return TransformerConfig(**kwargs)
