"""resolve_checkpoint: the one place a named checkpoint (a step directory or a root) is found."""

import json
import zlib

import pytest

from megatron_vlm.training.checkpoint import CheckpointError, resolve_checkpoint


def _step(root, step: int, manifest_size_delta: int = 0):
    path = root / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step}))
    (path / "metadata.json").write_text("{}")
    data = b"weights" * 10
    (path / "shard.distcp").write_bytes(data)
    files = {"shard.distcp": {"size": len(data) + manifest_size_delta, "crc32": f"{zlib.crc32(data):08x}"}}
    (path / "manifest.json").write_text(json.dumps({"version": 1, "files": files}))
    return path


def test_step_directory_root_and_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"nowhere: no such directory$"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    good = _step(tmp_path / "run", 2)
    assert resolve_checkpoint(good) == good
    assert resolve_checkpoint(tmp_path / "run") == good
    newer = _step(tmp_path / "run", 4, manifest_size_delta=1)  # truncated after the fact
    with pytest.raises(CheckpointError, match=r"step_0000004: damaged checkpoint: shard.distcp has "
                                              r"70 bytes, 71 were saved"):
        resolve_checkpoint(newer)
    assert resolve_checkpoint(tmp_path / "run") == good  # the newest one that verifies
    assert "step_0000004" in capsys.readouterr().err  # the damaged one is named
