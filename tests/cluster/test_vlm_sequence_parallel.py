"""The tiny VLM at TP=2 with sequence parallelism matches one process from the same weights.

The LLM is built with ``scatter_embedding_sequence_parallel=False`` (megatron's constructor
argument): image embeddings are spliced into the whole sequence, then the VLM scatters it. Checked:
every token's loss, then one training step's loss, gradient norm (overall and per part) and every
updated parameter, within 1e-5.
"""

import pytest

from tests.multiproc import run_multiproc
from tests.parallel_utils import assert_step_matches, single_process_reference

BODY = "tests.vision.bodies:run_layout"
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process_reference(tmp_path_factory, BODY, "vlm_sp_ref")


def test_tp2_sequence_parallel_matches_single_process(reference):
    ref, init, after = reference
    results = run_multiproc(BODY, nproc=2, init_ckpt=init, after_ckpt=after, tp=2,
                            sequence_parallel=True)
    for rank, res in enumerate(results):
        worst = max(abs(a - b) for a, b in zip(res["per_token"], ref["per_token"]))
        print(f"tp2+sp rank {rank}: max per-token loss diff {worst:.3g}; loss {res['loss']:.6f} "
              f"(ref {ref['loss']:.6f}); grad norm {res['grad_norm']:.6f} "
              f"(ref {ref['grad_norm']:.6f}); max param diff {res['max_param_diff']:.3g}")
        assert len(res["per_token"]) == len(ref["per_token"]) > 0
        assert worst <= TOL
        assert_step_matches(rank, res, ref, TOL)
        for part, norm in res["part_grad_norms"].items():
            expected = ref["part_grad_norms"][part]
            assert abs(norm - expected) <= TOL * max(1e-3, expected), (rank, part, norm, expected)
