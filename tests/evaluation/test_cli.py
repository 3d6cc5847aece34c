"""`python -m megatron_vlm.cli.evaluate` on a checkpoint of a 2-step training run saved at TP=2."""

import json
import math
import os
import subprocess
import sys

from tests.evaluation.conftest import REPO
from tests.training.conftest import launch_train

TASKS = ["ocr", "multi_image", "text", "code", "needle"]
KEYS = {"ocr_acc", "multi_image_acc", "text_acc", "code_line_acc", "code_ppl", "needle_acc"}


def _evaluate(workdir, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megatron_vlm.cli.evaluate", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_scores_a_tp2_checkpoint_at_tp1(eval_workdir):
    launch_train(eval_workdir, "base", "train.steps=2", "schedule.warmup_steps=0", "parallel.tp=2",
                 "train.global_batch_size=2", "train.micro_batch_size=1", "eval.batches=1", "checkpoint.dir=runs/base")
    assert (eval_workdir / "runs/base/latest").read_text().strip() == "step_0000002"
    # tasks from the recipe's eval.tasks (no --tasks); the recipe's TP=2 is evaluated at TP=1
    proc = _evaluate(eval_workdir, "--recipe", "recipes/tiny/base.yaml", "--checkpoint", "runs/base",
                     "--limit", "3", "--out", "out/scores.json", "--details", "out/details.json",
                     f"eval.tasks=[{','.join(TASKS)}]", "parallel.tp=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    scores = json.loads((eval_workdir / "out/scores.json").read_text())
    assert set(scores) == KEYS, scores
    for key, value in scores.items():
        if key == "code_ppl":
            assert 1.0 < value < 4096 * 4 and math.isfinite(value), scores
        else:
            assert 0.0 <= value <= 1.0, scores
    assert json.loads(proc.stdout[proc.stdout.rindex("{"):]) == scores  # printed too
    details = json.loads((eval_workdir / "out/details.json").read_text())
    assert details["checkpoint"].endswith("step_0000002")
    assert list(details["tasks"]) == TASKS
    for task, res in details["tasks"].items():
        n = {"needle": 2}.get(task, 3)  # the small demo has 2 needle eval records
        assert res["num_samples"] == n and len(res["predictions"]) == n, (task, res)
        acc = sum(p["correct"] for p in res["predictions"]) / n
        key = "code_line_acc" if task == "code" else f"{task}_acc"
        assert scores[key] == acc


def test_cli_without_checkpoint_fails_cleanly(eval_workdir):
    proc = _evaluate(eval_workdir, "--recipe", "recipes/tiny/base.yaml", "--checkpoint",
                     "runs/nothing", "--tasks", "code")
    assert proc.returncode == 2
    assert "no complete checkpoint under runs/nothing" in proc.stderr
    proc = _evaluate(eval_workdir, "--recipe", "recipes/tiny/base.yaml", "--checkpoint",
                     "runs/nothing", "eval.taskz=[code]")
    assert proc.returncode == 2 and "unknown key 'eval.taskz'" in proc.stderr
