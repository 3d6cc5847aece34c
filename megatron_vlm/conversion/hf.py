"""Our VLM's full (TP=1, PP=1) weights <-> Hugging Face directories that ``transformers`` loads.

Two HF layouts are written by :func:`export_hf`:

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

:func:`hf_to_ours` reads either of them back, and also the released Nemotron Nano V2 VL names
(``language_model.backbone.*``, ``vision_model.radio_model.*``, ``mlp1.*``). An LLM-only directory
gives only the ``language_model.*`` weights; the caller keeps its vision tower and connector.

Semantics ``transformers`` differs in (reported, not converted): it clamps the Mamba step size at
``time_step_min`` (ours only when the model config sets ``mamba_dt_clamp_min``), and its connector
RMSNorm eps is fixed at 1e-5.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch

from megatron_vlm.models import hf_mapping_llm as llm_map
from megatron_vlm.models import hf_mapping_vision as vis_map

Tensors = Dict[str, torch.Tensor]

OMNI_ARCH = "NemotronH_Omni_Reasoning_V3"
LLM_ARCH = "NemotronHForCausalLM"
# Written by nothing of ours, left at transformers' init when the omni model loads our export.
HF_KEYS_NOT_EXPORTED = ("vision_model.embeddings.video_patch_projection.weight",)
_PARTS = ("language_model.", "vision_model.", "vision_projection.")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


# ---- our model ------------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP / Float16Module
        model = model.module
    return model


def full_state(model: torch.nn.Module) -> Tensors:
    """The model's weights (TP=1 model), ``_extra_state`` dropped, detached copies."""
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()
            if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}


def _split(state: Tensors, prefix: str) -> Tensors:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---- configs --------------------------------------------------------------------------------
def llm_hf_config(vlm_cfg: dict, tokenizer=None):
    from transformers import NemotronHConfig

    kwargs = llm_map.hf_config_kwargs(vlm_cfg["language_model"])
    if tokenizer is not None:
        kwargs.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                      bos_token_id=tokenizer.bos_id)
    config = NemotronHConfig(**kwargs)
    config.architectures = [LLM_ARCH]
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


def vlm_hf_config(vlm_cfg: dict, image_token_id: int, tokenizer=None):
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config,
    )

    if abs(vlm_cfg["projector_norm_eps"] - 1e-5) > 1e-12:
        warnings.warn(f"projector_norm_eps={vlm_cfg['projector_norm_eps']}: transformers' "
                      "nemotron_h_omni projector uses 1e-5")
    text = llm_hf_config(vlm_cfg, tokenizer)
    config = NemotronH_Omni_Reasoning_V3_Config(
        text_config=text.to_dict(), vision_config=radio_hf_config_kwargs(vlm_cfg["vision_model"]),
        downsample_ratio=vlm_cfg["downsample_ratio"],
        projector_hidden_size=vlm_cfg["projector_hidden_size"],
        vision_hidden_size=vlm_cfg["vision_model"]["hidden_size"],
        image_token_id=image_token_id, video_temporal_patch_size=2,
    )
    config.architectures = [OMNI_ARCH]
    return config


# ---- weight mapping -------------------------------------------------------------------------
def ours_to_hf_llm(state: Tensors, vlm_cfg: dict) -> Tensors:
    return llm_map.megatron_to_hf(_split(state, "language_model."), vlm_cfg["language_model"])


def ours_to_hf_vlm(state: Tensors, vlm_cfg: dict) -> Tensors:
    """Our full VLM state -> ``nemotron_h_omni`` state dict names."""
    out = {"language_model." + k: v for k, v in ours_to_hf_llm(state, vlm_cfg).items()}
    vision = {k: v for k, v in state.items()
              if k.startswith(("vision_model.", "vision_projection."))}
    out.update(vis_map.vlm_vision_to_hf(
        vision, vlm_cfg["vision_model"]["num_attention_heads"], layout="transformers"))
    # RadioModel's persistent buffer (indices of the summary tokens), as radio_hf_config_kwargs sets.
    num_cls = min(int(vlm_cfg["vision_model"]["class_token_len"]), 3)
    out["vision_model.summary_idxs"] = torch.arange(min(num_cls, 2), dtype=torch.long)
    return out


def detect_layout(keys: Iterable[str]) -> str:
    """``vlm`` (nemotron_h_omni names), ``released`` (Nano V2 VL names) or ``llm``."""
    keys = list(keys)
    if any(k.startswith("vision_model.radio_model.") or k.startswith("mlp1.") for k in keys):
        return "released"
    if any(k.startswith("language_model.") for k in keys):
        return "vlm"
    if any(k.startswith(("model.", "backbone.")) for k in keys):
        return "llm"
    raise ValueError(f"unrecognised HF checkpoint keys, e.g. {sorted(keys)[:5]}")


def hf_to_ours(hf_state: Tensors, vlm_cfg: dict) -> Tuple[Tensors, str]:
    """HF state dict (any layout of :func:`detect_layout`) -> our VLM keys; returns the layout too.
    Raises on keys it does not map (besides the HF-only buffers the vision mapping validates)."""
    layout = detect_layout(hf_state)
    if layout == "llm":
        llm = dict(hf_state)
    else:
        llm = _split(hf_state, "language_model.")
    llm = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v
           for k, v in llm.items()}
    llm_cfg = vlm_cfg["language_model"]
    if "lm_head.weight" not in llm and not llm_cfg["untie_embeddings_and_output_weights"]:
        llm["lm_head.weight"] = llm["model.embeddings.weight"]
    out = {"language_model." + k: v for k, v in llm_map.hf_to_megatron(llm, llm_cfg).items()}
    used = set(llm_map.megatron_to_hf(_split(out, "language_model."), llm_cfg))
    unused = sorted(set(llm) - used)
    if unused:
        raise ValueError(f"unmapped HF language-model keys: {unused[:10]}")
    if layout != "llm":
        rest = {k: v for k, v in hf_state.items() if not k.startswith("language_model.")
                and k not in HF_KEYS_NOT_EXPORTED}
        vis_layout = "released" if layout == "released" else "transformers"
        if vis_layout == "transformers":  # the video embedder has no counterpart in our tower
            rest = {k: v for k, v in rest.items() if "video_patch_projection" not in k}
        out.update(vis_map.vlm_vision_from_hf(
            rest, vlm_cfg["vision_model"]["num_attention_heads"], layout=vis_layout))
        connector_keys = {k for k in rest if not k.startswith("vision_model.")}
        known = {n[vis_layout] for n in vis_map._CONNECTOR_RENAMES.values()}
        if connector_keys - known:
            raise ValueError(f"unmapped HF keys: {sorted(connector_keys - known)[:10]}")
    return out, layout


# ---- files ----------------------------------------------------------------------------------
def write_safetensors(state: Tensors, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      metadata: Optional[dict] = None) -> list:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when larger than
    ``max_shard_bytes``. Returns the written file names."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    shards, current, size = [], {}, 0
    for key in sorted(state):
        t = state[key].detach().contiguous().clone()  # clone: tied tensors may not share storage
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    meta = dict(metadata or {}, format="pt")
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        names.append(name)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names + ["model.safetensors.index.json"]


def read_safetensors(directory: Path) -> Tensors:
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def copy_tokenizer(src: Path, out: Path) -> list:
    src = Path(src)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


def save_hf_dir(out: Path, state: Tensors, config, tokenizer_dir: Optional[Path],
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_safetensors(state, out, max_shard_bytes)
    config.save_pretrained(str(out))
    files.append("config.json")
    if tokenizer_dir is not None:
        files += copy_tokenizer(tokenizer_dir, out)
    return files
