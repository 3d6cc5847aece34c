"""Weight mapping between Hugging Face checkpoints and our vision tower + connector.

Full (unsharded, i.e. TP=1) tensors in both directions; resharding to other layouts goes through
megatron dist_checkpointing. Keys on our side are relative to the tower (``RadioVisionTower``)
and to the connector (``VisionConnector``); inside the VLM they sit under ``vision_model.`` and
``vision_projection.``.

Two HF layouts are understood:

``released``  the Nemotron Nano V2 VL checkpoint (RADIO remote code, timm block names), keys
              relative to ``vision_model.``: ``radio_model.model.patch_generator.embedder.weight``,
              ``...patch_generator.pos_embed`` [1, R*C, h], ``...patch_generator.cls_token.token``,
              ``radio_model.model.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``
              (fused qkv = [q; k; v] over all heads); connector ``mlp1.{0,1,3}.weight``.
``transformers``  ``transformers``' ``RadioModel`` / ``nemotron_h_omni``: ``embeddings.*``,
              ``encoder.layer.{i}.{norm1,attention.{q,k,v,o}_proj,norm2,mlp.fc1,mlp.fc2}`` and
              ``multi_modal_projector.{layer_norm,linear_1,linear_2}.weight``.

Ours (megatron): ``linear_qkv`` interleaves per attention head ``[q_h; k_h; v_h]`` (megatron's
query-group layout with one head per group), so HF's q/k/v are regrouped by head. Per-layer
pre-norms live inside the first linear of each block (``layer_norm_weight/bias``).

The rename tables below become mapping rules (:func:`vision_rules`, :func:`connector_rules`,
``megatron_vlm.conversion.mapping``) that every function here walks, in both directions.

Not part of our model, so dropped on import (and checked where it matters): the input
conditioner (normalisation is done in preprocessing; its mean/std must be CLIP's), ``summary_idxs``,
the LayerScale factors of ``transformers``' RadioModel (must be 1: C-RADIO has no LayerScale) and
the video patch embedder.
"""

import re
from typing import Dict, List, Tuple

import torch

from megatron_vlm.media_format import CLIP_MEAN, CLIP_STD

LAYOUTS = ("released", "transformers")

# Per-layer tensors other than qkv: our suffix -> HF suffix per layout.
_LAYER_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": {"released": "norm1.weight", "transformers": "norm1.weight"},
    "self_attention.linear_qkv.layer_norm_bias": {"released": "norm1.bias", "transformers": "norm1.bias"},
    "self_attention.linear_proj.weight": {"released": "attn.proj.weight", "transformers": "attention.o_proj.weight"},
    "self_attention.linear_proj.bias": {"released": "attn.proj.bias", "transformers": "attention.o_proj.bias"},
    "mlp.linear_fc1.layer_norm_weight": {"released": "norm2.weight", "transformers": "norm2.weight"},
    "mlp.linear_fc1.layer_norm_bias": {"released": "norm2.bias", "transformers": "norm2.bias"},
    "mlp.linear_fc1.weight": {"released": "mlp.fc1.weight", "transformers": "mlp.fc1.weight"},
    "mlp.linear_fc1.bias": {"released": "mlp.fc1.bias", "transformers": "mlp.fc1.bias"},
    "mlp.linear_fc2.weight": {"released": "mlp.fc2.weight", "transformers": "mlp.fc2.weight"},
    "mlp.linear_fc2.bias": {"released": "mlp.fc2.bias", "transformers": "mlp.fc2.bias"},
}

_TOWER_RENAMES = {
    "embedder.weight": {"released": "radio_model.model.patch_generator.embedder.weight",
                        "transformers": "embeddings.patch_projection.weight"},
    "position_embeddings": {"released": "radio_model.model.patch_generator.pos_embed",
                            "transformers": "embeddings.position_embedding"},
    "class_token": {"released": "radio_model.model.patch_generator.cls_token.token",
                    "transformers": "embeddings.cls_register_token"},
}

_LAYER_PREFIX = {"released": "radio_model.model.blocks.{}.", "transformers": "encoder.layer.{}."}

_CONNECTOR_RENAMES = {
    "encoder.linear_fc1.layer_norm_weight": {"released": "mlp1.0.weight",
                                             "transformers": "multi_modal_projector.layer_norm.weight"},
    "encoder.linear_fc1.weight": {"released": "mlp1.1.weight",
                                  "transformers": "multi_modal_projector.linear_1.weight"},
    "encoder.linear_fc2.weight": {"released": "mlp1.3.weight",
                                  "transformers": "multi_modal_projector.linear_2.weight"},
}

# HF keys that carry no weights of ours; checked or dropped on import.
_DROPPED = {
    "released": (r"radio_model\.input_conditioner\.norm_(mean|std)", r"radio_model\.summary_idxs",
                 r"radio_model\.model\.patch_generator\.video_embedder\..*",
                 r"radio_model\.model\.blocks\.\d+\.layer_scale[12]\.lambda1"),
    "transformers": (r"input_conditioner\.norm_(mean|std)", r"summary_idxs",
                     r"embeddings\.video_patch_projection\..*", r"encoder\.layer\.\d+\.layer_scale[12]\.lambda1"),
}


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown HF layout {layout!r}; expected one of {LAYOUTS}")


def _without_extra_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def _walk(rules: list, state: Dict[str, torch.Tensor], side: str, what: str) -> Dict[str, torch.Tensor]:
    """``state`` (HF names when ``side`` is "hf", else ours) through the rules; raises naming the
    keys no rule takes."""
    from megatron_vlm.conversion.mapping import to_hf, to_ours

    extra = sorted(set(state) - {k for r in rules for k in getattr(r, side)})
    if extra:
        raise ValueError(f"unmapped {what} keys: {extra[:10]}")
    return to_ours(rules, state) if side == "hf" else to_hf(rules, state)


def _qkv_names(layout: str, kind: str) -> Tuple[str, ...]:
    if layout == "released":
        return (f"attn.qkv.{kind}",)
    return tuple(f"attention.{p}_proj.{kind}" for p in "qkv")


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate q, k, v ([heads*d, ...] each) -> megatron's per-head [q_h; k_h; v_h] layout."""
    parts = [t.reshape(num_heads, t.shape[0] // num_heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: megatron's fused qkv -> (q, k, v)."""
    per_head = qkv.reshape(num_heads, 3, qkv.shape[0] // (3 * num_heads), *qkv.shape[1:])
    return tuple(per_head[:, i].reshape(-1, *qkv.shape[1:]) for i in range(3))


def _num_layers(hf_state: Dict[str, torch.Tensor], layout: str) -> int:
    pattern = re.compile("^" + re.escape(_LAYER_PREFIX[layout]).replace(r"\{\}", r"(\d+)"))
    indices = {int(m.group(1)) for key in hf_state if (m := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise ValueError(f"HF checkpoint has non-contiguous layer indices {sorted(indices)}")
    return len(indices)


def _check_dropped(hf_state: Dict[str, torch.Tensor], layout: str) -> List[str]:
    """Validate the HF-only tensors we drop; returns their keys."""
    dropped = [k for k in hf_state if is_dropped(k, layout)]
    for key in dropped:
        check_dropped(key, hf_state[key])
    return dropped


def vision_hf_to_megatron(hf_state: Dict[str, torch.Tensor], num_heads: int,
                          layout: str = "released") -> Dict[str, torch.Tensor]:
    """HF tower weights (keys relative to the vision model) -> our tower's full state dict.

    Raises on keys it does not know, so a checkpoint with a different architecture fails loudly.
    """
    _check_layout(layout)
    hf_state = dict(hf_state)
    for key in _check_dropped(hf_state, layout):
        hf_state.pop(key)
    rules = vision_rules(_num_layers(hf_state, layout), num_heads, layout)
    return _walk(rules, hf_state, "hf", "HF vision")


def vision_megatron_to_hf(state: Dict[str, torch.Tensor], num_heads: int,
                          layout: str = "released") -> Dict[str, torch.Tensor]:
    """Our tower's full state dict -> HF tower weights (without conditioner / summary buffers)."""
    state = _without_extra_state(state)
    layers = len({k.split(".")[2] for k in state if k.startswith("decoder.layers.")})
    return _walk(vision_rules(layers, num_heads, layout), state, "ours", "vision tower")


def connector_hf_to_megatron(hf_state: Dict[str, torch.Tensor],
                             layout: str = "released") -> Dict[str, torch.Tensor]:
    """HF projector weights -> our connector's state dict (raises on unknown keys)."""
    return _walk(connector_rules(layout), dict(hf_state), "hf", "HF connector")


def connector_megatron_to_hf(state: Dict[str, torch.Tensor],
                             layout: str = "released") -> Dict[str, torch.Tensor]:
    return _walk(connector_rules(layout), _without_extra_state(state), "ours", "connector")


def load_full_state(module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy a full (TP=1) state dict into ``module`` built at TP=1, checking every parameter.

    Only ``_extra_state`` entries (TE / megatron metadata) may be absent from ``state``.
    """
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"state does not match the module: missing {missing[:10]}, "
                         f"unexpected {result.unexpected_keys[:10]}")


# Prefixes inside a whole VLM checkpoint (both HF layouts keep the tower under ``vision_model.``).
_HF_VISION_PREFIX = "vision_model."
_OURS_PREFIXES = {"vision": "vision_model.", "connector": "vision_projection."}


def vlm_vision_from_hf(hf_state: Dict[str, torch.Tensor], num_heads: int,
                       layout: str = "released") -> Dict[str, torch.Tensor]:
    """Vision + connector part of a whole HF VLM state dict -> our VLM keys
    (``vision_model.*``, ``vision_projection.*``). Other keys (the language model's) are left to
    the LLM's converter; unknown keys under ``vision_model.`` raise."""
    _check_layout(layout)
    connector_names = {names[layout] for names in _CONNECTOR_RENAMES.values()}
    vision, connector = {}, {}
    for key, value in hf_state.items():
        if key.startswith(_HF_VISION_PREFIX):
            vision[key[len(_HF_VISION_PREFIX):]] = value
        elif key in connector_names:
            connector[key] = value
    out = {_OURS_PREFIXES["vision"] + k: v
           for k, v in vision_hf_to_megatron(vision, num_heads, layout).items()}
    out.update({_OURS_PREFIXES["connector"] + k: v
                for k, v in connector_hf_to_megatron(connector, layout).items()})
    return out


def vlm_vision_to_hf(state: Dict[str, torch.Tensor], num_heads: int,
                     layout: str = "released") -> Dict[str, torch.Tensor]:
    """Our VLM's ``vision_model.*`` / ``vision_projection.*`` tensors -> HF VLM keys."""
    parts = {name: {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
             for name, p in _OURS_PREFIXES.items()}
    out = {_HF_VISION_PREFIX + k: v
           for k, v in vision_megatron_to_hf(parts["vision"], num_heads, layout).items()}
    out.update(connector_megatron_to_hf(parts["connector"], layout))
    return out


# ---- the same tables as mapping rules (streaming export / import, both directions) ----------
def _qkv_rule(i: int, num_heads: int, layout: str, kind: str):
    from megatron_vlm.conversion.mapping import Rule

    hf_prefix = _LAYER_PREFIX[layout].format(i)
    hf = tuple(hf_prefix + n for n in _qkv_names(layout, kind))
    ours = (f"decoder.layers.{i}.self_attention.linear_qkv.{kind}",)
    if layout == "released":
        return Rule(ours, hf, lambda t: (torch.cat(split_qkv(t, num_heads), dim=0),),
                    lambda t: (interleave_qkv(*t.chunk(3, dim=0), num_heads),))
    return Rule(ours, hf, lambda t: split_qkv(t, num_heads),
                lambda q, k, v: (interleave_qkv(q, k, v, num_heads),))


def _position_rule(layout: str):
    """Ours [1, R*C, h]; the released / transformers tensor may be stored without the 1."""
    from megatron_vlm.conversion.mapping import Rule

    return Rule(("position_embeddings",), (_TOWER_RENAMES["position_embeddings"][layout],),
                lambda t: (t,), lambda t: (t.unsqueeze(0) if t.dim() == 2 else t,))


def vision_rules(num_layers: int, num_heads: int, layout: str) -> list:
    """Our tower (keys relative to it) <-> HF tower keys relative to ``vision_model.``.

    Ordered parameter by parameter over the layers, so a reader of megatron's stacked layer
    tensors (``decoder.layers.<param>`` [L, ...]) meets each stacked tensor in one run.
    """
    from megatron_vlm.conversion.mapping import rename

    _check_layout(layout)
    rules = [rename(o, n[layout]) for o, n in _TOWER_RENAMES.items() if o != "position_embeddings"]
    rules.append(_position_rule(layout))
    for kind in ("weight", "bias"):
        rules += [_qkv_rule(i, num_heads, layout, kind) for i in range(num_layers)]
    for ours, names in _LAYER_RENAMES.items():
        rules += [rename(f"decoder.layers.{i}.{ours}", _LAYER_PREFIX[layout].format(i) + names[layout])
                  for i in range(num_layers)]
    return rules


def connector_rules(layout: str) -> list:
    from megatron_vlm.conversion.mapping import rename

    _check_layout(layout)
    return [rename(o, n[layout]) for o, n in _CONNECTOR_RENAMES.items()]


def vlm_vision_rules(num_layers: int, num_heads: int, layout: str) -> list:
    """Our VLM's ``vision_model.*`` / ``vision_projection.*`` <-> whole-VLM HF keys."""
    from megatron_vlm.conversion.mapping import with_prefixes

    return (with_prefixes(vision_rules(num_layers, num_heads, layout), _OURS_PREFIXES["vision"],
                          _HF_VISION_PREFIX)
            + with_prefixes(connector_rules(layout), _OURS_PREFIXES["connector"], ""))


def is_dropped(key: str, layout: str) -> bool:
    """HF-only tensors (keys relative to the tower) that carry no weights of ours."""
    return any(re.fullmatch(p, key) for p in _DROPPED[layout])


def check_dropped(key: str, value: torch.Tensor) -> None:
    """Validate one dropped HF-only tensor: CLIP statistics (our preprocessing normalises), a
    LayerScale of exactly 1 (C-RADIO has none; transformers' RadioModel writes ones)."""
    value = value.float()
    if key.endswith("norm_mean") or key.endswith("norm_std"):
        expected = torch.tensor(CLIP_MEAN if key.endswith("mean") else CLIP_STD)
        if not torch.allclose(value.flatten(), expected, atol=1e-6):
            raise ValueError(f"{key} = {value.flatten().tolist()} differs from the CLIP "
                             f"statistics our preprocessing uses ({expected.tolist()})")
    if "layer_scale" in key and not torch.all(value == 1):
        raise ValueError(f"{key} is not 1: this checkpoint has LayerScale, which our tower lacks")
