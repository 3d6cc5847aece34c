"""Evaluate a stage's checkpoint by generation: on eval shards of your own, or the demo tasks.

    python -m megatron_vlm.cli.evaluate --recipe recipes/tiny/stage1.yaml --checkpoint runs/tiny/stage1 \\
        [--tasks ocr chart code ... NAME=SHARD_DIR ...] [--limit 20] [--out scores.json] \\
        [--details preds.json] [section.key=value ...]

One process, TP=1 / PP=1 (the checkpoint may have been saved at any TP/PP layout: megatron's
dist_checkpointing reshards the weights on load). Builds the recipe's model, loads the weights of
the latest checkpoint under ``--checkpoint`` (default: the recipe's ``checkpoint.dir``; a
checkpoint directory itself is accepted too), and runs the tasks of ``--tasks``, else of the
recipe's ``eval.tasks``. A task is a demo task name or ``[NAME=]DIR``, eval shards of your own
built by ``build_shards`` (reference: each record's ``answer``, else its last assistant turn;
scores ``NAME_acc``, exact match, and ``NAME_anls``, ANLS). Demo data come from the demo
directory of the recipe's data paths (the parent of ``shards/``; ``--data-root`` to override).
Prints one line per task and the scores as JSON, and writes them to ``--out`` (a flat
{key: number} dict, e.g. ``{"ocr_acc": 0.4, "code_ppl": 9.1}``).
Scoring and data sources: ``megatron_vlm/evaluation/tasks.py``.

Exit status: 0 done, 2 bad recipe / arguments / data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megatron_vlm.known_warnings import ignore_known_noise

ignore_known_noise()

# Single-process evaluation layout, whatever the stage trained at.
EVAL_LAYOUT = ["parallel.tp=1", "parallel.pp=1", "parallel.cp=1",
               "parallel.sequence_parallel=false"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None,
                    help="stage recipe YAML (default: the one saved in --checkpoint)")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint root (its latest checkpoint is loaded) or one checkpoint "
                         "directory; default: the recipe's checkpoint.dir")
    ap.add_argument("--tasks", nargs="+", default=None,
                    help="tasks to run: demo task names (ocr chart table multi_image video text "
                         "code needle) and/or [NAME=]DIR eval shards of your own "
                         "(default: the recipe's eval.tasks)")
    ap.add_argument("--limit", type=int, default=20,
                    help="samples per task, the first ones of each eval set (default 20; 0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation cap (default: the recipe's eval.max_new_tokens)")
    ap.add_argument("--slack", type=int, default=4,
                    help="tokens allowed beyond the reference answer's length (default 4)")
    ap.add_argument("--data-root", default=None,
                    help="demo data directory (default: derived from the recipe's data paths)")
    ap.add_argument("--out", default=None, help="write the scores JSON here")
    ap.add_argument("--details", default=None,
                    help="write per-task timings and per-sample predictions (JSON) here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: $OMP_NUM_THREADS, else 1)")
    ap.add_argument("--allow-random-init", action="store_true",
                    help="evaluate freshly initialised weights when no checkpoint exists")
    ap.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    return ap


def _resolve_checkpoint(path: Path):
    """None where nothing was saved yet (``--allow-random-init``); a damaged one raises."""
    from megatron_vlm.training.checkpoint import latest_checkpoint, resolve_checkpoint

    if (path / "meta.json").is_file():
        return resolve_checkpoint(path)
    return latest_checkpoint(path) if path.is_dir() else None


def _saved_recipe(checkpoint, overrides):
    """The recipe a self-describing checkpoint was trained with (checkpoint_meta)."""
    from megatron_vlm.training import checkpoint_meta
    from megatron_vlm.training.recipe import RecipeError

    ckpt = _resolve_checkpoint(Path(checkpoint)) if checkpoint else None
    description = checkpoint_meta.read(ckpt) if ckpt is not None else None
    if description is None:
        raise RecipeError(f"--recipe is needed: {checkpoint or 'no --checkpoint'} holds no "
                          f"{checkpoint_meta.FILE}")
    return checkpoint_meta.recipe_from(description, overrides)


def _record_builder():
    """The shard builder's record tiling, for demo tasks whose eval shards were not built."""
    try:
        from megatron_vlm.data_prep.records import tile_record
    except ImportError:  # an installation without the data-preparation tools
        return None
    return tile_record


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_vlm.evaluation.tasks import EvalDataError, evaluate_tasks, find_data_root
    from megatron_vlm.training.recipe import RecipeError, load_recipe

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    try:
        recipe = (load_recipe(args.recipe, list(args.overrides) + EVAL_LAYOUT) if args.recipe
                  else _saved_recipe(args.checkpoint, list(args.overrides) + EVAL_LAYOUT))
    except RecipeError as e:
        print(f"recipe error: {e}", file=sys.stderr)
        return 2
    tasks = args.tasks if args.tasks is not None else list(recipe.eval.tasks)
    if args.limit < 0:
        print("--limit must be >= 0", file=sys.stderr)
        return 2
    limit = args.limit or None
    max_new = args.max_new_tokens if args.max_new_tokens is not None else recipe.eval.max_new_tokens
    data_root = Path(args.data_root) if args.data_root else find_data_root(recipe)
    ckpt_root = Path(args.checkpoint or recipe.checkpoint.dir)
    scores: dict = {}
    if not tasks:
        print(f"{recipe.name}: no eval tasks (set eval.tasks in the recipe or pass --tasks)")
    else:
        import torch

        from megatron_vlm.data.tiling import tokens_per_tile
        from megatron_vlm.distributed import destroy_distributed, initialize_distributed
        from megatron_vlm.platform import cpu_mode, setup_platform
        from megatron_vlm.training.checkpoint import load_checkpoint
        from megatron_vlm.training.data_setup import video_options
        from megatron_vlm.training.model_setup import build_model_chunks

        from megatron_vlm.training.checkpoint import CheckpointError

        torch.set_num_threads(max(1, threads))
        try:
            ckpt = _resolve_checkpoint(ckpt_root)
        except CheckpointError as e:  # damaged checkpoints only: one line, not a traceback
            print(f"checkpoint error: {e}", file=sys.stderr)
            return 2
        if ckpt is None and not args.allow_random_init:
            print(f"no complete checkpoint under {ckpt_root}", file=sys.stderr)
            return 2
        setup_platform()
        if cpu_mode():
            recipe.train.precision = "fp32"  # CPU evaluates in fp32 (loads bf16 weights too)
        elif recipe.train.precision == "fp8":
            recipe.train.precision = "bf16"  # fp8 GEMMs want lengths in multiples of 16
        start = time.perf_counter()
        initialize_distributed(seed=recipe.train.seed, single_process=True)
        try:
            try:
                (model,), tokenizer, model_cfg = build_model_chunks(recipe)
            except RecipeError as e:
                print(f"recipe error: {e}", file=sys.stderr)
                return 2
            if ckpt is not None:
                try:
                    load_checkpoint(ckpt, [model])  # weights only
                except CheckpointError as e:
                    print(f"checkpoint error: {e}", file=sys.stderr)
                    return 2
            model.eval()
            vision = model_cfg["vision"]
            per_tile = tokens_per_tile(vision["tile_size"], vision["patch_size"],
                                       vision["pixel_shuffle_ratio"])
            print(f"{recipe.name}: evaluating {ckpt or 'random init'} on {', '.join(tasks)} "
                  f"({limit or 'all'} samples per task, data {data_root})", flush=True)
            try:
                scores, results = evaluate_tasks(
                    model, tokenizer, tasks, data_root, tile_size=vision["tile_size"],
                    tokens_per_tile=per_tile, limit=limit, max_new_tokens=max_new,
                    slack=args.slack, log=lambda m: print(m, flush=True),
                    video=video_options(recipe, train=False), record_builder=_record_builder())
            except EvalDataError as e:
                print(f"eval data error: {e}", file=sys.stderr)
                return 2
        finally:
            destroy_distributed()
        print(f"{recipe.name}: evaluation took {time.perf_counter() - start:.1f}s")
        if args.details:
            details = {"recipe": recipe.name, "checkpoint": str(ckpt) if ckpt else None,
                       "limit": limit, "max_new_tokens": max_new, "slack": args.slack,
                       "tasks": {r.task: {"scores": r.scores, "seconds": round(r.seconds, 3),
                                          "num_samples": r.num_samples,
                                          "predictions": r.predictions} for r in results}}
            Path(args.details).parent.mkdir(parents=True, exist_ok=True)
            Path(args.details).write_text(json.dumps(details, indent=1) + "\n")
    text = json.dumps(scores, indent=1, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn worker processes
    sys.exit(main())
