"""A micro batch of several packed rows trains exactly like those rows one micro batch each."""

from tests.multiproc import run_multiproc


def test_micro_batch_of_four_rows_equals_four_micro_batches(workdir):
    (res,) = run_multiproc("tests.training.train_bodies:micro_batch_sizes_agree", nproc=1,
                           workdir=str(workdir), overrides=[])
    one, four = res["1"], res["4"]  # (JSON keys)
    assert one["rows"] == four["rows"] and one["tiles"] == four["tiles"] > 0, res
    assert abs(one["loss"] - four["loss"]) <= 1e-6 * one["loss"], res
    assert res["max_grad_diff"] <= 1e-5 * one["grad_norm"] and one["grad_norm"] > 0, res
    assert one["loss"] > 1.0  # a random-init model really computed something
