"""RADIO tower: parity with transformers' RadioModel, CPE details, HF weight mapping."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.data.image import normalize_tiles
from megatron_vlm.conversion import hf_mapping_vision as hfm
from megatron_vlm.models.vision import cpe
from megatron_vlm.models.vision.radio import build_radio_tower
from tests.vision.reference import hf_radio_like

TOL = 1e-4


@pytest.fixture(scope="module")
def towers(megatron_single):
    """(transformers RadioModel, our tower) holding the same random weights."""
    hf = hf_radio_like("radio_tiny")
    ours = build_radio_tower("radio_tiny", impl="local", use_cpu_initialization=True).eval()
    hfm.load_full_state(ours, hfm.vision_hf_to_megatron(hf.state_dict(), num_heads=4,
                                                        layout="transformers"))
    return hf, ours


def _images(n, height, width, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("height,width", [(512, 512), (224, 448), (448, 160), (64, 64)],
                         ids=["512x512", "224x448", "448x160", "64x64"])
def test_features_match_transformers(towers, height, width):
    hf, ours = towers
    images = _images(2, height, width, seed=height + width)
    with torch.no_grad():
        # transformers normalises inside the model (input conditioner) from [0, 1] pixels; we take
        # tiles already normalised by the data pipeline.
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        expected = hf(pixels).features
        got = ours(normalize_tiles(images))
    assert got.shape == expected.shape == (2, (height // 16) * (width // 16), 64)
    diff = (got - expected).abs().max().item()
    print(f"{height}x{width}: max |ours - transformers| = {diff:.3g} "
          f"(feature scale {expected.abs().max().item():.3g})")
    assert diff <= TOL
    assert expected.abs().max().item() > 1.0  # features are not trivially small


def test_prefix_tokens_attend_and_are_dropped(towers):
    """Changing the prefix table changes the patch features (they attend to it), and the output
    has exactly one row per patch."""
    _, ours = towers
    tiles = normalize_tiles(_images(1, 64, 64, seed=3))
    with torch.no_grad():
        before = ours(tiles)
        saved = ours.class_token.detach().clone()
        # (a constant shift would vanish in the LayerNorm; perturb per channel)
        ours.class_token.add_(torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)))
        after = ours(tiles)
        ours.class_token.copy_(saved)
    assert before.shape == (1, 16, 64)
    assert (before - after).abs().max().item() > 1e-3


def test_cpe_window_is_top_left_of_square_resize():
    table = torch.randn(1, 6 * 6, 5)
    got = cpe.interpolate_window(table, (6, 6), (3, 4))  # m = 4: resize 6x6 -> 4x4, keep 3 rows
    square = F.interpolate(table.reshape(1, 6, 6, 5).permute(0, 3, 1, 2), size=(4, 4),
                           mode="bilinear", align_corners=False)
    expected = square[..., :3, :4].flatten(2).transpose(1, 2)
    assert torch.equal(got, expected)
    assert cpe.interpolate_window(table, (6, 6), (6, 6)) is table


def test_cpe_train_crop_full_box_is_align_corners_resize():
    table = torch.randn(1, 8 * 8, 3)
    full = cpe.crop_window(table, (8, 8), (5, 3), torch.ones(2, 2), torch.zeros(2, 2))
    expected = F.interpolate(table.reshape(1, 8, 8, 3).permute(0, 3, 1, 2), size=(5, 3),
                             mode="bilinear", align_corners=True).flatten(2).transpose(1, 2)
    assert full.shape == (2, 15, 3)
    assert (full - expected).abs().max().item() < 1e-6


def test_cpe_train_crops_follow_the_reference_distribution():
    size_xy, origin_xy = cpe.sample_crops(4000, generator=torch.Generator().manual_seed(0))
    scale = (size_xy[:, 0] * size_xy[:, 1]).sqrt()
    aspect = size_xy[:, 0] / size_xy[:, 1]
    unclamped = (size_xy < 1).all(dim=1)
    assert scale.min() >= cpe.MIN_CROP_SCALE * (3 / 4) ** 0.5 - 1e-6
    assert aspect[unclamped].min() >= (3 / 4) ** 2 - 1e-5
    assert aspect[unclamped].max() <= (4 / 3) ** 2 + 1e-5
    assert (origin_xy >= 0).all() and (origin_xy + size_xy <= 1 + 1e-6).all()
    assert scale.max() > 0.95 and scale.min() < 0.35  # the whole scale range is used


def test_train_mode_crops_positions_per_tile(towers):
    """With ``cpe_train_crop`` (the released towers; radio_tiny turns it off), in train mode two
    identical tiles get different CPE crops, in eval mode the same one; without it, train mode
    gives them the same positions."""
    _, ours = towers
    tiles = normalize_tiles(_images(1, 64, 64, seed=5)).expand(2, -1, -1, -1)
    saved = ours.cpe_train_crop
    outputs = {}
    with torch.no_grad():
        try:
            for crop in (True, False):
                ours.cpe_train_crop = crop
                ours.train()
                outputs[crop] = ours(tiles)
        finally:
            ours.cpe_train_crop = saved
            ours.eval()
        evaluated = ours(tiles)
    assert (outputs[True][0] - outputs[True][1]).abs().max().item() > 1e-3
    assert torch.equal(outputs[False][0], outputs[False][1])
    assert torch.equal(evaluated[0], evaluated[1])


def test_released_layout_round_trip(towers):
    """Our weights -> the released checkpoint's names (fused qkv) -> ours again is lossless, and
    the fused qkv is q, k, v of transformers' layout stacked."""
    hf, ours = towers
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    released = hfm.vision_megatron_to_hf(state, num_heads=4, layout="released")
    assert "radio_model.model.blocks.1.attn.qkv.weight" in released
    hf_state = hf.state_dict()
    expected_qkv = torch.cat([hf_state[f"encoder.layer.0.attention.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(released["radio_model.model.blocks.0.attn.qkv.weight"], expected_qkv)
    back = hfm.vision_hf_to_megatron(released, num_heads=4, layout="released")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_mapping_rejects_what_it_cannot_represent(towers):
    hf, _ = towers
    state = dict(hf.state_dict())
    with pytest.raises(ValueError, match="LayerScale"):
        hfm.vision_hf_to_megatron({**state, "encoder.layer.0.layer_scale1.lambda1":
                                   torch.full((64,), 0.5)}, num_heads=4, layout="transformers")
    with pytest.raises(ValueError, match="CLIP"):
        hfm.vision_hf_to_megatron({**state, "input_conditioner.norm_mean": torch.zeros(3, 1, 1)},
                                  num_heads=4, layout="transformers")
    with pytest.raises(ValueError, match="unmapped"):
        hfm.vision_hf_to_megatron({**state, "encoder.final_norm.weight": torch.ones(64)},
                                  num_heads=4, layout="transformers")


def test_wrong_tile_size_is_a_clear_error(towers):
    _, ours = towers
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        ours(torch.zeros(1, 3, 64, 72))


def test_vit_local_core_attention_is_the_llms_unmasked_case():
    """The ViT's local spec uses the LLM's LocalCoreAttention with ``no_mask``: full attention
    (plain SDPA), a boolean mask honoured, and packed segments kept apart."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_vlm.models.core_attention import LocalCoreAttention
    from megatron_vlm.models.packing import make_packed_seq_params
    from megatron_vlm.models.vision.config import make_vision_transformer_config
    from megatron_vlm.models.vision.specs import get_vit_layer_spec

    spec = get_vit_layer_spec("local").submodules.self_attention
    assert spec.submodules.core_attention is LocalCoreAttention
    assert spec.params["attn_mask_type"] == AttnMaskType.no_mask
    config = make_vision_transformer_config("radio_tiny", tp=1)
    attn = LocalCoreAttention(config, 1, AttnMaskType.no_mask, "self").eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 2, 4, 16, generator=g) for _ in range(3))  # [s, b, heads, dim]

    def reference(q, k, v, mask=None):  # mask: True = attend
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)),
                                             attn_mask=mask)
        return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)

    torch.testing.assert_close(attn(q, k, v, None), reference(q, k, v), rtol=0, atol=0)
    masked = torch.rand(2, 1, 12, 12, generator=g) > 0.7
    masked[..., 0] = False
    torch.testing.assert_close(attn(q, k, v, masked), reference(q, k, v, ~masked), rtol=0, atol=0)
    # Packed: two samples of 5 and 7 tokens in one row attend only within themselves.
    packed = attn(q[:, :1], k[:, :1], v[:, :1], None,
                  packed_seq_params=make_packed_seq_params(torch.tensor([0, 5, 12])))
    for lo, hi in ((0, 5), (5, 12)):
        torch.testing.assert_close(packed[lo:hi], reference(q[lo:hi, :1], k[lo:hi, :1],
                                                            v[lo:hi, :1]), rtol=1e-6, atol=1e-6)
