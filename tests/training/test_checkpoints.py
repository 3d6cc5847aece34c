"""Resume, crash safety, resharding and stage chaining, through the real `megatron_vlm.train` CLI."""

import re
import signal
import time

import psutil
import pytest

from tests.multiproc import run_multiproc
from tests.training.conftest import launch_train, read_log

TEXT_DATA = ["data.blend=[{path: demo_data/shards/text/train}, {path: demo_data/shards/code/train}]",
             "data.eval=[{path: demo_data/shards/text/eval}]", "eval.batches=1"]


def test_sigkill_then_resume_gives_the_uninterrupted_losses(workdir):
    common = ["train.steps=8", "checkpoint.interval=3", "schedule.warmup_steps=2", *TEXT_DATA]
    launch_train(workdir, "base", *common, "checkpoint.dir=runs/full")
    full = read_log(workdir / "runs/full")
    assert sorted(full) == list(range(1, 9))

    proc = launch_train(workdir, "base", *common, "checkpoint.dir=runs/killed", popen=True)
    log = workdir / "runs/killed/train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "run never reached step 5"
        time.sleep(0.05)
    # torchrun's workers are not in the launcher's process group: kill the whole tree at once.
    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_proc = launch_train(workdir, "base", *common, "checkpoint.dir=runs/killed")
    assert "resumed from" in resumed_proc.stdout
    resumed_at = int(resumed_proc.stdout.split("resumed from")[1].split("at step")[1].split()[0])
    assert resumed_at in (3, 6)
    resumed = read_log(workdir / "runs/killed")
    for step in range(resumed_at + 1, 9):
        assert abs(resumed[step]["loss"] - full[step]["loss"]) <= 1e-6, (
            step, resumed[step]["loss"], full[step]["loss"])
        assert abs(resumed[step]["grad_norm"] - full[step]["grad_norm"]) <= 1e-6

    # A finished stage extended with more steps resumes from its last checkpoint (the recipe's
    # schedule wins; megatron's scheduler would otherwise assert on the changed values).
    longer = [c.replace("train.steps=8", "train.steps=10") for c in common]
    extended = launch_train(workdir, "base", *longer, "checkpoint.dir=runs/full")
    assert "at step 8" in extended.stdout and sorted(read_log(workdir / "runs/full")) == list(
        range(1, 11))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    (res,) = run_multiproc("tests.training.train_bodies:crash_during_save", nproc=1,
                           root=str(tmp_path / "ckpt"))
    assert res["crashed"] is True
    assert res["latest"] == "step_0000001" and res["note"] == "good"
    assert res["max_diff"] == 0.0
    assert "step_0000002" not in res["entries_after_crash"]  # only the .tmp debris
    assert res["latest_after_retry"] == "step_0000002"
    assert res["fallback"] == "step_0000002"


@pytest.mark.slow  # ~40 s; make test-all
def test_tp2_checkpoint_loads_at_tp1_with_the_same_loss_and_in_bf16(workdir):
    launch_train(workdir, "base", "train.steps=2", "schedule.warmup_steps=0", "parallel.tp=2",
                 "train.global_batch_size=2", "train.micro_batch_size=1", "checkpoint.dir=runs/tp2", *TEXT_DATA)
    kwargs = dict(workdir=str(workdir), checkpoint=str(workdir / "runs/tp2"), overrides=TEXT_DATA)
    tp2 = run_multiproc("tests.training.train_bodies:checkpoint_eval_loss", nproc=2, tp=2, **kwargs)
    (tp1,) = run_multiproc("tests.training.train_bodies:checkpoint_eval_loss", nproc=1, tp=1,
                           **kwargs)
    assert tp2[0] == tp2[1]
    assert abs(tp1 - tp2[0]) <= 1e-5, (tp1, tp2)
    assert 1.0 < tp1 < 20.0
    # The same fp32 weights in megatron's bf16 mixed precision: close, but really bf16.
    kwargs["overrides"] = TEXT_DATA + ["train.precision=bf16"]
    (bf16,) = run_multiproc("tests.training.train_bodies:checkpoint_eval_loss", nproc=1, tp=1,
                            **kwargs)
    assert 1e-6 < abs(bf16 - tp1) <= 2e-2 * tp1, (bf16, tp1)
    # (Resuming at another data-parallel size: tests/reliability/test_resume_any_dp.py.)
    # Same data-parallel size (1), other tensor-parallel size: model and distributed-optimizer
    # state reshard, and training continues.
    resumed = launch_train(workdir, "base", "train.steps=4", "schedule.warmup_steps=0",
                           "parallel.tp=1", "train.global_batch_size=2", "train.micro_batch_size=1",
                           "checkpoint.dir=runs/tp2", *TEXT_DATA, nproc=1)
    assert "at step 2" in resumed.stdout
    assert sorted(read_log(workdir / "runs/tp2")) == [1, 2, 3, 4]


@pytest.mark.slow  # in-process twins in tests/vision/test_vlm.py (freezing, optimizer step)
def test_stage0_changes_only_the_connector(workdir):
    images = ["data.blend=[{path: demo_data/shards/ocr/train}]",
              "data.eval=[{path: demo_data/shards/ocr/eval}]", "eval.batches=1"]
    launch_train(workdir, "base", "train.steps=2", "schedule.warmup_steps=0",
                 "checkpoint.dir=runs/base", *TEXT_DATA)
    launch_train(workdir, "stage0", "train.steps=2", "schedule.warmup_steps=0",
                 "checkpoint.dir=runs/stage0", "checkpoint.init_from=runs/base", *images)
    (changed,) = run_multiproc("tests.training.train_bodies:changed_parts", nproc=1,
                               workdir=str(workdir), before=str(workdir / "runs/base"),
                               after=str(workdir / "runs/stage0"), overrides=images)
    assert changed["vision"] == 0.0 and changed["llm"] == 0.0, changed
    assert changed["connector"] > 1e-4, changed


def test_wall_time_limit_saves_and_exits_cleanly(workdir):
    proc = launch_train(workdir, "base", "train.steps=50", "schedule.warmup_steps=0",
                        "train.max_wall_minutes=0.0001", "checkpoint.dir=runs/walltime",
                        *TEXT_DATA, check=False)
    assert proc.returncode != 0  # exit 75 from the workers: not finished, job chains must wait
    assert "wall-time limit: saved checkpoint at step 1, exiting cleanly" in proc.stdout
    assert (workdir / "runs/walltime/latest").read_text().strip() == "step_0000001"
    assert not (workdir / "runs/walltime/summary.json").exists()  # the stage is not finished


def test_sigterm_saves_and_exits_cleanly(workdir):
    proc = launch_train(workdir, "base", "train.steps=200", "schedule.warmup_steps=0",
                        "checkpoint.dir=runs/sigterm", *TEXT_DATA, popen=True)
    log = workdir / "runs/sigterm/train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    # Slurm signals every task; torchrun's workers are the launcher's children.
    for worker in psutil.Process(proc.pid).children(recursive=True):
        worker.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]  # 75 from the workers: stopped, not finished
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out[-3000:]
    saved = int((workdir / "runs/sigterm/latest").read_text().strip().split("_")[1])
    assert f"SIGTERM: saved checkpoint at step {saved}, exiting cleanly" in out
    assert 2 <= saved < 200


def test_nan_loss_stops_naming_the_step_or_is_skipped(workdir):
    # A learning rate of 1e12 without clipping blows the weights up within a few steps.
    diverge = ["train.steps=6", "schedule.warmup_steps=0", "optimizer.lr=1e12",
               "optimizer.clip_grad=0.0", *TEXT_DATA]
    proc = launch_train(workdir, "base", *diverge, "checkpoint.dir=runs/nan", check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]  # the workers exit 3; torchrun reports 1
    match = re.search(r"training stopped: base: loss is (nan|inf) at step (\d+)", proc.stderr)
    assert match and 2 <= int(match.group(2)) <= 6, proc.stderr[-2000:]
    skipped = launch_train(workdir, "base", *diverge, "train.skip_nan_steps=true",
                           "checkpoint.dir=runs/nan_skip")
    assert "update skipped" in skipped.stdout
    assert (workdir / "runs/nan_skip/summary.json").is_file()


@pytest.mark.slow  # ~40 s; make test-all
def test_bf16_stage_starts_from_the_previous_stage_weights(workdir):
    """Mixed precision keeps fp32 main weights: they must come from init_from, not the init."""
    bf16 = ["train.precision=bf16", "schedule.warmup_steps=0", *TEXT_DATA]
    launch_train(workdir, "base", "train.steps=2", "checkpoint.dir=runs/bf16_base", *bf16)
    launch_train(workdir, "stage1", "train.steps=1", "parallel.tp=1", "optimizer.lr=1.0e-9",
                 "optimizer.min_lr=0.0", "checkpoint.dir=runs/bf16_next",
                 "checkpoint.init_from=runs/bf16_base", *bf16)
    (changed,) = run_multiproc("tests.training.train_bodies:changed_parts", nproc=1,
                               workdir=str(workdir), before=str(workdir / "runs/bf16_base"),
                               after=str(workdir / "runs/bf16_next"), overrides=TEXT_DATA)
    # One step at lr 1e-9 moves nothing visible; restarting from random weights moves ~0.05.
    assert max(changed.values()) < 1e-3, changed
