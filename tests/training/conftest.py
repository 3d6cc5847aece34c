"""Shared fixtures for the training tests: a small demo corpus and a launcher for the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vlm.distributed import free_port
from tests.conftest import build_demo_corpus, repo_like_workdir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    return build_demo_corpus(tmp_path_factory, "demo", "--scale", "0.05")


@pytest.fixture()
def workdir(tmp_path, demo_data) -> Path:
    return repo_like_workdir(tmp_path, demo_data)


def launch_train(workdir: Path, recipe: str, *overrides: str, nproc: int = 2,
                 check: bool = True, popen: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(free_port()), "-m", "megatron_vlm.train",
           "--recipe", f"recipes/tiny/{recipe}.yaml", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_log(run_dir: Path) -> dict:
    """step -> record, the last record of a step winning (a resumed run re-logs steps)."""
    records = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records[rec["step"]] = rec
    return records

