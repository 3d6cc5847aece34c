"""Our VLM's weights <-> Hugging Face directories that ``transformers`` loads.

Layouts written by :func:`export_hf`:

``vlm``  the whole model as ``transformers``' ``nemotron_h_omni`` (``NemotronH_Omni_Reasoning_V3``,
         ``AutoModelForImageTextToText``): ``language_model.model.*`` / ``language_model.lm_head.weight``
         (NemotronHForCausalLM inside), ``vision_model.*`` (``RadioModel``) and
         ``multi_modal_projector.*``. Images go in already CLIP-normalised (the omni model detaches
         RADIO's input conditioner), as tiles or packed patches with ``image_grid_hw``.
         The omni class always builds a video patch embedder (2 frames per temporal patch, the
         Nemotron 3 Omni video path); our model has none (each video frame is one image tile), so
         ``vision_model.embeddings.video_patch_projection.weight`` is not written and stays at
         transformers' init: feed video frames to the HF model as images, not ``pixel_values_videos``.
``llm``  the language model alone as ``NemotronHForCausalLM`` (``model.*``, ``lm_head.weight``).

Read back by :func:`import_plan` (layouts of :func:`detect_layout`): those two, the released
Nemotron Nano V2 VL names (``language_model.backbone.*``, ``vision_model.radio_model.*``,
``mlp1.*``), the released LLM alone (``backbone.*`` or ``model.*``), and a RADIO tower alone
(``transformers``' ``RadioModel`` names or the released ``radio_model.*`` ones). HF-only tensors
(input conditioner, ``summary_idxs``, LayerScale of 1, the omni video embedder) are checked and
dropped; any other unmapped tensor is an error naming it.

Both directions walk the mapping tables (``hf_mapping_llm.llm_rules``,
``hf_mapping_vision.vlm_vision_rules``) rule by rule, so a conversion holds one rule's tensors
at a time (see ``safetensors_io`` and ``dist_reader``).

Exact outputs: the exported config carries the Mamba step clamp our model applies
(``hf_mapping_llm``: none by default, written as a no-op), ``vocab_size`` is the model's true
vocabulary (megatron's padding rows are not written), and ids the tokenizer lacks (between the
tokenizer's size and ``vocab_size``) are listed in ``generation_config.json``'s
``suppress_tokens``, so ``generate`` never emits them.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from megatron.core.utils import unwrap_model as unwrap  # DDP / Float16Module -> our model

from megatron_vlm.conversion import mapping
from megatron_vlm.conversion.mapping import Rule
from megatron_vlm.conversion.safetensors_io import (
    SafetensorsDirReader, ShardedSafetensorsWriter)
from megatron_vlm.conversion import hf_mapping_llm as llm_map
from megatron_vlm.conversion import hf_mapping_vision as vis_map

Tensors = Dict[str, torch.Tensor]
Shapes = Dict[str, Tuple[torch.Size, torch.dtype]]

OMNI_ARCH = "NemotronH_Omni_Reasoning_V3"
LLM_ARCH = "NemotronHForCausalLM"
# Written by nothing of ours, left at transformers' init when the omni model loads our export.
HF_KEYS_NOT_EXPORTED = ("vision_model.embeddings.video_patch_projection.weight",)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---- our model ------------------------------------------------------------------------------
def full_state(model: torch.nn.Module) -> Tensors:
    """The model's weights (TP=1 model), ``_extra_state`` dropped, detached (not copied)."""
    return {k: v.detach() for k, v in unwrap(model).state_dict().items()
            if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}


# ---- configs --------------------------------------------------------------------------------
def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def llm_hf_config(vlm_cfg: dict, ids: Optional[dict] = None, dtype: Optional[torch.dtype] = None):
    from transformers import NemotronHConfig

    kwargs = llm_map.hf_config_kwargs(vlm_cfg["language_model"])
    if ids is not None:
        kwargs.update(eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"],
                      bos_token_id=ids["bos_id"])
    config = NemotronHConfig(**kwargs)
    config.architectures = [LLM_ARCH]
    if dtype is not None:
        config.dtype = _dtype_name(dtype)
    return config


def radio_hf_config_kwargs(vision_cfg: dict) -> dict:
    """``transformers.RadioConfig`` keyword arguments for our tower config (raises where the HF
    RadioModel cannot express it)."""
    if vision_cfg.get("activation", "gelu") != "gelu":
        raise NotImplementedError(f"vision activation {vision_cfg['activation']!r}: HF RADIO is gelu")
    if not (vision_cfg.get("add_qkv_bias", True) and vision_cfg.get("add_bias_linear", True)):
        raise NotImplementedError("HF RadioModel always has qkv / linear biases")
    prefix = int(vision_cfg["class_token_len"])
    num_cls = min(prefix, 3)  # our single prefix table = cls + registers; any split is equivalent
    return dict(
        hidden_size=vision_cfg["hidden_size"], num_hidden_layers=vision_cfg["num_layers"],
        num_attention_heads=vision_cfg["num_attention_heads"],
        mlp_ratio=vision_cfg["ffn_hidden_size"] / vision_cfg["hidden_size"],
        hidden_act="gelu", layer_norm_eps=vision_cfg["layernorm_epsilon"], qkv_bias=True,
        num_channels=vision_cfg.get("num_channels", 3), patch_size=vision_cfg["patch_size"],
        max_img_size=vision_cfg["max_img_size"], num_cls_tokens=num_cls,
        num_registers=prefix - num_cls, summary_idxs=list(range(min(num_cls, 2))),
        layerscale_value=1.0, video_temporal_patch_size=2,
    )


def vlm_hf_config(vlm_cfg: dict, image_token_id: int, ids: Optional[dict] = None,
                  dtype: Optional[torch.dtype] = None):
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config,
    )

    if abs(vlm_cfg["projector_norm_eps"] - 1e-5) > 1e-12:
        warnings.warn(f"projector_norm_eps={vlm_cfg['projector_norm_eps']}: transformers' "
                      "nemotron_h_omni projector uses 1e-5")
    text = llm_hf_config(vlm_cfg, ids, dtype)
    config = NemotronH_Omni_Reasoning_V3_Config(
        text_config=text.to_dict(), vision_config=radio_hf_config_kwargs(vlm_cfg["vision_model"]),
        downsample_ratio=vlm_cfg["downsample_ratio"],
        projector_hidden_size=vlm_cfg["projector_hidden_size"],
        vision_hidden_size=vlm_cfg["vision_model"]["hidden_size"],
        image_token_id=image_token_id, video_temporal_patch_size=2,
    )
    config.architectures = [OMNI_ARCH]
    if dtype is not None:
        config.dtype = _dtype_name(dtype)
    return config


def generation_config(vlm_cfg: dict, ids: dict):
    """eos/pad/bos, and the ids the tokenizer does not have suppressed (never generated)."""
    from transformers import GenerationConfig

    vocab = vlm_cfg["language_model"]["vocab_size"]
    kwargs = dict(eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"], bos_token_id=ids["bos_id"])
    if ids["vocab_size"] < vocab:
        kwargs["suppress_tokens"] = list(range(ids["vocab_size"], vocab))
    return GenerationConfig(**kwargs)


# ---- mapping tables of whole layouts --------------------------------------------------------
def _summary_idxs(vlm_cfg: dict) -> torch.Tensor:
    """RadioModel's persistent buffer (indices of the summary tokens), as radio_hf_config_kwargs."""
    num_cls = min(int(vlm_cfg["vision_model"]["class_token_len"]), 3)
    return torch.arange(min(num_cls, 2), dtype=torch.long)


def export_rules(vlm_cfg: dict, kind: str) -> List[Rule]:
    """Our VLM keys -> the ``vlm`` or ``llm`` HF layout."""
    llm = llm_map.llm_rules(vlm_cfg["language_model"])
    if kind == "llm":
        return mapping.with_prefixes(llm, "language_model.", "")
    vision = vlm_cfg["vision_model"]
    summary = _summary_idxs(vlm_cfg)
    return (mapping.with_prefixes(llm, "language_model.", "language_model.")
            + vis_map.vlm_vision_rules(vision["num_layers"], vision["num_attention_heads"],
                                       "transformers")
            + [Rule((), ("vision_model.summary_idxs",), lambda: (summary,), lambda t: ())])


def detect_layout(keys: Iterable[str]) -> str:
    """``vlm`` (nemotron_h_omni names), ``released`` (Nano V2 VL names), ``llm`` (NemotronH alone,
    ``model.*`` or released ``backbone.*``) or ``vision`` (RADIO alone)."""
    keys = list(keys)
    if any(k.startswith("vision_model.radio_model.") or k.startswith("mlp1.") for k in keys):
        return "released"
    if any(k.startswith("language_model.") for k in keys):
        return "vlm"
    if any(k.startswith(("model.", "backbone.")) for k in keys):
        return "llm"
    if any(k.startswith(("radio_model.", "encoder.layer.", "embeddings.")) for k in keys):
        return "vision"
    raise ValueError(f"unrecognised HF checkpoint keys, e.g. {sorted(keys)[:5]}")


def import_plan(keys: Iterable[str], vlm_cfg: dict) -> Tuple[str, List[Rule], Dict[str, str],
                                                              Callable[[str], bool]]:
    """(layout, rules over our VLM keys, HF name -> key in the files, is-dropped predicate).

    Rules name HF tensors as ``transformers`` writes them; the alias map points them at the
    released names where the files use those (``backbone.`` for ``model.``)."""
    keys = list(keys)
    layout = detect_layout(keys)
    llm_cfg = vlm_cfg["language_model"]
    vision = vlm_cfg["vision_model"]
    layers, heads = vision["num_layers"], vision["num_attention_heads"]
    llm = llm_map.llm_rules(llm_cfg)
    if layout in ("llm", "vision"):
        radio = "released" if any(k.startswith("radio_model.") for k in keys) else "transformers"
        llm_prefix, vis_prefix, vis_layout = "", "", radio
    else:
        llm_prefix, vis_prefix = "language_model.", "vision_model."
        vis_layout = "released" if layout == "released" else "transformers"
    rules: List[Rule] = []
    if layout != "vision":
        rules += mapping.with_prefixes(llm, "language_model.", llm_prefix)
    if layout in ("vlm", "released"):
        rules += vis_map.vlm_vision_rules(layers, heads, vis_layout)
    elif layout == "vision":
        rules += mapping.with_prefixes(vis_map.vision_rules(layers, heads, vis_layout),
                                       "vision_model.", "")
    present = set(keys)
    alias = {}
    for rule in rules:
        for name in rule.hf:
            if name not in present and name.startswith(llm_prefix + "model."):
                released = llm_prefix + "backbone." + name[len(llm_prefix + "model."):]
                if released in present:
                    alias[name] = released

    def dropped(key: str) -> bool:
        if key in HF_KEYS_NOT_EXPORTED or "video_patch_projection" in key:
            return True
        if layout != "llm" and key.startswith(vis_prefix):
            return vis_map.is_dropped(key[len(vis_prefix):], vis_layout)
        return False

    return layout, rules, alias, dropped


def check_import(rules: List[Rule], alias: Dict[str, str], dropped: Callable[[str], bool],
                 hf_shapes: Shapes, ours_shapes: Shapes, what: str) -> Shapes:
    """Every HF tensor mapped or dropped, every rule's tensors present, and the shapes it gives
    equal to the model's; raises a ValueError naming the leftovers / mismatches. Returns the
    planned shapes of our tensors."""
    inverse = {v: k for k, v in alias.items()}
    file_keys = {inverse.get(k, k) for k in hf_shapes}
    mapping.check_covers(rules, file_keys, "hf", what, ignore=dropped)
    planned = mapping.plan_shapes(
        rules, {n: hf_shapes[alias.get(n, n)] for r in rules for n in r.hf}, "to_ours")
    bad = [f"{k}: HF gives {tuple(s)}, the recipe's model has {tuple(ours_shapes[k][0])}"
           for k, (s, _) in planned.items() if k in ours_shapes and s != ours_shapes[k][0]]
    unknown = sorted(k for k in planned if k not in ours_shapes)
    if unknown:
        raise ValueError(f"{what}: tensors the recipe's model does not have: {unknown[:10]}")
    if bad:
        raise ValueError(f"{what}: shapes differ from the recipe's model: " + "; ".join(bad[:6]))
    return planned


# ---- export / import, streaming -------------------------------------------------------------
def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, mininterval=1.0)


def export_hf(get: Callable[[str], torch.Tensor], shapes: Shapes, vlm_cfg: dict, kind: str,
              out: Path, ids: dict, tokenizer_dir: Optional[Path] = None,
              dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False,
              tokenizer=None) -> List[str]:
    """Write one HF directory (``kind`` "vlm" or "llm") from our tensors, fetched one rule at a
    time by ``get`` (a checkpoint reader or a state dict). ``shapes``: our (shape, dtype) per key.
    ``dtype`` casts floating-point tensors (None keeps them)."""
    out = Path(out)
    rules = export_rules(vlm_cfg, kind)
    ignore = (lambda k: not k.startswith("language_model.")) if kind == "llm" else (lambda k: False)
    mapping.check_covers(rules, shapes, "ours", "export", ignore=ignore)
    planned = mapping.plan_shapes(rules, shapes)

    def cast(t_dtype):
        return dtype if dtype is not None and t_dtype.is_floating_point else t_dtype

    writer = ShardedSafetensorsWriter(
        out, [(k, s, cast(d)) for k, (s, d) in planned.items()], max_shard_bytes)
    bar = progress_bar(len(rules), f"export {out.name}", progress)
    try:
        for rule in rules:
            for name, t in mapping.stream_to_hf([rule], get):
                writer.write(name, t.to(cast(t.dtype)))
            bar.update(1)
    finally:
        bar.close()
        files = writer.close()
    config = (llm_hf_config(vlm_cfg, ids, dtype) if kind == "llm"
              else vlm_hf_config(vlm_cfg, ids["image_id"], ids, dtype))
    config.save_pretrained(str(out))
    generation_config(vlm_cfg, ids).save_pretrained(str(out))
    files += ["config.json", "generation_config.json"]
    if tokenizer_dir is not None:
        files += copy_tokenizer(tokenizer_dir, out, tokenizer)
    return files


def import_into(model: torch.nn.Module, hf_dir: Path, vlm_cfg: dict, progress: bool = False) -> str:
    """Copy an HF directory's weights into our TP=1 ``model`` tensor by tensor, after checking
    names and shapes against it; returns the layout. LLM-only / vision-only directories fill
    their part and leave the rest of ``model`` as it is."""
    reader = SafetensorsDirReader(hf_dir)
    layout, rules, alias, dropped = import_plan(reader.keys(), vlm_cfg)
    params = full_state(model)
    check_import(rules, alias, dropped, reader.shapes(),
                 {k: (v.shape, v.dtype) for k, v in params.items()}, str(hf_dir))
    for key in reader.keys():
        if dropped(key) and ("layer_scale" in key or "input_conditioner" in key):
            vis_map.check_dropped(key, reader.read(key))
    bar = progress_bar(len(rules), f"import {Path(hf_dir).name}", progress)
    with torch.no_grad():
        for rule in rules:
            for key, t in mapping.stream_to_ours([rule], lambda k: reader.read(alias.get(k, k))):
                params[key].copy_(t)
            bar.update(1)
    bar.close()
    return layout


# ---- whole-dict helpers (tests, small models) -----------------------------------------------
def ours_to_hf_llm(state: Tensors, vlm_cfg: dict) -> Tensors:
    return mapping.to_hf(export_rules(vlm_cfg, "llm"), state)


def ours_to_hf_vlm(state: Tensors, vlm_cfg: dict) -> Tensors:
    """Our full VLM state -> ``nemotron_h_omni`` state dict names."""
    return mapping.to_hf(export_rules(vlm_cfg, "vlm"), state)


def hf_to_ours(hf_state: Tensors, vlm_cfg: dict) -> Tuple[Tensors, str]:
    """HF state dict (any layout of :func:`detect_layout`) -> our VLM keys; returns the layout.
    Raises naming the tensors it does not map."""
    layout, rules, alias, dropped = import_plan(hf_state, vlm_cfg)
    inverse = {v: k for k, v in alias.items()}
    mapping.check_covers(rules, {inverse.get(k, k) for k in hf_state}, "hf", "HF state",
                         ignore=dropped)
    for key, value in hf_state.items():
        if dropped(key) and ("layer_scale" in key or "input_conditioner" in key):
            vis_map.check_dropped(key, value)
    return dict(mapping.stream_to_ours(rules, lambda k: hf_state[alias.get(k, k)])), layout


# ---- files ----------------------------------------------------------------------------------
def write_safetensors(state: Tensors, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      metadata: Optional[dict] = None) -> list:
    """``model.safetensors``, or shards + index when larger than ``max_shard_bytes``."""
    writer = ShardedSafetensorsWriter(out, [(k, state[k].shape, state[k].dtype) for k in sorted(state)],
                                      max_shard_bytes, metadata)
    for k in sorted(state):
        writer.write(k, state[k])
    return writer.close()


def read_safetensors(directory: Path) -> Tensors:
    return SafetensorsDirReader(directory).read_all()


def copy_tokenizer(src: Path, out: Path, tokenizer=None) -> list:
    """The tokenizer files; ``tokenizer.json`` rewritten with the special tokens our tokenizer
    adds at load time (``<image>`` ...), so that every id the model was trained on decodes."""
    src = Path(src)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    if tokenizer is not None and tokenizer.added_tokens:
        tokenizer.backend.save(str(out / "tokenizer.json"))
    return copied
