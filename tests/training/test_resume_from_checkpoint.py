"""Resume from a checkpoint path alone: the recipe comes from the checkpoint's description.json
(megatron_vlm/train.py --checkpoint), and a recipe whose model differs is refused by name."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.training.conftest import REPO, read_log

TEXT_DATA = ["data.blend=[{path: demo_data/shards/text/train}]",
             "data.eval=[{path: demo_data/shards/text/eval}]", "eval.batches=1"]


def _train(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """One process, no launcher: ``python -m megatron_vlm.train ...``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "megatron_vlm.train", *args], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=600)


def _cut_after(src: Path, dst: Path, step: int) -> None:
    """``dst``: ``src`` as a run interrupted right after saving ``step`` would have left it."""
    shutil.copytree(src, dst, symlinks=True)
    for p in dst.glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    (dst / "summary.json").unlink()
    (dst / "latest").write_text(f"step_{step:07d}\n")
    log = [line for line in (dst / "train_log.jsonl").read_text().splitlines()
           if json.loads(line)["step"] <= step]
    (dst / "train_log.jsonl").write_text("\n".join(log) + "\n")


def test_resume_with_only_the_checkpoint_path_gives_the_uninterrupted_losses(workdir, monkeypatch,
                                                                            capsys):
    full = _train(workdir, "--recipe", "recipes/tiny/base.yaml", "train.steps=4",
                  "train.global_batch_size=2", "train.micro_batch_size=1", "checkpoint.interval=2", "checkpoint.keep=0",
                  "schedule.warmup_steps=1", "logging.tensorboard=false",
                  "checkpoint.dir=runs/full", *TEXT_DATA)
    assert full.returncode == 0, full.stderr[-3000:]
    expected = read_log(workdir / "runs/full")
    assert sorted(expected) == [1, 2, 3, 4]

    _cut_after(workdir / "runs/full", workdir / "runs/cut", 2)
    resumed = _train(workdir, "--checkpoint", "runs/cut")  # no recipe, no overrides
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout, resumed.stdout[-2000:]
    got = read_log(workdir / "runs/cut")
    for step in (3, 4):
        assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-6, (step, got, expected)
    assert (workdir / "runs/cut/summary.json").is_file()
    assert not (workdir / "runs/full/step_0000004").samefile(workdir / "runs/cut/step_0000004")

    # --recipe overrides the saved recipe, but not the model: a different model config is one
    # line naming the field (before any process group or model is built).
    wide = workdir / "vlm_wide.yaml"
    wide.write_text((REPO / "recipes/models/vlm_tiny.yaml").read_text()
                    .replace("projector_hidden_size: 512", "projector_hidden_size: 256"))
    from megatron_vlm.train import main

    monkeypatch.chdir(workdir)
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    rc = main(["--recipe", "recipes/tiny/base.yaml", "--checkpoint", "runs/cut",
               f"model.config={wide}", *TEXT_DATA])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert "projector_hidden_size: recipe 256, checkpoint 512" in lines[0], lines[0]
    # The same model with another layout or schedule is accepted (--validate-only: no training).
    assert main(["--recipe", "recipes/tiny/base.yaml", "--checkpoint", "runs/cut/step_0000002",
                 "--validate-only", "train.steps=12", *TEXT_DATA]) == 0
    # A directory without checkpoints needs --recipe.
    (workdir / "runs/empty").mkdir()
    assert main(["--checkpoint", "runs/empty"]) == 2
    assert "pass --recipe" in capsys.readouterr().err
