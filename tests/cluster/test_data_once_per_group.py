"""TP=2 training: one rank per tensor-parallel group reads and decodes, the other receives.

The loader counters in train_log.jsonl are summed over every rank of the world, so they count
what the whole run decoded. The same run with every rank reading its own copy (the behaviour
before the broadcast, MEGATRON_VLM_DATA_ON_EVERY_RANK=1) decodes twice as much and gives the same
losses (the broadcast batch is the batch each rank would have read).
"""

import os

import pytest

from megatron_vlm.training.batch_io import READ_ON_EVERY_RANK_ENV
from tests.training.conftest import launch_train, read_log

STEPS = 2
COMMON = ["checkpoint.init_from=null", f"train.steps={STEPS}", "train.global_batch_size=2", "train.micro_batch_size=1",
          "schedule.warmup_steps=0", "eval.batches=1", "logging.interval=1",
          "logging.tensorboard=false"]


def _run(workdir, name, every_rank: bool, layout=("parallel.tp=2",)):
    os.environ[READ_ON_EVERY_RANK_ENV] = "1" if every_rank else "0"  # launch_train passes environ
    try:
        proc = launch_train(workdir, "stage1", *layout, f"checkpoint.dir=runs/{name}", *COMMON)
    finally:
        os.environ.pop(READ_ON_EVERY_RANK_ENV)
    # the start-up banner, once (rank 0), and the interval line with the new measurements
    assert proc.stdout.count("estimated memory per rank") == 1, proc.stdout[-3000:]
    assert "data wait" in proc.stdout and "samples read" in proc.stdout
    return read_log(workdir / "runs" / name)


def test_tp2_reads_each_sample_once(workdir):
    before = _run(workdir, "every_rank", every_rank=True)
    once = _run(workdir, "once", every_rank=False)
    for step in range(1, STEPS + 1):
        a, b = before[step], once[step]
        print(f"step {step}: loss every-rank {a['loss']:.6f} once {b['loss']:.6f}; samples "
              f"read {a['loader']['samples_read']} / {b['loader']['samples_read']}; data wait "
              f"{b['data_wait_s']:.4f}s of {b['step_time_s']:.3f}s")
        assert a["loss"] == b["loss"]
        assert b["loader"]["samples_read"] > 0
        # read, used and skipped: twice with a reader per rank, once per TP group with one
        assert {k: 2 * v for k, v in b["loader"].items()} == a["loader"]
        assert b["tokens_per_s"] > 0 and 0 <= b["data_wait_s"] <= b["step_time_s"]
    # the banner's resolved recipe sits next to the log
    assert "parallel" in (workdir / "runs" / "once" / "resolved_recipe.yaml").read_text()


@pytest.mark.slow
def test_pp2_reads_each_sample_once(workdir):
    """PP=2: the first stage reads; the last gets labels, loss mask and boundaries, no tiles."""
    layout = ("parallel.tp=1", "parallel.pp=2")
    before = _run(workdir, "pp_every_rank", every_rank=True, layout=layout)
    once = _run(workdir, "pp_once", every_rank=False, layout=layout)
    for step in range(1, STEPS + 1):
        a, b = before[step], once[step]
        print(f"pp2 step {step}: loss {a['loss']:.6f} / {b['loss']:.6f}; samples read "
              f"{a['loader']['samples_read']} / {b['loader']['samples_read']}")
        assert a["loss"] == b["loss"]
        assert {k: 2 * v for k, v in b["loader"].items()} == a["loader"]
