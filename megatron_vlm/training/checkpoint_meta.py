"""Self-describing checkpoints: every checkpoint directory gets ``description.json`` with the
resolved recipe, the resolved model config (structured: the VLM config with its language and
vision sub-configs as dicts) and the tokenizer's path and special ids, so that converting,
evaluating or inspecting a checkpoint needs only its path.

``register`` is called where the model is built (``model_setup.build_model_chunks``),
``write`` by ``checkpoint.save_checkpoint`` on rank 0, ``read`` by whoever loads.
``newest`` / ``check_model_config`` let training resume from a checkpoint path alone and refuse
a recipe whose model is not the checkpoint's (``megatron_vlm/train.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

FILE = "description.json"
FORMAT = 1
_current: Optional[dict] = None


def describe(recipe, vlm_cfg: dict, tokenizer) -> dict:
    from megatron_vlm.data.tokenizer import token_ids

    tok_path = Path(recipe.data.tokenizer).expanduser()
    return {"format": FORMAT,
            "recipe": dataclasses.asdict(recipe),
            "model_config": vlm_cfg,
            "tokenizer": dict(token_ids(tokenizer), path=str(tok_path.resolve()))}


def register(recipe, vlm_cfg: dict, tokenizer) -> None:
    """The description that the next checkpoints of this process get."""
    global _current
    _current = describe(recipe, vlm_cfg, tokenizer)


def write(directory) -> None:
    if _current is not None:
        (Path(directory) / FILE).write_text(json.dumps(_current, indent=1, default=str))


def read(directory) -> Optional[dict]:
    """The description of a checkpoint directory (a ``step_*`` directory), None if it has none
    (checkpoints written before descriptions existed)."""
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("recipe", "model_config", "tokenizer"):
        if key not in description:
            raise ValueError(f"{path}: lacks {key!r}")
    return description


def recipe_from(description: dict, overrides: Optional[list] = None):
    """The saved recipe as a ``Recipe`` (validated again), with ``section.key=value`` overrides."""
    from megatron_vlm.training.recipe import recipe_from_dict

    raw = dict(description["recipe"])
    source = raw.pop("source", "") or "checkpoint description"
    return recipe_from_dict(raw, source, overrides)


def newest(path) -> Optional[tuple]:
    """(step directory, description) of the newest described checkpoint under the root ``path``
    (or ``path`` itself when it is a step directory); None when there is none. Only reads the
    descriptions: the resume itself verifies the checkpoint it loads."""
    from megatron_vlm.training.checkpoint import checkpoint_candidates

    path = Path(path)
    if (path / "meta.json").is_file():
        candidates = [path]
    else:
        candidates = checkpoint_candidates(path) if path.is_dir() else []
    for step_dir in candidates:
        if (step_dir / "meta.json").is_file():
            description = read(step_dir)
            if description is not None:
                return step_dir, description
    return None


def _normalised(value):
    """What ``write`` stores: JSON types (tuples as lists, others as strings)."""
    return json.loads(json.dumps(value, default=str))


def config_differences(ours, saved, where: str = "") -> list:
    """``field: recipe X, checkpoint Y`` for every leaf that differs (dotted field paths).

    Only fields both have are compared: a field added to (or removed from) the model config by a
    later version of the code must not make older checkpoints unusable."""
    if isinstance(ours, dict) and isinstance(saved, dict):
        out = []
        for key in sorted(set(ours) & set(saved), key=str):
            out += config_differences(ours[key], saved[key], f"{where}.{key}" if where else str(key))
        return out
    return [] if ours == saved else [f"{where or 'model config'}: recipe {ours!r}, "
                                     f"checkpoint {saved!r}"]


def check_model_config(recipe, root) -> Optional[Path]:
    """The model the recipe builds must be the one saved in the checkpoint it resumes from
    (``root``: ``checkpoint.dir``); a RecipeError names every differing field. Returns the
    checkpoint compared with (None when ``root`` holds no described checkpoint)."""
    from megatron_vlm.models.vlm import load_vlm_config
    from megatron_vlm.training.recipe import RecipeError

    found = newest(root)
    if found is None:
        return None
    step_dir, description = found
    ours = _normalised(load_vlm_config(recipe.model.config))
    diffs = config_differences(ours, _normalised(description["model_config"]))
    if diffs:
        shown = "; ".join(diffs[:6]) + (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else "")
        raise RecipeError(f"{recipe.source}: model.config {recipe.model.config} is not the model "
                          f"of the checkpoint {step_dir} it would resume: {shown}")
    return step_dir
