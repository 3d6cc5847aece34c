"""Fixtures for the conversion tests: a tiny Stage 1 checkpoint trained at TP=2 by the real CLI,
exported by the real converter CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_demo_corpus, repo_like_workdir
from tests.training.conftest import launch_train

REPO = Path(__file__).resolve().parents[2]
# Stage 1 trains every part (vision, connector, LLM); no init_from: start from random init.
RECIPE = "recipes/tiny/stage1.yaml"
OVERRIDES = ["checkpoint.init_from=null"]


def run_cli(workdir: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "megatron_vlm.cli.convert_checkpoint", *args, "--quiet"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != expect:
        raise AssertionError(f"convert_checkpoint {args[0]} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(workdir, checkpoint root, full-VLM HF dir, LLM-only HF dir)."""
    corpus = build_demo_corpus(tmp_path_factory, "demo", "--scale", "0.05")
    workdir = repo_like_workdir(tmp_path_factory.mktemp("conversion"), corpus)
    launch_train(workdir, "stage1", "train.steps=2", "schedule.warmup_steps=0", "parallel.tp=2",
                 "eval.batches=1", "checkpoint.dir=runs/stage1", *OVERRIDES)
    # No --recipe: the checkpoint describes itself (description.json).
    proc = run_cli(workdir, "export", "--checkpoint", "runs/stage1", "--out", "hf/vlm",
                   "--llm-out", "hf/llm")
    assert "exported" in proc.stdout
    return workdir, workdir / "runs/stage1", workdir / "hf/vlm", workdir / "hf/llm"
