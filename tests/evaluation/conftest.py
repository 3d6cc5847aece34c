"""Fixtures of the evaluation tests: a small demo corpus, a repo-like working directory, and a
single-process megatron (gloo) in the test process."""

from pathlib import Path

import pytest

from tests.conftest import build_demo_corpus, repo_like_workdir

REPO = Path(__file__).resolve().parents[2]
TASKS = ("ocr", "multi_image", "text", "code", "needle")


@pytest.fixture(scope="session")
def eval_demo_data(tmp_path_factory) -> Path:
    return build_demo_corpus(tmp_path_factory, "evaldemo", "--scale", "0.05",
                             "--needle-words", "60", "120", "--tasks", *TASKS)


@pytest.fixture()
def eval_workdir(tmp_path, eval_demo_data) -> Path:
    return repo_like_workdir(tmp_path, eval_demo_data)
