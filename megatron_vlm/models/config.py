"""Model YAML (recipes/models/*.yaml) -> megatron-core TransformerConfig for the hybrid LLM.

The YAML is a flat dict of architecture fields (see recipes/models/nemotron_h_12b.yaml); the
keys mirror Megatron-LM's argument names. Parallel sizes and runtime switches (dtype overrides,
sequence parallelism, init on CPU/meta) are not architecture and come as arguments.

Each YAML is checked against a dataclass (:class:`LLMConfig`, :class:`VisionConfig`,
:class:`VLMConfig`; loading them needs no megatron import) like the stage recipes: unknown keys with a did-you-mean, types,
choices, one line naming the file and key. The loading (``load_config_dict``, which also finds the
shipped YAMLs of an installed package) and the TransformerConfig arguments common to every part
(``base_config_kwargs``) also serve the vision tower (``models/vision/config.py``) and the VLM.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import yaml

from megatron_vlm.typed_config import build as build_typed


class ModelConfigError(ValueError):
    """A model config is wrong; the message names the file and the key."""


@dataclass
class LLMConfig:
    """The hybrid LLM's YAML (recipes/models/nemotron_h_*.yaml); names as Megatron-LM's arguments."""
    hybrid_override_pattern: str     # one letter per layer: M Mamba2, * attention, - MLP
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: Optional[int]  # GQA groups (None: as many as heads)
    kv_channels: Optional[int]       # head dim (None: hidden / heads)
    mamba_num_heads: Optional[int]   # None: 2 x hidden / mamba_head_dim
    mamba_head_dim: int
    mamba_state_dim: int
    mamba_num_groups: int
    vocab_size: int
    name: str = ""
    position_embedding_type: str = "none"
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    mamba_dt_clamp_min: Optional[float] = None
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    make_vocab_size_divisible_by: int = 128
    untie_embeddings_and_output_weights: bool = True
    max_sequence_length: int = 4096
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    params_dtype: str = "float32"


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

LLM_CHOICES = {
    "position_embedding_type": ("none",),  # Nemotron-H uses no positional embedding at all
    "normalization": ("RMSNorm",),
    "params_dtype": tuple(DTYPES),
}


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


VISION_ACTIVATIONS = ("gelu",)  # mapped to functions in vision/config.py
VISION_CHOICES = {"activation": VISION_ACTIVATIONS, "params_dtype": tuple(DTYPES)}


@dataclass
class VLMConfig:
    """The VLM's YAML (recipes/models/vlm_*.yaml): its two parts and the connector."""
    language_model: Union[str, dict]  # LLM config: a shipped name, a YAML path or inline
    vision_model: Union[str, dict]    # vision tower config: likewise
    projector_hidden_size: int
    name: str = ""
    downsample_ratio: float = 0.5     # pixel shuffle: 0.5 merges 2 x 2 patches into one token
    projector_norm_eps: float = 1e-5
    image_token_id: Optional[int] = None    # set at build from the tokenizer
    img_end_token_id: Optional[int] = None


# TransformerConfig fields that every part (LLM, vision tower) reads from its YAML by the same name.
_SHARED_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "layernorm_epsilon",
                  "hidden_dropout", "attention_dropout", "init_method_std")

# Fusions need CUDA/Apex/torch.compile; they do not change the math.
_FUSIONS_OFF = dict(
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
)


class _SquaredReLU(torch.autograd.Function):
    """relu(x)^2 with a two-pass backward, bit-identical to autograd's relu -> square: the
    gradient is the same ``grad * (2 * relu(x))`` (zero where relu(x) is zero), without
    square's ``pow(r, 1)`` copy, its scalar multiply and relu's separate threshold pass."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r  # what square() computes for fp exponent 2

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return (2.0 * r).mul_(grad)  # one new tensor, the same products


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2. megatron's own ``squared_relu`` is wrapped in torch.compile (its jit_fuser),
    which on CPU costs ~30 s of Inductor compilation per fresh process for one elementwise op."""
    return _SquaredReLU.apply(x)


def to_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    return DTYPES[value] if isinstance(value, str) else value


def recipes_root() -> Path:
    """The shipped recipes: the installed package's data (``megatron_vlm/recipes``, see setup.py)
    or, in a checkout, the repository's ``recipes/``."""
    here = Path(__file__).resolve()
    for root in (here.parents[1] / "recipes", here.parents[2] / "recipes"):
        if (root / "models").is_dir():
            return root
    raise ModelConfigError(f"no recipes/models next to {here.parents[1]} (a broken install?)")


def resolve_model_yaml(name_or_path: Union[str, Path]) -> Path:
    """The YAML file of a model config: a shipped name (``vlm_tiny``), a path that exists, or a
    path under ``recipes/`` (as recipes write it) found in the shipped recipes from anywhere."""
    path = Path(name_or_path).expanduser()
    if not path.suffix:
        return recipes_root() / "models" / f"{name_or_path}.yaml"
    if path.exists() or path.is_absolute() or path.parts[0] != "recipes":
        return path
    shipped = recipes_root().joinpath(*path.parts[1:])
    return shipped if shipped.is_file() else path


def read_model_yaml(name_or_path: Union[str, Path, dict]) -> tuple:
    """(mapping, source) of a model YAML or shipped name; a dict is copied (source "dict")."""
    if isinstance(name_or_path, dict):
        return dict(name_or_path), "dict"
    path = resolve_model_yaml(name_or_path)
    if not path.is_file():
        raise ModelConfigError(f"{path}: model config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelConfigError(f"{path}: cannot read: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: a model config must be a mapping of keys")
    return raw, str(path)


def load_config_dict(name_or_path: Union[str, Path, dict], schema, what: str,
                     choices: Optional[Mapping[str, tuple]] = None) -> dict:
    """Config dict from a recipe name (YAML in ``recipes/models``), a YAML path or a dict (copied),
    checked against the dataclass ``schema`` (unknown keys, types, ``choices``), defaults filled
    in. Errors are one :class:`ModelConfigError` line naming the file (``what`` for a dict) and
    the key."""
    raw, source = read_model_yaml(name_or_path)
    if source == "dict":
        source = f"{what} config (dict)"
    checked = build_typed(schema, raw, "", source, ModelConfigError, choices, top=f"{what} config")
    return dataclasses.asdict(checked)


def config_fields(cfg: dict, *names: str) -> dict:
    """``{name: cfg[name]}``: YAML fields passed on under their own names."""
    return {name: cfg[name] for name in names}


def load_model_config(name_or_path: Union[str, Path, dict]) -> dict:
    """LLM config dict from a YAML path, a recipe name (``nemotron_h_tiny``) or a dict; checked
    against :class:`LLMConfig`, defaults filled in."""
    return load_config_dict(name_or_path, LLMConfig, "LLM", LLM_CHOICES)


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


def load_vlm_config(name_or_path: Union[str, Path, dict]) -> dict:
    """VLM config dict with its ``language_model`` / ``vision_model`` sub-configs resolved to dicts.

    Sub-configs may be recipe names, YAML paths or inline dicts.
    """
    cfg = load_config_dict(name_or_path, VLMConfig, "VLM")
    cfg["language_model"] = load_model_config(cfg["language_model"])
    cfg["vision_model"] = load_radio_config(cfg["vision_model"])
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


def _context_parallel_size() -> int:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_context_parallel_world_size()
    return 1


def base_config_kwargs(cfg: dict, tp: Optional[int], pp: Optional[int],
                       params_dtype: Optional[Union[str, torch.dtype]]) -> dict:
    """TransformerConfig arguments common to the LLM and the vision tower.

    The YAML fields named like TransformerConfig's, the dtype (``params_dtype``, else the YAML's),
    the parallel sizes (None: megatron's parallel_state when initialised, else 1) and the
    CUDA/Apex fusions off.
    """
    tp, pp = _parallel_sizes(tp, pp)
    dtype = to_dtype(params_dtype if params_dtype is not None else cfg["params_dtype"])
    return dict(
        config_fields(cfg, *_SHARED_FIELDS),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        cuda_graph_scope=[],  # megatron's default "full" is deprecated for [] (same meaning)
        **_FUSIONS_OFF,
    )


def make_transformer_config(
    model_cfg: dict,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    params_dtype: Optional[Union[str, torch.dtype]] = None,
    **overrides,
):
    """megatron's TransformerConfig for the hybrid LLM.

    tp / pp default to megatron's parallel_state when initialised (else 1). ``params_dtype``
    overrides the YAML dtype (e.g. fp32 on CPU). ``overrides`` go straight to TransformerConfig
    (e.g. sequence_parallel=True, use_cpu_initialization=True, perform_initialization=False).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = load_model_config(model_cfg)
    kwargs = base_config_kwargs(cfg, tp, pp, params_dtype)
    kwargs["context_parallel_size"] = _context_parallel_size()  # the LLM only, not the ViT
    kwargs.update(
        config_fields(cfg, "num_query_groups", "kv_channels", "mamba_num_heads", "mamba_head_dim",
                      "mamba_state_dim", "mamba_num_groups", "normalization"),
        num_layers=num_layers(cfg),
        is_hybrid_model=True,
        pipeline_dtype=kwargs["params_dtype"],
        # Squared-ReLU MLP without gating or biases anywhere.
        activation_func=squared_relu,
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
