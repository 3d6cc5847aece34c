"""Self-describing checkpoints: every checkpoint directory gets ``description.json`` with the
resolved recipe, the resolved model config (structured: the VLM config with its language and
vision sub-configs as dicts) and the tokenizer's path and special ids, so that converting,
evaluating or inspecting a checkpoint needs only its path.

``register`` is called where the model is built (``model_setup.build_model_chunks``),
``write`` by ``checkpoint.save_checkpoint`` on rank 0, ``read`` by whoever loads.
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
