"""TP=2 and PP=2 give the single-process loss and gradients for the hybrid LLM (real 2-process runs).

All layouts load one dist checkpoint written by the single-process reference; the pipeline split of
the tiny pattern ``M*M-M-`` puts ``M*M`` on stage 0 and ``-M-`` on stage 1.
"""

import pytest

from tests.multiproc import run_multiproc

BODY = "tests.models.llm_bodies:run_layout"
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("hybrid_llm") / "ckpt")
    (ref,) = run_multiproc(BODY, nproc=1, ckpt=ckpt, save=True)
    return ref, ckpt


def _compare(res, ref):
    assert abs(res["loss"] - ref["loss"]) <= TOL * abs(ref["loss"]), (res["loss"], ref["loss"])
    assert set(res["grad_norms"]) == set(ref["grad_norms"])
    worst = max(ref["grad_norms"], key=lambda k: abs(res["grad_norms"][k] - ref["grad_norms"][k])
                / max(ref["grad_norms"][k], 1e-6))
    for name, value in ref["grad_norms"].items():
        assert value > 0.0, f"{name} got no gradient in the reference"
        assert abs(res["grad_norms"][name] - value) <= TOL * value, (
            name, res["grad_norms"][name], value, "worst:", worst)
    assert abs(res["total_grad_norm"] - ref["total_grad_norm"]) <= TOL * ref["total_grad_norm"]


@pytest.mark.parametrize("layout", [
    {"tp": 2},
    {"pp": 2},
    {"tp": 2, "sp": True},
], ids=["tp2", "pp2", "tp2_sequence_parallel"])
def test_layout_matches_single_process(reference, layout):
    ref, ckpt = reference
    results = run_multiproc(BODY, nproc=2, ckpt=ckpt, **layout)
    # ln(4096) = 8.3: the tiny model really ran on random tokens.
    assert ref["plain"]["loss"] > 7.0 and ref["packed"]["loss"] > 7.0
    for rank, res in enumerate(results):
        for kind in ("plain", "packed"):
            try:
                _compare(res[kind], ref[kind])
            except AssertionError as e:
                raise AssertionError(f"rank {rank}, {kind} batches: {e}") from None
