"""Pixel shuffle + mlp1 against transformers' nemotron_h_omni implementation."""

import types

import pytest
import torch

from megatron_vlm.conversion import hf_mapping_vision as hfm
from megatron_vlm.models.config import make_transformer_config
from megatron_vlm.models.connector import build_connector
from megatron_vlm.models.vision.pixel_shuffle import pixel_shuffle
from tests.vision.reference import randomize_

omni = pytest.importorskip("transformers.models.nemotron_h_omni.modeling_nemotron_h_omni")
OMNI = omni.NemotronH_Omni_Reasoning_V3

VIT, PROJ, LLM = 32, 96, 48


def _hf_pixel_shuffle(x, scale_factor=0.5):
    # The method reads nothing from self.
    return OMNI.pixel_shuffle(None, x, scale_factor=scale_factor)


@pytest.mark.parametrize("shape", [(3, 32, 32, 1280), (2, 4, 6, 8), (1, 6, 2, 4)],
                         ids=["512px_vit_h", "nonsquare", "tall"])
def test_pixel_shuffle_matches_transformers(shape):
    x = torch.randn(*shape)
    got = pixel_shuffle(x, 0.5)
    assert got.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3] * 4)
    assert torch.equal(got, _hf_pixel_shuffle(x))


def test_pixel_shuffle_channel_order():
    """Merged token (i, j) = [x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]] (row offset
    major); the column-major merge ("v1"-like transposition) is a different layout."""
    x = torch.randn(1, 4, 6, 3)
    blocks = x.reshape(1, 2, 2, 3, 2, 3)  # [n, i, dy, j, dx, c]
    row_major = blocks.permute(0, 1, 3, 2, 4, 5).reshape(1, 2, 3, 12)
    col_major = blocks.permute(0, 1, 3, 4, 2, 5).reshape(1, 2, 3, 12)
    assert torch.equal(pixel_shuffle(x), row_major)
    assert not torch.equal(pixel_shuffle(x), col_major)


def test_odd_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by the pixel-shuffle merge factor 2"):
        pixel_shuffle(torch.zeros(1, 3, 4, 8))


@pytest.fixture(scope="module")
def connectors(megatron_single):
    hf_proj = omni.NemotronH_Omni_Reasoning_V3MultiModalProjector(4 * VIT, PROJ, LLM).eval()
    randomize_(hf_proj, seed=1, scale=0.2)
    base = make_transformer_config("nemotron_h_tiny", params_dtype="float32",
                                   use_cpu_initialization=True)
    ours = build_connector(base, vision_hidden=VIT, llm_hidden=LLM, projector_hidden=PROJ,
                           impl="local").eval()
    released = {f"mlp1.{i}.weight": t for i, t in
                zip((0, 1, 3), (hf_proj.layer_norm.weight, hf_proj.linear_1.weight,
                                hf_proj.linear_2.weight))}
    hfm.load_full_state(ours, hfm.connector_hf_to_megatron(released, layout="released"))
    return hf_proj, ours


@pytest.mark.parametrize("grid", [(32, 32), (4, 6)], ids=["32x32", "4x6"])
def test_connector_matches_transformers(connectors, grid):
    hf_proj, ours = connectors
    rows, cols = grid
    features = torch.randn(3, rows * cols, VIT, generator=torch.Generator().manual_seed(rows))
    # transformers' own composition (project_vision_features), driven through a stand-in self.
    hf_self = types.SimpleNamespace(
        vision_final_layernorm=None, pixel_shuffle=_hf_pixel_shuffle,
        config=types.SimpleNamespace(downsample_ratio=0.5), multi_modal_projector=hf_proj)
    with torch.no_grad():
        expected = OMNI.project_vision_features(hf_self, features, rows, cols)
        got = ours(features, grid)
    assert got.shape == expected.shape == (3, rows * cols // 4, LLM)
    diff = (got - expected).abs().max().item()
    print(f"grid {rows}x{cols}: max |ours - transformers| = {diff:.3g}, "
          f"scale {expected.abs().max().item():.3g}")
    assert diff <= 1e-5 * max(1.0, expected.abs().max().item())


def test_connector_names_map_to_released_keys(connectors):
    _, ours = connectors
    names = set(hfm.connector_megatron_to_hf(ours.state_dict(), layout="released"))
    assert names == {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"}
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert shapes == {"encoder.linear_fc1.layer_norm_weight": (4 * VIT,),
                      "encoder.linear_fc1.weight": (PROJ, 4 * VIT),
                      "encoder.linear_fc2.weight": (LLM, PROJ)}
