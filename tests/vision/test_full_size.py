"""The full Nemotron Nano V2 VL config builds (on the meta device) with the published sizes."""

import pytest
import torch

from megatron_vlm.models.llm import count_parameters
from megatron_vlm.models.vlm import build_vlm


@pytest.fixture(scope="module")
def full_model(megatron_single):
    with torch.device("meta"):
        return build_vlm("vlm_nemotron_nano_v2_vl", impl="local", image_token_id=18,
                         use_cpu_initialization=True, perform_initialization=False)


def test_full_size_parameter_counts(full_model):
    m = full_model
    vision, blocks = count_parameters(m.vision_model), count_parameters(m.vision_model.decoder)
    connector, llm = count_parameters(m.vision_projection), count_parameters(m.language_model)
    total = count_parameters(m)
    print(f"vision tower {vision / 1e9:.4f}B (blocks {blocks / 1e9:.4f}B, CPE table "
          f"{m.vision_model.position_embeddings.numel() / 1e6:.1f}M), connector "
          f"{connector / 1e9:.4f}B, LLM {llm / 1e9:.4f}B, total {total / 1e9:.4f}B")
    assert all(p.device.type == "meta" for p in m.parameters())
    # ViT-H/16: 32 x (4*1280^2 + 2*1280*5120 + biases and norms) + 128^2 x 1280 CPE table
    # + 768 x 1280 patch embedding + 8 prefix tokens.
    assert blocks == 32 * (4 * 1280 * 1280 + 4 * 1280 + 2 * 1280 * 5120 + 5120 + 1280 + 4 * 1280)
    assert vision == blocks + 128 * 128 * 1280 + 768 * 1280 + 8 * 1280
    assert 0.62e9 < vision < 0.66e9                       # "about 0.63B" (0.652B with the CPE table)
    assert connector == 5120 + 5120 * 20480 + 20480 * 5120
    assert 12.2e9 < llm < 12.4e9                          # Nemotron-Nano-12B-v2
    assert 13.0e9 < total < 13.3e9                        # "about 13B"
    assert total == vision + connector + llm


def test_full_size_shapes(full_model):
    m = full_model
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["vision_model.embedder.weight"] == (1280, 3 * 16 * 16)
    assert shapes["vision_model.position_embeddings"] == (1, 128 * 128, 1280)
    assert shapes["vision_model.decoder.layers.31.self_attention.linear_qkv.weight"] == (3 * 1280, 1280)
    assert "vision_model.decoder.layers.32.mlp.linear_fc1.weight" not in shapes
    assert shapes["vision_projection.encoder.linear_fc1.layer_norm_weight"] == (5120,)
    assert shapes["vision_projection.encoder.linear_fc1.weight"] == (20480, 5120)
    assert shapes["vision_projection.encoder.linear_fc2.weight"] == (5120, 20480)
    assert not any("bias" in n for n in shapes if n.startswith("vision_projection"))
