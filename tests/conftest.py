"""Helpers shared by the test packages that need a generated demo corpus."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def megatron_single():
    """One process, TP = PP = 1: the gloo world and megatron's parallel state that building
    megatron's layers needs, for in-process tests of every package."""
    from megatron_vlm.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(tp=1, pp=1)
    yield
    destroy_distributed()


def pytest_configure(config):
    """The commands' warning filters (megatron_vlm/known_warnings.py), in pytest's syntax."""
    from megatron_vlm.known_warnings import pytest_filter_lines

    for line in pytest_filter_lines():
        config.addinivalue_line("filterwarnings", line)


def build_demo_corpus(tmp_path_factory, name: str, *args: str) -> Path:
    """Run `python -m megatron_vlm.data_prep.make_demo_data` into a fresh temp dir; returns the corpus dir."""
    out = tmp_path_factory.mktemp(name) / "demo_data"
    subprocess.run([sys.executable, "-m", "megatron_vlm.data_prep.make_demo_data", "--out", str(out), *args],
                   cwd=REPO, check=True, capture_output=True)
    return out


def repo_like_workdir(tmp_path: Path, corpus: Path) -> Path:
    """A working directory laid out like the repo root: recipes/ and demo_data/ resolve."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    (tmp_path / "demo_data").symlink_to(corpus)
    return tmp_path
