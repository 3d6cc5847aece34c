"""The manifest check on its own (one process, no model): what single-process readers
(evaluation, conversion) get from `latest_checkpoint` for each kind of damage."""

import json
import os

import pytest

from megatron_vlm.training import checkpoint as ckpt


def _fake_checkpoint(root, step: int, manifest: bool = True):
    path = root / f"step_{step:07d}"
    (path / "loader").mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(os.urandom(4096))
    (path / "metadata.json").write_text("{}")
    (path / "loader" / "dp00000.json").write_text('{"version": 2}')
    if manifest:
        ckpt._write_manifest(path)
    (path / "meta.json").write_text(json.dumps({"step": step}))
    (root / "latest").write_text(path.name + "\n")
    return path


@pytest.mark.parametrize("damage,words", [
    (lambda p: os.truncate(p / "__0_0.distcp", 100), "__0_0.distcp has 100 bytes, 4096 were saved"),
    (lambda p: (p / "__0_0.distcp").write_bytes(bytes(4096)), "does not match its saved checksum"),
    (lambda p: (p / "metadata.json").unlink(), "metadata.json (dist_checkpointing) is missing"),
    (lambda p: (p / "meta.json").write_text("{trunc"), "meta.json is unreadable"),
    (lambda p: (p / "loader" / "dp00000.json").unlink(), "loader/dp00000.json is missing"),
    (lambda p: (p / "manifest.json").write_text("[]"), "manifest.json is unreadable"),
])
def test_damage_is_named_and_the_older_checkpoint_used(tmp_path, damage, words):
    older = _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 4)
    assert ckpt.checkpoint_problem(newest) is None
    damage(newest)
    said = []
    assert ckpt.latest_checkpoint(tmp_path, say=said.append) == older
    assert len(said) == 1 and "step_0000004 is damaged" in said[0] and words in said[0], said
    assert ckpt.newest_verified(tmp_path, say=said.append) == older  # the collective variant
    damage(older)
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint: step_0000004: .*; "
                                                   "step_0000002: "):
        ckpt.latest_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.newest_verified(tmp_path, say=said.append)
    with pytest.raises(ckpt.CheckpointError, match="not a usable checkpoint"):
        ckpt.load_checkpoint(newest, [])


def test_checkpoints_without_manifest_still_load_and_empty_roots_give_none(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    old = _fake_checkpoint(tmp_path, 3, manifest=False)  # written before manifests existed
    assert ckpt.latest_checkpoint(tmp_path) == old
    (tmp_path / "latest").write_bytes(b"\xff\x00")  # `latest` is not trusted anyway
    assert ckpt.latest_checkpoint(tmp_path) == old
