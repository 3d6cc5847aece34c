"""A packed row gives every sample the loss it has alone: attention, Mamba state and convolution
restart at the loader's sample boundaries."""

from tests.multiproc import run_multiproc


def test_packed_sample_losses_equal_samples_alone(workdir):
    overrides = ["data.blend=[{path: demo_data/shards/ocr/train}, {path: demo_data/shards/text/train}]",
                 "data.seq_length=512", "train.micro_batch_size=1"]  # one row, indexed below
    (res,) = run_multiproc("tests.training.train_bodies:packed_vs_alone", nproc=1,
                           workdir=str(workdir), overrides=overrides)
    assert res["samples"] >= 3 and res["image_samples"] >= 1, res
    assert res["max_diff"] <= 1e-5, res
    assert res["loss"] > 1.0  # a random-init model really computed something
