"""Resume at another data-parallel size: the global batches do not depend on the DP size, so an
interrupted run continues at DP=1 or DP=2 with exactly the samples of the uninterrupted run."""

import json
import shutil
from collections import Counter

import pytest

from megatron_vlm.data.loader import DatasetSpec, GlobalBatchLoader, PackedVLMLoader
from megatron_vlm.data.tokenizer import VLMTokenizer
from tests.reliability.conftest import launch_train, read_log

GBS, MBS, STEPS = 4, 1, 6
TEXT_DATA = ["data.blend=[{path: demo_data/shards/text/train}, {path: demo_data/shards/ocr/train}]",
             "data.eval=[{path: demo_data/shards/text/eval}]", "eval.batches=1"]


def _loader(demo, dp_rank: int, dp_size: int) -> GlobalBatchLoader:
    tokenizer = VLMTokenizer.from_pretrained(str(demo / "tokenizer"))
    group = PackedVLMLoader([DatasetSpec("text", str(demo / "shards/text/train"), 2.0),
                             DatasetSpec("ocr", str(demo / "shards/ocr/train"), 1.0)],
                            tokenizer, seq_length=256, micro_batch_size=MBS, seed=7, tile_size=64,
                            patch_size=16, shuffle_window=8)
    return GlobalBatchLoader(group, dp_rank, dp_size, GBS // (MBS * dp_size))


def _step_keys(loaders) -> list:
    """One step: every rank's micro-batches, rank by rank; the sample keys in order."""
    keys = []
    for ld in loaders:
        for _ in range(GBS // (MBS * len(loaders))):
            keys += [k for row in next(ld)["sample_keys"] for k in row]
    return keys


def _run(demo, first_dp: int, then_dp: int, interrupt_at: int) -> list:
    loaders = [_loader(demo, r, first_dp) for r in range(first_dp)]
    steps = [_step_keys(loaders) for _ in range(interrupt_at)]
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)  # one position for the whole group
    resumed = [_loader(demo, r, then_dp) for r in range(then_dp)]
    for ld in resumed:
        ld.load_state_dict(states[0])
    steps += [_step_keys(resumed) for _ in range(STEPS - interrupt_at)]
    return steps


def test_consumed_samples_do_not_depend_on_the_dp_size(demo_data):
    uninterrupted = _run(demo_data, 1, 1, STEPS)
    assert all(len(s) >= GBS for s in uninterrupted)
    for first, then in ((2, 1), (1, 2)):
        steps = _run(demo_data, first, then, interrupt_at=3)
        assert steps == uninterrupted, (first, then)  # the same samples, in the same batches
    keys = [k for s in uninterrupted for k in s]
    counts = Counter(keys)
    # none twice: within the short run every sample key is used once (no epoch wrapped)
    assert max(counts.values()) == 1, counts.most_common(3)


def test_dp2_checkpoint_resumes_at_dp1_and_back_with_the_same_losses(workdir):
    common = ["schedule.warmup_steps=0", "checkpoint.interval=2", "checkpoint.keep=0",
              f"train.global_batch_size={GBS}", f"train.micro_batch_size={MBS}", "parallel.tp=1",
              *TEXT_DATA]
    launch_train(workdir, "stage1", f"train.steps={STEPS}", "checkpoint.init_from=null",
                 "checkpoint.dir=runs/dp2", *common)
    full = read_log(workdir / "runs/dp2")
    switched = workdir / "runs/switched"
    shutil.copytree(workdir / "runs/dp2", switched)
    for late in ("step_0000004", "step_0000006", "summary.json"):
        path = switched / late
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (switched / "latest").write_text("step_0000002\n")
    # DP=2 -> DP=1 for step 3 (the wall-time limit stops it after one step, saving step 3; the
    # schedule keeps train.steps), then DP=1 -> DP=2 for steps 4-6.
    one = launch_train(workdir, "stage1", f"train.steps={STEPS}", "checkpoint.init_from=null",
                       "train.max_wall_minutes=0.0001", "checkpoint.dir=runs/switched", *common,
                       nproc=1, check=False)
    assert "at step 2" in one.stdout, one.stdout[-2000:]
    assert "saved checkpoint at step 3" in one.stdout, one.stdout[-2000:]
    two = launch_train(workdir, "stage1", f"train.steps={STEPS}", "checkpoint.init_from=null",
                       "checkpoint.dir=runs/switched", *common)
    assert "at step 3" in two.stdout, two.stdout[-2000:]
    got = read_log(switched)
    for step in range(3, STEPS + 1):
        assert abs(got[step]["loss"] - full[step]["loss"]) <= 1e-5, (step, got[step], full[step])
        assert abs(got[step]["grad_norm"] - full[step]["grad_norm"]) <= 1e-4 * full[step]["grad_norm"]


@pytest.mark.slow
def test_checkpoint_with_per_rank_loader_states_resumes_at_its_own_dp_size(workdir):
    """Checkpoints from before global batches (per-DP-rank loader states, no manifest) resume at
    their DP size with per-rank loaders, and are refused clearly at another."""
    from tests.reliability.test_checkpoint_damage import TEXT_DATA as TEXT

    common = ["schedule.warmup_steps=0", "train.global_batch_size=2", "train.micro_batch_size=1", "checkpoint.interval=2",
              *TEXT]
    launch_train(workdir, "base", "train.steps=2", "checkpoint.dir=runs/old", *common)
    step = workdir / "runs/old/step_0000002"
    (step / "manifest.json").unlink()
    tokenizer = VLMTokenizer.from_pretrained(str(workdir / "demo_data/tokenizer"))
    for rank in range(2):  # what the per-rank loaders of the old code saved after two steps
        specs = [DatasetSpec("0-text", str(workdir / "demo_data/shards/text/train"), 1.0),
                 DatasetSpec("1-code", str(workdir / "demo_data/shards/code/train"), 1.0)]
        old = PackedVLMLoader(specs, tokenizer, seq_length=256, micro_batch_size=1,
                              dp_rank=rank, dp_size=2, seed=1234, tile_size=64, patch_size=16)
        for _ in range(2):
            next(old)
        (step / "loader" / f"dp{rank:05d}.json").write_text(json.dumps(old.state_dict()))
    refused = launch_train(workdir, "base", "train.steps=4", "checkpoint.dir=runs/old", *common,
                           nproc=1, check=False)
    assert refused.returncode != 0 and "resume at the same data-parallel size" in refused.stderr
    resumed = launch_train(workdir, "base", "train.steps=4", "checkpoint.dir=runs/old", *common)
    assert "at step 2" in resumed.stdout and sorted(read_log(workdir / "runs/old")) == [1, 2, 3, 4]
