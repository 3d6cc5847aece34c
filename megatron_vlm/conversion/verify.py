"""Our model vs its ``transformers`` export on the same random tokens and tiles.

``compare`` returns the max |logit difference| over a text batch and, for a whole-VLM export, an
image+text batch (tiles written over ``<img><image>..</img>`` placeholders). The HF side is plain
``transformers``: ``NemotronHForCausalLM`` or ``AutoModelForImageTextToText``, eager attention,
fp32, no cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron_vlm.conversion.hf import LLM_ARCH
from megatron_vlm.data.tiling import tokens_per_tile


def random_inputs(vlm_cfg: dict, ids: dict, tile_size: int, seq: int = 64, seed: int = 0,
                  specials=()) -> dict:
    """A text batch [2, seq] of ids the tokenizer has (special VLM tokens excluded) and the same
    batch with 3 tiles' placeholders (2 in row 0, 1 in row 1) plus those tiles."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(ids["vocab_size"], vlm_cfg["language_model"]["vocab_size"])
    per_tile = tokens_per_tile(tile_size, vlm_cfg["vision_model"]["patch_size"],
                               vlm_cfg["downsample_ratio"])
    seq = max(seq, 3 * (per_tile + 2) + 4)
    text = torch.randint(0, vocab, (2, seq), generator=g)
    image, start, end = ids["image_id"], ids.get("img_start_id"), ids.get("img_end_id")
    for s in {image, start, end, *specials} - {None}:
        text[text == s] = (s + 1) % vocab if (s + 1) % vocab not in (image, start, end) else 0
    mm = text.clone()
    positions = ((0, 1), (0, 1 + per_tile + 2), (1, 2))
    for row, at in positions:
        if start is not None:
            mm[row, at] = start
        mm[row, at + 1:at + 1 + per_tile] = image
        if end is not None:
            mm[row, at + 1 + per_tile] = end
    tiles = torch.randn(len(positions), 3, tile_size, tile_size, generator=g)
    return {"text": text, "mm": mm, "tiles": tiles}


def packed_patches(tiles: torch.Tensor, patch: int):
    """Tiles [n, c, h, w] -> (patches [n*(h/p)*(w/p), c*p*p], image_grid_hw [n, 2]) for the omni
    model's packed-patch input."""
    n, c, h, w = tiles.shape
    p = tiles.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    grid = torch.tensor([[h // patch, w // patch]] * n)
    return p.reshape(-1, c * patch * patch), grid


def load_hf(hf_dir: Path):
    """The exported directory as a transformers model (fp32, eager attention, eval mode)."""
    from transformers import AutoModelForImageTextToText, NemotronHForCausalLM

    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json")
    try:
        arch = (json.loads(config_file.read_text()).get("architectures") or [""])[0]
    except ValueError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    cls = NemotronHForCausalLM if arch == LLM_ARCH else AutoModelForImageTextToText
    return cls.from_pretrained(str(hf_dir), attn_implementation="eager",
                               dtype=torch.float32).eval()


@torch.no_grad()
def compare(model: torch.nn.Module, hf_model, vlm_cfg: dict, ids: dict, tile_size: int,
            seq: int = 64, seed: int = 0) -> dict:
    """Max |logits(ours) - logits(HF)| per batch, over the true vocabulary."""
    vocab = vlm_cfg["language_model"]["vocab_size"]
    inputs = random_inputs(vlm_cfg, ids, tile_size, seq, seed)
    model.eval()
    out = {}
    ours_text = model(inputs["text"])[..., :vocab].float()
    hf_text = hf_model(input_ids=inputs["text"], use_cache=False).logits.float()
    out["text"] = (ours_text - hf_text).abs().max().item()
    out["logit_scale"] = ours_text.abs().max().item()
    if not isinstance(hf_model.config.architectures, list) or \
            hf_model.config.architectures[0] != LLM_ARCH:
        ours_mm = model(inputs["mm"], tiles=inputs["tiles"])[..., :vocab].float()
        pixels, grid = packed_patches(inputs["tiles"], vlm_cfg["vision_model"]["patch_size"])
        hf_mm = hf_model(input_ids=inputs["mm"], pixel_values=pixels, image_grid_hw=grid,
                         use_cache=False).logits.float()
        out["image"] = (ours_mm - hf_mm).abs().max().item()
    out["max"] = max(v for k, v in out.items() if k != "logit_scale")
    return out


@torch.no_grad()
def greedy_both(model: torch.nn.Module, hf_model, prompt: torch.Tensor, new_tokens: int,
                eos_id: Optional[int], vocab_limit: Optional[int] = None, tiles=None,
                **hf_inputs) -> tuple:
    """Greedy continuations of one prompt [1, s]: ours (full re-forward per token, as
    ``evaluation.generate``) and plain ``transformers`` ``generate`` (its KV / SSM caches, the
    exported generation_config). Both stop after ``eos_id`` (included) or ``new_tokens``."""
    from megatron_vlm.evaluation.generate import greedy_generate

    result = greedy_generate(model, prompt[0].tolist(), tiles=tiles, max_new_tokens=new_tokens,
                             stop_ids=() if eos_id is None else (eos_id,), vocab_limit=vocab_limit)
    ours = result.tokens + ([result.stop_token] if result.stop_reason == "stop_id" else [])
    hf = hf_model.generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False, **hf_inputs)
    return ours, hf[0, prompt.shape[1]:].tolist()
