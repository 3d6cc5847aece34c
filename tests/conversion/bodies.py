"""Bodies run under torchrun (tests/multiproc.py) by the conversion tests."""

from __future__ import annotations

import os

import torch


def _model(workdir: str, recipe: str, checkpoint: str, overrides: list):
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.training.checkpoint import latest_checkpoint, load_checkpoint
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.recipe import load_recipe

    os.chdir(workdir)
    recipe = load_recipe(recipe, overrides + ["parallel.tp=1"])
    initialize_distributed()
    chunks, tokenizer, model_cfg = build_model_chunks(recipe)
    load_checkpoint(latest_checkpoint(checkpoint), chunks)
    chunks[0].eval()
    return chunks[0], tokenizer, model_cfg


def _batches(tokenizer, model_cfg, vocab: int):
    """A text batch and an image+text batch (3 tiles: 2 in row 0, 1 in row 1)."""
    g = torch.Generator().manual_seed(0)
    specials = {tokenizer.image_id, tokenizer.img_start_id, tokenizer.img_end_id}
    text = torch.randint(0, vocab, (2, 96), generator=g)
    for s in specials:
        text[text == s] = 100
    vision = model_cfg["vision"]
    tile = vision["tile_size"]
    per_tile = int((tile // vision["patch_size"]) ** 2 * vision["pixel_shuffle_ratio"] ** 2)
    mm = text.clone()
    for row, start, n in ((0, 5, 1), (0, 40, 1), (1, 10, 1)):
        mm[row, start - 1] = tokenizer.img_start_id
        mm[row, start:start + n * per_tile] = tokenizer.image_id
        mm[row, start + n * per_tile] = tokenizer.img_end_id
    tiles = torch.randn(3, 3, tile, tile, generator=g)
    return text, mm, tiles


def _packed_patches(tiles: torch.Tensor, patch: int):
    n, c, h, w = tiles.shape
    p = tiles.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    grid = torch.tensor([[h // patch, w // patch]] * n)
    return p.reshape(-1, c * patch * patch), grid


@torch.no_grad()
def compare_with_transformers(workdir: str, recipe: str, checkpoint: str, overrides: list,
                              llm_dir: str, vlm_dir: str) -> dict:
    """Max |logits diff| of our model (from the megatron checkpoint) against transformers' models
    loaded from the exported directories, on a text batch and an image+text batch."""
    from transformers import AutoModelForImageTextToText, NemotronHForCausalLM

    model, tokenizer, model_cfg = _model(workdir, recipe, checkpoint, overrides)
    vocab = model_cfg["vlm"]["language_model"]["vocab_size"]
    text, mm, tiles = _batches(tokenizer, model_cfg, vocab)
    ours_text = model(text)[..., :vocab]
    ours_mm = model(mm, tiles=tiles)[..., :vocab]
    out = {"logit_scale": ours_text.abs().max().item(),
           "mm_vs_text_rows": (ours_mm - ours_text).abs().max().item()}

    llm, info = NemotronHForCausalLM.from_pretrained(llm_dir, output_loading_info=True,
                                                     attn_implementation="eager")
    out["llm_loading"] = {k: sorted(map(str, v)) for k, v in info.items()}
    out["llm_text_diff"] = (llm.eval()(input_ids=text, use_cache=False).logits
                            - ours_text).abs().max().item()

    vlm, info = AutoModelForImageTextToText.from_pretrained(vlm_dir, output_loading_info=True,
                                                            attn_implementation="eager")
    vlm.eval()
    out["vlm_class"] = type(vlm).__name__
    out["vlm_loading"] = {k: sorted(map(str, v)) for k, v in info.items()}
    out["vlm_text_diff"] = (vlm(input_ids=text, use_cache=False).logits - ours_text).abs().max().item()
    pixels, grid = _packed_patches(tiles, model_cfg["vision"]["patch_size"])
    hf_mm = vlm(input_ids=mm, pixel_values=pixels, image_grid_hw=grid, use_cache=False).logits
    out["vlm_image_diff"] = (hf_mm - ours_mm).abs().max().item()
    # Greedy tokens of the trained model: ours (full re-forward) vs plain transformers generate
    # (its KV and SSM caches) for the LLM export and the VLM export, on text and with images.
    from megatron_vlm.conversion.verify import greedy_both

    prompt = text[:1, :24]
    out["greedy_llm"] = greedy_both(model, llm, prompt, 12, tokenizer.eos_id, tokenizer.vocab_size)
    out["greedy_vlm"] = greedy_both(model, vlm, prompt, 12, tokenizer.eos_id, tokenizer.vocab_size)
    end = int((mm[1] == tokenizer.img_end_id).nonzero()[0]) + 4  # row 1: its one tile, then text
    pix1, grid1 = _packed_patches(tiles[2:3], model_cfg["vision"]["patch_size"])
    out["greedy_vlm_image"] = greedy_both(model, vlm, mm[1:2, :end], 12, tokenizer.eos_id,
                                          tokenizer.vocab_size, tiles=tiles[2:3],
                                          pixel_values=pix1, image_grid_hw=grid1)
    # Negative control: a small change to one HF weight (one attention output projection, 1e-3
    # per element against weights of ~0.02) must show up far above the tolerance.
    o_proj = vlm.language_model.model.layers[1].mixer.o_proj.weight
    o_proj.add_(1e-3)
    out["perturbed_diff"] = (vlm(input_ids=text, use_cache=False).logits - ours_text).abs().max().item()
    return out


def state_diffs(workdir: str, recipe: str, overrides: list, a: str, b: str) -> dict:
    """Per-tensor comparison of two checkpoints' model weights (TP=1 load), and how many tensors of
    ``a`` differ from a fresh initialisation (so equality is not trivially that of two inits)."""
    from megatron_vlm.conversion.hf import full_state
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.recipe import load_recipe

    model_a, _, _ = _model(workdir, recipe, a, overrides)
    sa = full_state(model_a)
    model_b, _, _ = _model(workdir, recipe, b, overrides)
    sb = full_state(model_b)
    fresh = full_state(build_model_chunks(load_recipe(recipe, overrides + ["parallel.tp=1"]))[0][0])
    not_equal = sorted(k for k in sa if k in sb and not torch.equal(sa[k], sb[k]))
    return {"keys_a": len(sa), "keys_b": len(sb), "only_a": sorted(set(sa) - set(sb)),
            "only_b": sorted(set(sb) - set(sa)), "not_equal": not_equal,
            "changed_by_training": sum(not torch.equal(sa[k], fresh[k]) for k in sa),
            "numel": sum(v.numel() for v in sa.values())}


def save_random_vlm(root: str, tp: int, pp: int) -> dict:
    """The tiny VLM, freshly initialised at TP x PP, saved as a training checkpoint would be."""
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.models.vlm import build_vlm
    from megatron_vlm.training.checkpoint import save_checkpoint
    from tests.conversion.conftest import REPO

    initialize_distributed(tp=tp, pp=pp)
    model = build_vlm(str(REPO / "recipes/models/vlm_tiny.yaml"), image_token_id=7,
                      use_cpu_initialization=True)
    path = save_checkpoint(root, 0, [model], meta={"layout": f"tp={tp} pp={pp}"})
    return {"path": str(path), "local_params": sum(p.numel() for p in model.parameters())}
