"""Fixtures of the evaluation tests: a small demo corpus, a repo-like working directory, and a
single-process megatron (gloo) in the test process."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASKS = ("ocr", "multi_image", "text", "code", "needle")


@pytest.fixture(scope="session")
def eval_demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaldemo") / "demo_data"
    subprocess.run([sys.executable, "-m", "data_prep.make_demo_data", "--out", str(out),
                    "--scale", "0.05", "--needle-words", "60", "120", "--tasks", *TASKS],
                   cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture()
def eval_workdir(tmp_path, eval_demo_data) -> Path:
    """A working directory laid out like the repo root: recipes/ and demo_data/ resolve."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    (tmp_path / "demo_data").symlink_to(eval_demo_data)
    return tmp_path


@pytest.fixture(scope="session")
def megatron_single():
    """tp = pp = 1 in this process; megatron's parallel state must exist to build its layers."""
    from megatron_vlm.distributed import initialize_distributed

    initialize_distributed(tp=1, pp=1)
    yield
