from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path) -> Path:
    """Laid out like the repo root for ``--validate-only``: recipes/ and the (empty) data folders
    the tiny Stage 4 recipe names (validation checks that they exist, nothing reads them)."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    for sub in ("tokenizer", "shards/needle/train", "shards/needle_short/train", "shards/text/train",
                "shards/needle/eval", "shards/needle_short/eval"):
        (tmp_path / "demo_data" / sub).mkdir(parents=True)
    return tmp_path
