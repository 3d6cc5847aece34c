"""Megatron checkpoint <-> Hugging Face: export is loaded by transformers with the same logits,
import gives back the same weights bit for bit (tools/convert_checkpoint.py)."""

import json

import pytest
import torch

from megatron_vlm.conversion import hf
from megatron_vlm.models.vlm import load_vlm_config
from tests.conversion.conftest import OVERRIDES, RECIPE, run_cli
from tests.multiproc import run_multiproc

TOL = 1e-4  # fp32


def test_export_writes_transformers_directories(exported):
    workdir, _, vlm_dir, llm_dir = exported
    vlm_cfg = json.loads((vlm_dir / "config.json").read_text())
    llm_cfg = json.loads((llm_dir / "config.json").read_text())
    assert vlm_cfg["model_type"] == "nemotron_h_omni"
    assert vlm_cfg["architectures"] == ["NemotronH_Omni_Reasoning_V3"]
    assert vlm_cfg["text_config"]["model_type"] == "nemotron_h"
    assert vlm_cfg["vision_config"]["model_type"] == "radio"
    assert llm_cfg["model_type"] == "nemotron_h" and llm_cfg["architectures"] == ["NemotronHForCausalLM"]
    assert len(llm_cfg["layers_block_type"]) == len("M*M-M-")  # transformers' names for M * M - M -
    assert vlm_cfg["text_config"]["layers_block_type"] == llm_cfg["layers_block_type"]
    assert vlm_cfg["image_token_id"] is not None and vlm_cfg["projector_hidden_size"] == 512
    tokenizer_dir = workdir / "demo_data" / "tokenizer"
    for out in (vlm_dir, llm_dir):
        assert (out / "model.safetensors").is_file()
        for f in tokenizer_dir.iterdir():
            assert (out / f.name).read_bytes() == f.read_bytes()
    vlm_keys = set(hf.read_safetensors(vlm_dir))
    llm_keys = set(hf.read_safetensors(llm_dir))
    assert {"language_model." + k for k in llm_keys} <= vlm_keys
    assert {"multi_modal_projector.linear_1.weight", "vision_model.encoder.layer.1.attention.q_proj.weight",
            "vision_model.embeddings.position_embedding"} <= vlm_keys


def test_transformers_logits_match_ours(exported):
    workdir, ckpt, vlm_dir, llm_dir = exported
    (r,) = run_multiproc("tests.conversion.bodies:compare_with_transformers", nproc=1,
                         workdir=str(workdir), recipe=RECIPE, checkpoint=str(ckpt),
                         overrides=OVERRIDES, llm_dir=str(llm_dir), vlm_dir=str(vlm_dir))
    print({k: v for k, v in r.items() if "loading" not in k})
    # Every weight transformers needs comes from the export, except the omni video embedder,
    # which our model does not have.
    assert r["llm_loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                "error_msgs": []}
    assert r["vlm_loading"]["missing_keys"] == list(hf.HF_KEYS_NOT_EXPORTED)
    assert not r["vlm_loading"]["unexpected_keys"] and not r["vlm_loading"]["mismatched_keys"]
    assert r["vlm_class"] == "NemotronH_Omni_Reasoning_V3"
    assert r["llm_text_diff"] <= TOL
    assert r["vlm_text_diff"] <= TOL
    assert r["vlm_image_diff"] <= TOL
    # The comparisons can see mistakes: logits are not tiny, the images change them, and a
    # perturbation of one weight far below the logit scale shows up far above the tolerance.
    assert r["logit_scale"] > 0.5
    assert r["mm_vs_text_rows"] > 0.1
    assert r["perturbed_diff"] > 100 * TOL


def test_import_round_trips_bit_exactly(exported):
    workdir, ckpt, vlm_dir, _ = exported
    proc = run_cli(workdir, "import", "--hf", str(vlm_dir), "--recipe", RECIPE,
                   "--out", "runs/imported", *OVERRIDES)
    assert "vlm layout" in proc.stdout
    imported = workdir / "runs/imported"
    assert (imported / "latest").read_text().strip() == "step_0000000"
    assert json.loads((imported / "step_0000000/meta.json").read_text())["step"] == 0
    (r,) = run_multiproc("tests.conversion.bodies:state_diffs", nproc=1, workdir=str(workdir),
                         recipe=RECIPE, overrides=OVERRIDES, a=str(ckpt), b=str(imported))
    assert r["keys_a"] == r["keys_b"] > 60 and not r["only_a"] and not r["only_b"]
    assert r["not_equal"] == []
    assert r["changed_by_training"] > 60  # the trained weights differ from a fresh init


@pytest.fixture(scope="module")
def vlm_cfg():
    return load_vlm_config("recipes/models/vlm_tiny.yaml")


def test_llm_only_and_released_layouts_map_to_the_same_weights(exported, vlm_cfg):
    _, _, vlm_dir, llm_dir = exported
    ours, layout = hf.hf_to_ours(hf.read_safetensors(vlm_dir), vlm_cfg)
    assert layout == "vlm"
    llm_only, layout = hf.hf_to_ours(hf.read_safetensors(llm_dir), vlm_cfg)
    assert layout == "llm"
    assert set(llm_only) == {k for k in ours if k.startswith("language_model.")}
    assert all(torch.equal(v, ours[k]) for k, v in llm_only.items())

    # The released Nano V2 VL names (backbone., radio_model., fused qkv, mlp1.*) of the same weights.
    from megatron_vlm.models.hf_mapping_vision import vlm_vision_to_hf

    heads = vlm_cfg["vision_model"]["num_attention_heads"]
    released = {k.replace("language_model.model.", "language_model.backbone."): v
                for k, v in hf.ours_to_hf_vlm(ours, vlm_cfg).items() if k.startswith("language_model.")}
    released.update(vlm_vision_to_hf({k: v for k, v in ours.items()
                                      if not k.startswith("language_model.")}, heads, "released"))
    back, layout = hf.hf_to_ours(released, vlm_cfg)
    assert layout == "released"
    assert set(back) == set(ours) and all(torch.equal(v, ours[k]) for k, v in back.items())

    # An unknown tensor is an error, not silently dropped.
    with pytest.raises(ValueError, match="unmapped"):
        hf.hf_to_ours(dict(hf.read_safetensors(llm_dir), **{"model.extra.weight": torch.ones(1)}),
                      vlm_cfg)


def test_sharded_export_loads_in_transformers(exported, tmp_path):
    from transformers import NemotronHForCausalLM

    _, _, _, llm_dir = exported
    state = hf.read_safetensors(llm_dir)
    files = hf.write_safetensors(state, tmp_path, max_shard_bytes=512 * 1024)
    assert len(files) > 3 and "model.safetensors.index.json" in files
    (tmp_path / "config.json").write_bytes((llm_dir / "config.json").read_bytes())
    assert all(torch.equal(v, state[k]) for k, v in hf.read_safetensors(tmp_path).items())
    model, info = NemotronHForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
