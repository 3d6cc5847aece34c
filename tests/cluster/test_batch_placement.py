"""Batches reach the platform device in one place (training/batch_io.py), whatever that is.

The model is built on the ``meta`` device and the platform device is set to ``meta``; the real
VLM forward step then runs on real loader batches (CPU tensors). Every tensor the forward step
hands to the model or to the loss must be on ``meta``: one left behind fails the check (and a
meta weight times a CPU tensor would raise anyway). The model's own forward stops at the input
check (a meta tensor has no values to count image tokens with).
"""

import pytest
import torch

import megatron_vlm.training.batch_io as batch_io


class _Reached(Exception):
    pass


def _tensors(value, where=""):
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{where}[{i}]")
    elif hasattr(value, "__dataclass_fields__"):  # PackedSeqParams
        for k in value.__dataclass_fields__:
            yield from _tensors(getattr(value, k), f"{where}.{k}")


@pytest.fixture()
def tiny_setup(megatron_single, workdir, monkeypatch):
    from megatron_vlm.training.data_setup import build_train_loader
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.recipe import load_recipe

    monkeypatch.chdir(workdir)
    recipe = load_recipe("recipes/tiny/stage1.yaml", ["parallel.tp=1"])
    with torch.device("meta"):
        chunks, tokenizer, model_cfg = build_model_chunks(recipe)
    loader = build_train_loader(recipe, tokenizer, model_cfg, 0, 1)
    batches = [next(loader)]
    for _ in range(20):  # and the first batch with images
        batch = next(loader)
        if batch["tiles"].shape[0]:
            batches.append(batch)
            break
    loader.close()
    return chunks[0], batches


def _input_devices(model, forward_step, runs) -> dict:
    """Device type of every tensor reaching ``model`` when ``forward_step`` runs on each list of
    batches in ``runs``; the model itself never runs (a pre-hook stops it at its input)."""
    seen = {}

    def check_inputs(module, args, kwargs):
        seen.update({name: t.device.type for name, t in _tensors((args, kwargs), "model")})
        raise _Reached

    handle = model.register_forward_pre_hook(check_inputs, with_kwargs=True)
    try:
        for batches in runs:
            with pytest.raises(_Reached):
                forward_step(iter(batches), model)
    finally:
        handle.remove()
    return seen


def test_forward_step_moves_every_tensor_to_the_platform_device(tiny_setup, monkeypatch):
    from megatron_vlm.training.step import masked_lm_loss
    from megatron_vlm.training.vlm_step import vlm_forward_step

    model, batches = tiny_setup
    assert all(p.device.type == "meta" for p in model.parameters())
    assert any(b["tiles"].shape[0] for b in batches), "want a batch with images"
    monkeypatch.setattr(batch_io, "device", lambda: torch.device("meta"))
    seen = _input_devices(model, vlm_forward_step, [[batch] for batch in batches])
    names = set(seen)
    assert {"model[0][0]", "model[1].tiles", "model[1].labels",
            "model[1].packed_seq_params.cu_seqlens_q"} <= names, names
    left_behind = {n: d for n, d in seen.items() if d != "meta"}
    assert not left_behind, f"tensors not moved to the platform device: {left_behind}"

    # The loss side: the forward step's loss function multiplies the model output by the mask.
    placed = batch_io.get_batch(iter(batches[-1:]))
    devices = {k: v.device.type for k, v in placed.items() if isinstance(v, torch.Tensor)}
    assert {"tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "tiles",
            "tiles_per_media"} <= set(devices), devices
    assert set(devices.values()) == {"meta"}, devices
    output = torch.zeros(placed["labels"].shape, device="meta")
    loss = masked_lm_loss(placed["loss_mask"], output)[0]
    assert loss.device.type == "meta"


def test_forward_step_without_the_move_is_caught(tiny_setup, monkeypatch):
    """The check above is not vacuous: skip the move and CPU tensors reach the meta model."""
    from megatron_vlm.training.vlm_step import vlm_forward_step

    model, batches = tiny_setup
    monkeypatch.setattr(batch_io, "device", lambda: torch.device("cpu"))  # = no move
    seen = _input_devices(model, vlm_forward_step, [batches[-1:]])
    assert seen["model[0][0]"] == "cpu" and seen["model[1].tiles"] == "cpu"
