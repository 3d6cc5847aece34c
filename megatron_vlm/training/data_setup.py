"""From a recipe's data section to the packed loader (train) and a fixed set of eval batches."""

from __future__ import annotations

from pathlib import Path

from megatron_vlm.data.loader import DatasetSpec, GlobalBatchLoader, PackedVLMLoader
from megatron_vlm.data.tokenizer import VLMTokenizer
from megatron_vlm.data.video import VideoOptions


def load_tokenizer(recipe) -> VLMTokenizer:
    return VLMTokenizer.from_pretrained(recipe.data.tokenizer)


def _dataset_name(path: str, index: int) -> str:
    parts = [p for p in Path(path.split("::")[0]).parts if p not in ("train", "eval", "shards")]
    return f"{index}-{parts[-1] if parts else 'data'}"


def video_options(recipe, train: bool = True) -> VideoOptions:
    """The recipe's ``video`` section; evaluation uses the target rate, never a random draw."""
    v = getattr(recipe, "video", None)
    if v is None:
        return VideoOptions()
    return VideoOptions(fps=v.fps, max_frames=v.max_frames, backend=v.backend, evs_rate=v.evs_rate,
                        evs_rate_sampling=v.evs_rate_sampling if train else "fixed")


def _loader(recipe, sources, tokenizer, vision: dict, dp_rank: int, dp_size: int,
            train: bool = True, **kwargs) -> PackedVLMLoader:
    specs = [DatasetSpec(_dataset_name(s.path, i), s.path, s.weight) for i, s in enumerate(sources)]
    return PackedVLMLoader(
        specs, tokenizer, seq_length=recipe.data.seq_length,
        micro_batch_size=recipe.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        tile_size=vision["tile_size"], patch_size=vision["patch_size"],
        pixel_shuffle_ratio=vision.get("pixel_shuffle_ratio", 0.5), video=video_options(recipe, train),
        pad_multiple=2 * recipe.parallel.cp if recipe.parallel.cp > 1 else 1, **kwargs)


def build_train_loader(recipe, tokenizer, model_cfg: dict, dp_rank: int, dp_size: int,
                       per_rank: bool = False):
    """The training loader: global batches split across DP ranks (resumable at any DP size), or
    with ``per_rank`` the older per-DP-rank streams (to resume checkpoints saved with them)."""
    if per_rank:
        return _loader(recipe, recipe.data.blend, tokenizer, model_cfg["vision"], dp_rank, dp_size,
                       seed=recipe.data.seed)
    group = _loader(recipe, recipe.data.blend, tokenizer, model_cfg["vision"], 0, 1,
                    seed=recipe.data.seed)
    per_step = recipe.train.global_batch_size // (recipe.train.micro_batch_size * dp_size)
    return GlobalBatchLoader(group, dp_rank, dp_size, per_step)


def build_eval_batches(recipe, tokenizer, model_cfg: dict, dp_rank: int, dp_size: int,
                       reader: bool = True) -> dict:
    """Per eval dataset, the first ``eval.batches`` micro-batches of one unshuffled pass.

    The same batches are used at every evaluation of the stage, so eval losses are comparable.
    Every DP rank gets the same number of batches (padding with repeats) so the collective
    schedule stays in step. Ranks that are not their group's data reader (``reader=False``) get
    None placeholders: the reader broadcasts each batch (training/batch_io.py).
    """
    out = {}
    for i, source in enumerate(recipe.data.eval):
        if not reader:
            out[_dataset_name(source.path, i).split("-", 1)[1]] = [None] * recipe.eval.batches
            continue
        loader = _loader(recipe, [source], tokenizer, model_cfg["vision"], dp_rank, dp_size,
                         seed=recipe.data.seed, shuffle=False, num_epochs=1, train=False)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == recipe.eval.batches:
                break
        loader.close()
        if not batches:
            raise ValueError(f"{recipe.source}: data.eval[{i}] ({source.path}) gave no batch "
                             f"for data-parallel rank {dp_rank}")
        while len(batches) < recipe.eval.batches:
            batches.append(batches[len(batches) % max(1, len(batches))])
        out[_dataset_name(source.path, i).split("-", 1)[1]] = batches
    return out
