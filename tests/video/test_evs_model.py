"""EVS inside the model: two pruned videos packed in one row give each sample its loss alone
(1e-5), at one process, TP=2 and PP=2 (same initial weights); the frame wrappers are rebuilt with
the real kept counts, and the LLM input is shorter by the pruned tokens."""

import pytest

from tests.multiproc import run_multiproc
from tests.video.bodies import FRAMES, RATE, TPF

BODY = "tests.video.bodies:run"
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    init = str(tmp_path_factory.mktemp("evs") / "init")
    (ref,) = run_multiproc(BODY, nproc=1, init_ckpt=init, save_init=True)
    return ref, init


def check_packed_vs_alone(res):
    packed, alone_a, alone_b = res["losses"]
    assert len(packed) == 2 and len(alone_a) == 1 and len(alone_b) == 1
    assert abs(packed[0] - alone_a[0]) <= TOL and abs(packed[1] - alone_b[0]) <= TOL, res["losses"]


def test_packed_videos_equal_alone_one_process(reference):
    ref, _ = reference
    check_packed_vs_alone(ref)
    keeps = [max(TPF, int(t * TPF * (1 - RATE))) for t in FRAMES]
    assert ref["keeps"] == keeps == [6, 5]
    # LLM input: each video is shorter than unpruned by T*tpf - K tokens; the rest of the layout
    # (timestamps, <img></img> per frame) is kept.
    assert ref["kept_embeddings"] == sum(keeps)
    counts = ref["counts"]
    assert len(counts) == sum(FRAMES)
    first, second = counts[:FRAMES[0]], counts[FRAMES[0]:]
    assert sum(first) == keeps[0] and sum(second) == keeps[1]
    assert first[0] == TPF and second[0] == TPF
    # repeated frames (index 4 of 6, index 4 of 5) keep nothing: the provisional layout was moved
    assert first[4] == 0 and second[4] == 0, counts
    assert 6.0 < ref["step_loss"] < 10.0 and ref["grad_norm"] > 0


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_packed_videos_equal_alone_parallel(reference, layout):
    ref, init = reference
    results = run_multiproc(BODY, nproc=2, init_ckpt=init, **layout)
    last = [r for r in results if r["losses"]]
    assert last
    for res in last:
        check_packed_vs_alone(res)
        for got, want in zip(sum(res["losses"], []), sum(ref["losses"], [])):
            assert abs(got - want) <= TOL
    for res in results:
        assert abs(res["step_loss"] - ref["step_loss"]) <= TOL
        assert abs(res["grad_norm"] - ref["grad_norm"]) <= TOL * max(1.0, ref["grad_norm"])
        if "counts" in res:
            assert res["counts"] == ref["counts"]
