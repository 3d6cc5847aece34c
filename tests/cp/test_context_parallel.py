"""Context parallelism (2 processes, gloo, fp32): CP=2 gives the CP=1 loss and gradients from the
same weights, for the tiny hybrid LLM on a long packed row and for the tiny VLM with image tokens
across the CP split; checkpoints move between CP sizes; the per-token loss is the same at every
layout."""

import pytest

from tests.multiproc import run_multiproc

TOL = 1e-5


def _check_cp_result(res: dict) -> None:
    assert res["num_grads"] > 20, res
    assert abs(res["loss_cp1"] - res["loss_cp2"]) <= TOL, res
    assert res["max_grad_diff"] <= TOL, res
    assert res["max_grad"] > 1e-3, res  # gradients really flowed
    assert res["loss_cp1"] > 5.0, res  # ~ln(4096) at init: the model really ran


def test_llm_cp2_matches_cp1_on_long_packed_row(tmp_path):
    lengths = [1100, 412, 300, 236]  # 2048 tokens, uneven samples, each a multiple of 2*cp
    results = run_multiproc("tests.cp.bodies:cp_matches_single", nproc=2, timeout=900,
                            kind="llm", ckpt_dir=str(tmp_path / "ckpt"), lengths=lengths,
                            first_cp=2)  # checkpoint written at CP=2, loaded at CP=1
    for res in results:
        assert res["tokens"] == 2048
        _check_cp_result(res)
    assert results[0]["loss_cp2"] == results[1]["loss_cp2"]


def test_vlm_cp2_matches_cp1_with_image_tokens_across_the_split(tmp_path):
    """A micro batch of two packed rows (image tokens across the CP split in the first)."""
    results = run_multiproc("tests.cp.bodies:cp_matches_single", nproc=2, timeout=900,
                            kind="vlm", ckpt_dir=str(tmp_path / "ckpt"), first_cp=1)
    for res in results:
        _check_cp_result(res)
        assert res["worst_grad"]  # vision and connector gradients are compared too


def test_per_token_loss_is_the_token_mean_at_every_layout(tmp_path):
    (res, _) = run_multiproc("tests.cp.bodies:token_mean_across_layouts", nproc=2, timeout=900,
                             ckpt_dir=str(tmp_path / "ckpt"))
    hand = res["hand_token_mean"]
    long_targets, short_targets = res["targets"]
    assert long_targets > 5 * short_targets > 0, res
    # The test can fail: weighting rows equally would give a clearly different number.
    assert abs(res["mean_of_row_means"] - hand) > 1e-3, res
    for layout in ("dp", "tp", "pp", "cp"):
        assert abs(res[layout] - hand) <= TOL, (layout, res)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"tp": 2, "sequence_parallel": True}, {"pp": 2}])
def test_cp2_with_tp_or_pp_matches_cp1_on_4_processes(tmp_path, layout):
    """CP together with TP (sequence parallel) or PP: CP=2 x TP/PP=2 against CP=1 x TP/PP=2."""
    results = run_multiproc("tests.cp.bodies:cp_matches_single", nproc=4, timeout=1800,
                            kind="vlm", ckpt_dir=str(tmp_path / "ckpt"), first_cp=2, **layout)
    for res in results:
        assert abs(res["loss_cp1"] - res["loss_cp2"]) <= TOL, res
        assert res["max_grad_diff"] <= TOL, res
