"""Damaged checkpoints: a resume falls back to the newest usable one, naming what was wrong; with
none usable, one clear error. Every kind of damage is applied to copies of one real 2-process run."""

import os
import shutil

from tests.multiproc import run_multiproc
from tests.reliability.conftest import launch_train, read_log

TEXT_DATA = ["data.blend=[{path: demo_data/shards/text/train}, {path: demo_data/shards/code/train}]",
             "data.eval=[{path: demo_data/shards/text/eval}]", "eval.batches=1"]
RUN = ["train.steps=4", "checkpoint.interval=2", "schedule.warmup_steps=0", *TEXT_DATA]


def _largest_shard(step_dir):
    return max((p for p in step_dir.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    shard = _largest_shard(step_dir)
    os.truncate(shard, shard.stat().st_size // 2)


def _overwrite(step_dir):  # same size, other bytes: only the checksum can tell
    shard = step_dir / "common.pt"
    shard.write_bytes(b"\0" * shard.stat().st_size)


def _unreadable(step_dir):  # a directory where a file should be: open() fails even for root
    target = step_dir / "ranks" / "rank00001.pt"
    target.unlink()
    target.mkdir()


DAMAGE = {  # kind -> (how, words of the message naming it)
    "truncated_shard": (_truncate, "bytes, "),
    "overwritten_file": (_overwrite, "common.pt does not match its saved checksum"),
    "missing_metadata": (lambda d: (d / "metadata.json").unlink(), "metadata.json"),
    "missing_meta": (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    "missing_loader_file": (lambda d: (d / "loader" / "dp00001.json").unlink(),
                            "loader/dp00001.json is missing"),
    "unreadable_file": (_unreadable, "ranks/rank00001.pt"),
}
LATEST_STATES = {  # `latest` broken in these ways: the newest good checkpoint is still used
    "latest_garbage": lambda root: (root / "latest").write_bytes(b"\xff\xfe\x00garbage"),
    "latest_missing_dir": lambda root: (root / "latest").write_text("step_0000009\n"),
    "latest_gone": lambda root: (root / "latest").unlink(),
}


def test_damaged_newest_checkpoint_falls_back_to_the_older_one(workdir):
    launch_train(workdir, "base", *RUN, "checkpoint.dir=runs/good")
    good = workdir / "runs/good"
    assert sorted(p.name for p in good.glob("step_*")) == ["step_0000002", "step_0000004"]
    roots = []
    for kind, (damage, _) in DAMAGE.items():
        root = workdir / "runs" / kind
        shutil.copytree(good, root)
        damage(root / "step_0000004")
        roots.append(root)
    for kind, damage_latest in LATEST_STATES.items():
        root = workdir / "runs" / kind
        shutil.copytree(good, root)
        damage_latest(root)
        roots.append(root)
    both = workdir / "runs/both_damaged"
    shutil.copytree(good, both)
    _truncate(both / "step_0000004")
    (both / "step_0000002" / "metadata.json").unlink()
    LATEST_STATES["latest_garbage"](both)
    roots.append(both)
    older = workdir / "runs/older_only"  # the step-2 weights, for comparison
    shutil.copytree(good, older)
    shutil.rmtree(older / "step_0000004")
    roots.append(older)

    ranks = run_multiproc("tests.reliability.bodies:resume_choices", nproc=2, workdir=str(workdir),
                          roots=[str(r) for r in roots], overrides=TEXT_DATA)
    for r in ranks:  # every rank made the same choice
        assert {k: v for k, v in r.items() if k != "dp_rank"} == \
            {k: v for k, v in ranks[0].items() if k != "dp_rank"}
    res = ranks[0]
    step2_weights = res["older_only"]["weights"]
    for kind, (_, words) in DAMAGE.items():
        got = res[kind]
        assert got.get("chosen") == "step_0000002", (kind, got)
        assert got["weights"] == step2_weights and got["loader"], (kind, got)
        assert len(got["said"]) == 1 and "step_0000004 is unusable" in got["said"][0], got
        assert words in got["said"][0], (kind, got["said"])
    for kind in LATEST_STATES:
        got = res[kind]
        assert got.get("chosen") == "step_0000004", (kind, got)
        assert len(got["said"]) == 1 and "latest" in got["said"][0], (kind, got)
    err = res["both_damaged"]["error"]
    assert "no usable checkpoint" in err and "step_0000004" in err and "step_0000002" in err, err

    # A damaged checkpoint is set aside for inspection: no longer a candidate, nor deleted.
    assert (workdir / "runs/truncated_shard/step_0000004.damaged").is_dir()
    assert not (workdir / "runs/truncated_shard/step_0000004").exists()

    # Through the CLI: a truncated newest shard resumes from step 2 with the same later losses.
    shutil.copytree(good, workdir / "runs/truncated_cli")
    _truncate(workdir / "runs/truncated_cli/step_0000004")
    resumed = launch_train(workdir, "base", *RUN, "checkpoint.dir=runs/truncated_cli")
    assert "step_0000004 is unusable" in resumed.stdout and "at step 2" in resumed.stdout
    full, again = read_log(good), read_log(workdir / "runs/truncated_cli")
    for step in (3, 4):
        assert again[step]["loss"] == full[step]["loss"], (step, again[step], full[step])
        assert again[step]["grad_norm"] == full[step]["grad_norm"]
    # Both damaged: one clear error (never a silent fresh start), exit code 4.
    proc = launch_train(workdir, "base", *RUN, "checkpoint.dir=runs/both_damaged", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "no usable checkpoint" in line]
    assert len(lines) == 1 and "checkpoint error:" in lines[0], proc.stderr[-3000:]
    # The only traceback is torchrun's own report that a worker exited non-zero.
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]
    assert proc.stderr.index(lines[0]) < proc.stderr.index("Traceback")
