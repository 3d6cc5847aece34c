"""Tiny VLM end to end: image embedding placement, freezing, mixed text / 1-tile / 7-tile batches."""

import math

import pytest
import torch

from megatron_vlm.models.packing import make_packed_seq_params
from megatron_vlm.models.vlm import ImageTokenMismatch, build_vlm
from tests.vision.reference import IMAGE_TOKEN_ID

SEQ, TILE, TOKENS_PER_TILE = 48, 64, 4  # 64 px tile: 4x4 patches -> 2x2 merged tokens
VOCAB = 4096


def mixed_batch(seed: int = 0) -> dict:
    """Row 0 text only, row 1 one tile, row 2 seven tiles (tiles in batch-major token order)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, VOCAB, (3, SEQ), generator=g)
    tokens[1, 5:5 + TOKENS_PER_TILE] = IMAGE_TOKEN_ID
    tokens[2, 3:3 + 7 * TOKENS_PER_TILE] = IMAGE_TOKEN_ID
    tiles = torch.randn(8, 3, TILE, TILE, generator=g)
    labels = torch.randint(10, VOCAB, (3, SEQ), generator=g)
    return {"tokens": tokens, "tiles": tiles, "labels": labels}


@pytest.fixture
def model(megatron_single):
    torch.manual_seed(0)
    return build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID,
                     use_cpu_initialization=True).eval()


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def test_stage0_freezing_trains_only_the_connector(model):
    model.freeze(vision=True, llm=True)
    assert model.frozen_parts() == {"vision": True, "connector": False, "llm": True}
    grad_enabled_in_tower = []
    model.vision_model.register_forward_pre_hook(
        lambda *_: grad_enabled_in_tower.append(torch.is_grad_enabled()))
    batch = mixed_batch()
    loss = model(batch["tokens"], tiles=batch["tiles"], labels=batch["labels"])
    assert loss.shape == (3, SEQ)
    assert abs(loss.mean().item() - math.log(VOCAB)) < 1.0  # random init: ~uniform predictions
    loss.mean().backward()

    assert grad_enabled_in_tower == [False]  # the frozen tower built no autograd graph
    assert all(g is None for g in _grads(model.vision_model).values())
    assert all(g is None for g in _grads(model.language_model).values())
    connector = _grads(model.vision_projection)
    assert len(connector) == 3
    for name, g in connector.items():
        assert g is not None and g.abs().sum().item() > 0, name


def test_unfrozen_model_gives_every_part_gradients(model):
    model.train()  # also exercises the random CPE crop
    batch = mixed_batch(1)
    model(batch["tokens"], tiles=batch["tiles"], labels=batch["labels"]).mean().backward()
    for part in (model.vision_model, model.vision_projection, model.language_model):
        grads = _grads(part)
        with_grad = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
        assert len(with_grad) == len(grads), set(grads) - set(with_grad)


def test_build_freeze_argument(megatron_single):
    m = build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID,
                  use_cpu_initialization=True, freeze={"vision": True, "llm": True})
    assert m.frozen_parts() == {"vision": True, "connector": False, "llm": True}
    m.freeze()  # nothing frozen
    assert m.frozen_parts() == {"vision": False, "connector": False, "llm": False}
    with pytest.raises(ValueError, match="unknown parts"):
        build_vlm("vlm_tiny", impl="local", freeze={"vit": True})


def test_tile_embeddings_replace_image_tokens_in_tile_order(model):
    batch = mixed_batch()
    tokens, tiles = batch["tokens"], batch["tiles"]
    with torch.no_grad():
        embeds = model.embed_inputs(tokens, tiles)                     # [s, b, h]
        per_tile = model.image_embeddings(tiles).view(8, TOKENS_PER_TILE, -1)
        text = model.language_model.embedding(input_ids=tokens, position_ids=None)
    assert embeds.shape == (SEQ, 3, 128)
    # Row 1 holds tile 0, row 2 tiles 1..7, each tile's tokens in order.
    assert torch.equal(embeds[5:9, 1], per_tile[0])
    assert torch.equal(embeds[3:31, 2], per_tile[1:].reshape(-1, 128))
    image = tokens == IMAGE_TOKEN_ID
    assert torch.equal(embeds.transpose(0, 1)[~image], text.transpose(0, 1)[~image])
    # Tiles really differ, so a permuted placement would be seen.
    assert (per_tile[1] - per_tile[2]).abs().max() > 1e-3


def test_token_tile_mismatch_names_both_counts(model):
    batch = mixed_batch()
    tokens = batch["tokens"].clone()
    tokens[2, 3] = 11  # one image token fewer
    with pytest.raises(ImageTokenMismatch, match=r"31 image context tokens .* but 32 tile "
                                                 r"embeddings \(8 tiles x 4 tokens per tile\)"):
        model(tokens, tiles=batch["tiles"], labels=batch["labels"])
    with pytest.raises(ImageTokenMismatch, match="32 image context tokens .* but 0 tile"):
        model(batch["tokens"], tiles=None)


def test_text_only_batch_needs_no_tiles(model):
    batch = mixed_batch()
    tokens = batch["tokens"][:1]
    loss = model(tokens, tiles=None, labels=batch["labels"][:1])
    empty = model(tokens, tiles=torch.zeros(0, 3, TILE, TILE), labels=batch["labels"][:1])
    assert loss.shape == (1, SEQ) and torch.equal(loss, empty)
    logits = model(tokens)
    assert logits.shape == (1, SEQ, VOCAB)


def test_packed_row_matches_separate_samples(model):
    """The three samples packed into one row (THD, cu_seqlens) give their unpacked losses: tiles
    follow the flattened token order and nothing leaks across samples."""
    batch = mixed_batch()
    with torch.no_grad():
        separate = model(batch["tokens"], tiles=batch["tiles"], labels=batch["labels"])
        cu = torch.tensor([0, SEQ, 2 * SEQ, 3 * SEQ], dtype=torch.int32)
        packed = model(batch["tokens"].reshape(1, -1), tiles=batch["tiles"],
                       labels=batch["labels"].reshape(1, -1),
                       packed_seq_params=make_packed_seq_params(cu))
    diff = (packed.view(3, SEQ) - separate).abs().max().item()
    print(f"packed vs separate: max |diff| = {diff:.3g}")
    assert diff <= 1e-5
    # Several rows with packed_seq_params: a clear error, not a shape error inside attention.
    with pytest.raises(ValueError, match="packed rows go through the model as one row"):
        model(batch["tokens"], tiles=batch["tiles"], packed_seq_params=make_packed_seq_params(cu))


def test_stage0_optimizer_step_updates_only_the_connector(megatron_single):
    """Megatron DDP + optimizer on a Stage 0 model: one step changes the connector only."""
    from megatron_vlm.training.vlm_step import vlm_forward_step
    from megatron_vlm.training.optim import build_optimizer, wrap_with_ddp
    from megatron_vlm.training.recipe import OptimizerSection
    from megatron_vlm.training.step import train_step
    from tests.vision.bodies import NUM_MICROBATCHES, microbatches

    torch.manual_seed(0)
    model = build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID,
                      use_cpu_initialization=True, freeze={"vision": True, "llm": True}).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = OptimizerSection(lr=1e-3, distributed=False)
    ddp = wrap_with_ddp([model], distributed_optimizer=False)
    result = train_step(ddp, build_optimizer(ddp, settings), iter(microbatches()),
                        num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=1,
                        forward_step_func=vlm_forward_step)
    updates = {}
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        updates[part] = max(updates.get(part, 0.0), (p.detach() - before[name]).abs().max().item())
    print(f"stage 0 step: loss {result['loss']:.4f}, grad norm {result['grad_norm']:.4f}, "
          f"largest update per part {updates}")
    assert updates["vision_model"] == 0.0 and updates["language_model"] == 0.0
    assert updates["vision_projection"] > 1e-4  # ~lr on Adam's first step
    assert result["grad_norm"] > 0 and result["update_successful"]


@pytest.mark.parametrize("layout", ["released", "transformers"])
def test_vlm_vision_weights_round_trip_through_hf_names(model, layout):
    from megatron_vlm.conversion import hf_mapping_vision as hfm

    ours = {k: v for k, v in model.state_dict().items()
            if k.startswith(("vision_model.", "vision_projection.")) and "_extra_state" not in k}
    hf = hfm.vlm_vision_to_hf(ours, num_heads=4, layout=layout)
    if layout == "released":
        assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight",
                "vision_model.radio_model.model.patch_generator.pos_embed",
                "vision_model.radio_model.model.blocks.1.attn.qkv.bias"} <= set(hf)
    llm_key = "language_model.backbone.embeddings.weight"  # ignored: the LLM converter's job
    back = hfm.vlm_vision_from_hf({**hf, llm_key: torch.zeros(1)}, num_heads=4, layout=layout)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
