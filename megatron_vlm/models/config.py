"""Model YAML (recipes/models/*.yaml) -> megatron-core TransformerConfig for the hybrid LLM.

The YAML is a flat dict of architecture fields (see recipes/models/nemotron_h_12b.yaml); the
keys mirror Megatron-LM's argument names. Parallel sizes and runtime switches (dtype overrides,
sequence parallelism, init on CPU/meta) are not architecture and come as arguments.
"""

from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from megatron.core.transformer.transformer_config import TransformerConfig

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes" / "models"

_REQUIRED = (
    "hybrid_override_pattern", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "num_query_groups", "kv_channels", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
    "mamba_num_groups", "vocab_size",
)

_DEFAULTS = dict(
    position_embedding_type="none",
    mamba_conv_kernel=4,
    mamba_chunk_size=128,
    mamba_dt_clamp_min=None,
    normalization="RMSNorm",
    layernorm_epsilon=1e-5,
    make_vocab_size_divisible_by=128,
    untie_embeddings_and_output_weights=True,
    max_sequence_length=4096,
    init_method_std=0.02,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    params_dtype="float32",
)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2. megatron's own ``squared_relu`` is wrapped in torch.compile (its jit_fuser),
    which on CPU costs ~30 s of Inductor compilation per fresh process for one elementwise op."""
    return torch.nn.functional.relu(x).square()


def load_model_config(name_or_path: Union[str, Path, dict]) -> dict:
    """Model config dict from a YAML path, a recipe name (``nemotron_h_tiny``) or a dict.

    Missing optional keys get their defaults; required keys are checked.
    """
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
        raise ValueError(f"model config lacks {missing}")
    for k, v in _DEFAULTS.items():
        cfg.setdefault(k, v)
    if cfg["position_embedding_type"] != "none":
        raise ValueError("Nemotron-H uses no positional embedding (position_embedding_type: none)")
    return cfg


def num_layers(model_cfg: dict) -> int:
    return len(model_cfg["hybrid_override_pattern"])


def padded_vocab_size(model_cfg: dict, tp: int = 1) -> int:
    """Vocabulary padded to a multiple of make_vocab_size_divisible_by * tp (Megatron-LM rule)."""
    multiple = model_cfg["make_vocab_size_divisible_by"] * tp
    return -(-model_cfg["vocab_size"] // multiple) * multiple


def _parallel_sizes(tp: Optional[int], pp: Optional[int]):
    if tp is not None and pp is not None:
        return tp, pp
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        tp = tp or parallel_state.get_tensor_model_parallel_world_size()
        pp = pp or parallel_state.get_pipeline_model_parallel_world_size()
    return tp or 1, pp or 1


def make_transformer_config(
    model_cfg: dict,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    params_dtype: Optional[Union[str, torch.dtype]] = None,
    **overrides,
) -> TransformerConfig:
    """TransformerConfig for the hybrid LLM.

    tp / pp default to megatron's parallel_state when initialised (else 1). ``params_dtype``
    overrides the YAML dtype (e.g. fp32 on CPU). ``overrides`` go straight to TransformerConfig
    (e.g. sequence_parallel=True, use_cpu_initialization=True, perform_initialization=False).
    """
    cfg = load_model_config(model_cfg)
    tp, pp = _parallel_sizes(tp, pp)
    dtype = params_dtype if params_dtype is not None else cfg["params_dtype"]
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    kwargs = dict(
        num_layers=num_layers(cfg),
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_query_groups"],
        kv_channels=cfg["kv_channels"],
        is_hybrid_model=True,
        mamba_num_heads=cfg["mamba_num_heads"],
        mamba_head_dim=cfg["mamba_head_dim"],
        mamba_state_dim=cfg["mamba_state_dim"],
        mamba_num_groups=cfg["mamba_num_groups"],
        normalization=cfg["normalization"],
        layernorm_epsilon=cfg["layernorm_epsilon"],
        # Squared-ReLU MLP without gating or biases anywhere.
        activation_func=squared_relu,
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=cfg["hidden_dropout"],
        attention_dropout=cfg["attention_dropout"],
        init_method_std=cfg["init_method_std"],
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # Fusions need CUDA/Apex/torch.compile; they do not change the math.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
