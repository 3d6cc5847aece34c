"""Run a recipe set's stages in order, each from the previous stage's final checkpoint.

    python -m megatron_vlm.cli.run_stages --recipes recipes/tiny --workdir runs/tiny [--nproc 2]

Stage order: ``base.yaml`` (if present), then ``stage0.yaml`` .. ``stage4.yaml``; files starting
with ``_`` are shared bases, not stages. Each stage's ``checkpoint.dir`` becomes
``WORKDIR/<stage>`` and its ``checkpoint.init_from`` is re-pointed into WORKDIR by the name of the
stage it names. A stage whose ``summary.json`` exists is skipped, so re-running after an
interruption continues (an interrupted stage resumes from its own latest checkpoint). Ends with a
table: stage, steps, train/eval loss, and task scores by generation on held-out data
(``megatron_vlm/cli/evaluate.py``, the recipe's ``eval.tasks``), the same tasks at every stage so the table
shows how each ability moves from stage to stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from megatron_vlm.training.recipe import load_recipe  # noqa: E402
from megatron_vlm.distributed import free_port  # noqa: E402


def stage_files(recipe_dir: Path) -> list[Path]:
    files = [p for p in sorted(recipe_dir.glob("*.yaml")) if not p.name.startswith("_")]
    return sorted(files, key=lambda p: (p.stem != "base", p.stem))


def stage_overrides(recipe_file: Path, workdir: Path) -> list[str]:
    recipe = load_recipe(recipe_file)
    out = [f"checkpoint.dir={workdir / recipe_file.stem}"]
    if recipe.checkpoint.init_from:
        out.append(f"checkpoint.init_from={workdir / Path(recipe.checkpoint.init_from).name}")
    return out


def run_stage(recipe_file: Path, workdir: Path, nproc: int, extra: list[str]) -> dict:
    summary = workdir / recipe_file.stem / "summary.json"
    if summary.is_file():
        print(f"== {recipe_file.stem}: already trained, skipping", flush=True)
    else:
        train_stage(recipe_file, workdir, nproc, extra, summary)
    scores = workdir / recipe_file.stem / "scores.json"
    if not scores.is_file():
        evaluate_stage(recipe_file, workdir, extra, scores)
    return {**json.loads(summary.read_text()), **json.loads(scores.read_text())}


def evaluate_stage(recipe_file: Path, workdir: Path, extra: list[str], scores: Path) -> None:
    """Task scores by generation on held-out data (single process, any training layout)."""
    print(f"== {recipe_file.stem}: evaluating tasks", flush=True)
    cmd = [sys.executable, "-m", "megatron_vlm.cli.evaluate", "--recipe", str(recipe_file),
           "--checkpoint", str(workdir / recipe_file.stem), "--out", str(scores),
           "--limit", str(EVAL_LIMIT),
           *stage_overrides(recipe_file, workdir), *extra]
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"evaluation of {recipe_file.stem} failed (exit {proc.returncode})")


def train_stage(recipe_file: Path, workdir: Path, nproc: int, extra: list[str],
                summary: Path) -> None:
    print(f"== {recipe_file.stem}: training ({recipe_file})", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(free_port()), "-m", "megatron_vlm.train",
           "--recipe", str(recipe_file), *stage_overrides(recipe_file, workdir), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0 or not summary.is_file():
        raise SystemExit(f"stage {recipe_file.stem} failed (exit {proc.returncode}); fix and re-run "
                         "the same command to continue from its last checkpoint")



# Table columns in curriculum order (the stage that should move each one: 1, 1, 1, 2, 2, 3, 4);
# other score keys follow, sorted.
COLUMN_ORDER = ("ocr_acc", "chart_acc", "table_acc", "multi_image_acc", "video_acc", "video_evs_acc",
                "text_acc", "code_line_acc", "code_ppl", "needle_short_acc", "needle_acc",
                "video_tokens", "video_evs_tokens")
EVAL_LIMIT = 50  # held-out samples per task


def chance_levels() -> dict:
    """``<task>_acc`` -> accuracy by guessing (megatron_vlm.data_prep.demo_tasks.CHANCE), {} without it."""
    try:
        from megatron_vlm.data_prep.demo_tasks import CHANCE
    except ImportError:
        return {}
    out = {f"{task}_line_acc" if task == "code" else f"{task}_acc": p for task, p in CHANCE.items()}
    if "video" in CHANCE:
        out["video_evs_acc"] = CHANCE["video"]
    return out


def format_table(summaries: list[dict]) -> str:
    # Per-dataset eval losses stay in summary.json and TensorBoard; the table shows each stage's
    # own eval loss and the task scores, which are measured on the same tasks at every stage.
    # An accuracy's header names its chance level (guessing among the task's answers).
    found = {k for s in summaries for k in s
             if not k.startswith("eval_loss") and k not in
             ("stage", "steps", "train_loss", "train_loss_first", "stopped")}
    task_keys = [k for k in COLUMN_ORDER if k in found] + sorted(found - set(COLUMN_ORDER))
    chance = chance_levels()
    task_heads = [f"{k} (chance {chance[k]:.2f})" if k in chance else k for k in task_keys]
    head = ["stage", "steps", "train loss", "eval loss (start -> end)"] + task_heads
    rows = []
    for s in summaries:
        ev = s.get("eval_loss")
        ev0 = s.get("eval_loss_first")
        ev_text = f"{ev0:.3f} -> {ev:.3f}" if ev is not None and ev0 is not None else (
            f"{ev:.3f}" if ev is not None else "-")
        tl = s.get("train_loss")
        rows.append([s["stage"], str(s["steps"]), f"{tl:.3f}" if tl is not None else "-", ev_text]
                    + [f"{s[k]:.3f}" if isinstance(s.get(k), (int, float)) else "-"
                       for k in task_keys])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", required=True, type=Path,
                    help="folder of stage recipes (base.yaml, stage0.yaml ... stage4.yaml), run in order")
    ap.add_argument("--workdir", required=True, type=Path,
                    help="where each stage's checkpoints, logs and the stage table are written")
    ap.add_argument("--nproc", type=int, default=2, help="processes per stage (torchrun)")
    ap.add_argument("--only", nargs="*", help="run only these stages (by file stem)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every stage")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    summaries = []
    for recipe_file in stage_files(args.recipes):
        if args.only and recipe_file.stem not in args.only:
            continue
        summaries.append(run_stage(recipe_file.resolve(), workdir, args.nproc, args.overrides))
    table = format_table(summaries)
    (workdir / "stage_table.md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
