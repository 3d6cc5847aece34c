"""Acceptance of the platform layer: a megatron-core GPT trains identically at TP=2, PP=2, DP=2."""

import pytest

from tests.multiproc import MultiprocFailure, run_multiproc
from tests.parallel_utils import assert_step_matches, single_process_reference

BODY = "tests.foundation.gpt_bodies:one_step"
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    # Single process: all 4 sequences as 4 microbatches of 1 (gradient accumulation).
    return single_process_reference(tmp_path_factory, BODY, "gpt")


@pytest.mark.parametrize("layout", [
    {"tp": 2},
    {"pp": 2},                                         # 4 microbatches through the 1F1B schedule
    {"distributed_optimizer": True},                  # DP=2, 2 microbatches per rank
    {"distributed_optimizer": False},                 # DP=2 plain DDP
], ids=["tp2", "pp2_4mb", "dp2_distopt", "dp2"])
def test_layout_matches_single_process(reference, layout):
    ref, init, after = reference
    results = run_multiproc(BODY, nproc=2, init_ckpt=init, after_ckpt=after, **layout)
    for rank, res in enumerate(results):
        assert_step_matches(rank, res, ref, TOL)
    assert ref["loss"] > 4.0  # ln(128) ~ 4.85 at init: the model really ran on random tokens


def test_bad_parallel_sizes_fail_at_startup():
    with pytest.raises(MultiprocFailure) as err:
        run_multiproc("tests.foundation.gpt_bodies:bad_layout", nproc=2, tp=3, pp=1)
    assert "tp=3 x pp=1 x cp=1 = 3 do not divide the world size 2" in str(err.value)
