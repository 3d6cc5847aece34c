"""Released checkpoints in: what ``transformers`` itself writes (``save_pretrained``) for the
released Nemotron Nano V2 VL layout -- the whole VLM, the NemotronH LLM alone, the RADIO tower
alone -- imports bit-exactly into our model and exports back to the same tensors.

The configs are the released ones' layout (hybrid pattern ``M-``/``M*`` blocks, GQA 5:1, 8 Mamba
groups, untied embeddings, 3 class tokens + 7 registers, LayerScale tensors written by
transformers' RadioModel), shrunk in width and depth. Weights are random (not transformers'
constant inits), so a tensor mapped to the wrong place cannot go unnoticed.
"""

import pytest
import torch

from megatron_vlm.conversion import hf
from megatron_vlm.conversion.safetensors_io import SafetensorsDirReader

HIDDEN = 80
LLM_HF = dict(  # released NemotronH config keys and semantics, shrunk
    vocab_size=1024, hidden_size=HIDDEN, hybrid_override_pattern="M-M*-M-", intermediate_size=320,
    num_attention_heads=10, num_key_value_heads=2, head_dim=16, mamba_num_heads=16,
    mamba_head_dim=10, ssm_state_size=16, n_groups=8, conv_kernel=4, chunk_size=128,
    time_step_min=0.001, time_step_max=0.1, time_step_limit=(0.0, float("inf")),
    layer_norm_epsilon=1e-5, mlp_hidden_act="relu2", use_bias=False, use_conv_bias=True,
    attention_bias=False, mlp_bias=False, tie_word_embeddings=False, residual_in_fp32=False,
    max_position_embeddings=4096)
RADIO_HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4.0,
                patch_size=16, max_img_size=256, num_cls_tokens=3, num_registers=7,
                video_temporal_patch_size=2)
OURS = {  # the same model in our config terms
    "name": "released_shrunk", "downsample_ratio": 0.5, "projector_hidden_size": 4 * HIDDEN,
    "projector_norm_eps": 1e-5, "image_token_id": None,
    "language_model": dict(
        hybrid_override_pattern="M-M*-M-", hidden_size=HIDDEN, ffn_hidden_size=320,
        num_attention_heads=10, num_query_groups=2, kv_channels=16, mamba_num_heads=16,
        mamba_head_dim=10, mamba_state_dim=16, mamba_num_groups=8, mamba_chunk_size=128,
        vocab_size=1024, max_sequence_length=4096),
    "vision_model": dict(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=256,
                         activation="gelu", layernorm_epsilon=1e-6, patch_size=16,
                         max_img_size=256, class_token_len=10),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _save(model, out):
    model.save_pretrained(str(out))
    return SafetensorsDirReader(out).read_all()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """transformers' own save_pretrained of the three released-layout models."""
    from transformers import NemotronHConfig, NemotronHForCausalLM, RadioConfig, RadioModel
    from transformers.models.nemotron_h_omni.configuration_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3_Config)
    from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3)

    torch.manual_seed(0)
    out = {}
    llm = NemotronHForCausalLM(NemotronHConfig(**LLM_HF))
    _randomize(llm, 1)
    out["llm"] = tmp_path_factory.mktemp("released_llm")
    radio = RadioModel(RadioConfig(**RADIO_HF))
    _randomize(radio, 2)
    out["vision"] = tmp_path_factory.mktemp("released_radio")
    vlm = NemotronH_Omni_Reasoning_V3(NemotronH_Omni_Reasoning_V3_Config(
        text_config=LLM_HF, vision_config=RADIO_HF, downsample_ratio=0.5,
        projector_hidden_size=4 * HIDDEN, vision_hidden_size=64, image_token_id=7))
    _randomize(vlm, 3)
    out["vlm"] = tmp_path_factory.mktemp("released_vlm")
    return {"llm": (out["llm"], _save(llm, out["llm"])),
            "vision": (out["vision"], _save(radio, out["vision"])),
            "vlm": (out["vlm"], _save(vlm, out["vlm"]))}


@pytest.fixture(scope="module")
def ours_cfg():
    from megatron_vlm.models.vlm import load_vlm_config

    return load_vlm_config(OURS)


@pytest.mark.parametrize("part", ["vlm", "llm", "vision"])
def test_transformers_save_pretrained_imports_bit_exactly_and_exports_back(
        megatron_single, written, ours_cfg, part, tmp_path):
    from megatron_vlm.models.vlm import build_vlm

    hf_dir, saved = written[part]
    model = build_vlm(ours_cfg, image_token_id=7, use_cpu_initialization=True)
    before = {k: v.clone() for k, v in hf.full_state(model).items()}
    layout = hf.import_into(model, hf_dir, ours_cfg)
    assert layout == {"vlm": "released"}.get(part, part)
    after = hf.full_state(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    parts = {"vlm": ("language_model.", "vision_model.", "vision_projection."),
             "llm": ("language_model.",), "vision": ("vision_model.",)}[part]
    # Exactly the part the directory holds is replaced (the rest keeps the fresh init).
    assert changed == {k for k in after if k.startswith(parts)}

    # transformers writes the released names (its save reverses its load-time renames).
    assert any(k.startswith(("backbone.", "language_model.backbone.", "radio_model.",
                             "vision_model.radio_model.")) for k in saved)

    # Re-export, and let transformers load both: every tensor of the model is the same.
    kind = "llm" if part == "llm" else "vlm"
    state = hf.full_state(model)
    out = tmp_path / "re-export"
    hf.export_hf(state.__getitem__, {k: (v.shape, v.dtype) for k, v in state.items()}, ours_cfg,
                 kind, out, {"vocab_size": 1024, "eos_id": 2, "pad_id": 0, "bos_id": None,
                             "image_id": 7})
    original, exported = _load(part, hf_dir), _load(part, out)
    if part == "vision":  # our export holds the whole VLM: compare its tower
        exported = {k[len("vision_model."):]: v for k, v in exported.items()
                    if k.startswith("vision_model.")}
        # The omni model normalises outside its tower (as our preprocessing does): the tower's
        # input conditioner, checked to hold the CLIP statistics on import, is not part of it.
        original = {k: v for k, v in original.items() if not k.startswith("input_conditioner.")}
    assert set(exported) >= set(original)
    # Only the omni video embedder (no counterpart in our model) is not exported.
    differ = sorted(k for k in original if not torch.equal(exported[k], original[k]))
    assert differ == ([] if part == "llm" else
                      [next(k for k in original if "video_patch_projection" in k)])


def _load(part, directory):
    """transformers' model of a directory (by its config's model type), as a state dict."""
    import json

    from transformers import AutoModelForImageTextToText, NemotronHForCausalLM, RadioModel

    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    cls = {"nemotron_h_omni": AutoModelForImageTextToText, "nemotron_h": NemotronHForCausalLM,
           "radio": RadioModel}[model_type]
    return dict(cls.from_pretrained(str(directory), dtype=torch.float32).state_dict())


def test_layerscale_other_than_one_is_refused(megatron_single, written, ours_cfg, tmp_path):
    from safetensors.torch import save_file

    from megatron_vlm.models.vlm import build_vlm

    hf_dir, saved = written["vision"]
    bad = dict(saved)
    key = next(k for k in bad if "layer_scale1" in k)
    bad[key] = bad[key] * 0.5
    save_file(bad, str(tmp_path / "model.safetensors"))
    model = build_vlm(ours_cfg, image_token_id=7, use_cpu_initialization=True)
    with pytest.raises(ValueError, match="LayerScale"):
        hf.import_into(model, tmp_path, ours_cfg)


def test_unmapped_tensor_and_wrong_shape_are_named(megatron_single, written, ours_cfg,
                                                   tmp_path):
    from safetensors.torch import save_file

    from megatron_vlm.models.vlm import build_vlm

    hf_dir, saved = written["llm"]
    model = build_vlm(ours_cfg, image_token_id=7, use_cpu_initialization=True)
    save_file(dict(saved, **{"model.layers.0.mixer.extra": torch.ones(2)}),
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"not mapped: \['model.layers.0.mixer.extra'\]"):
        hf.import_into(model, tmp_path, ours_cfg)
    wrong = dict(saved)
    wrong["backbone.layers.1.mixer.up_proj.weight"] = torch.zeros(64, HIDDEN)
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="decoder.layers.1.mlp.linear_fc1.weight: HF gives"):
        hf.import_into(model, tmp_path, ours_cfg)


def test_cli_imports_released_llm_and_radio_into_one_checkpoint(written, tmp_path):
    """`import --hf LLM --hf RADIO`: each fills its part of one checkpoint (the connector stays
    fresh), tensor values as transformers wrote them."""
    import yaml

    from megatron_vlm.data_prep.train_tokenizer import train_bpe
    from megatron_vlm.conversion.dist_reader import DistCheckpointReader
    from tests.conversion.conftest import run_cli

    train_bpe(["a released model walks into a converter"] * 50, vocab_size=300).save(tmp_path / "tok")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(OURS))
    recipe = {"name": "released", "model": {"config": str(tmp_path / "model.yaml")},
              "data": {"blend": [{"path": "unused"}], "tokenizer": str(tmp_path / "tok"),
                       "seq_length": 64},
              "train": {"steps": 1, "global_batch_size": 1}, "optimizer": {"lr": 1e-4},
              "checkpoint": {"dir": "unused"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (llm_dir, llm), (radio_dir, radio) = written["llm"], written["vision"]
    proc = run_cli(tmp_path, "import", "--recipe", str(tmp_path / "recipe.yaml"), "--hf",
                   str(llm_dir), "--hf", str(radio_dir), "--out", str(tmp_path / "imported"))
    assert "(llm layout)" in proc.stdout and "(vision layout)" in proc.stdout
    assert "connector keep(s) the recipe's fresh initialisation" in proc.stdout
    reader = DistCheckpointReader(tmp_path / "imported/step_0000000")
    assert torch.equal(reader.read("language_model.decoder.layers.1.mlp.linear_fc1.weight"),
                       llm["backbone.layers.1.mixer.up_proj.weight"])
    assert torch.equal(reader.read("vision_model.decoder.layers.1.mlp.linear_fc2.weight"),
                       radio["radio_model.model.blocks.1.mlp.fc2.weight"])


def test_streaming_import_holds_a_few_tensors_and_writes_the_released_ones(
        megatron_single, written, ours_cfg, tmp_path, monkeypatch):
    """The import's model stays on the meta device where an HF directory fills it, each rule
    runs once, at most a few tensors wait in memory, and the checkpoint holds the HF values."""
    from megatron_vlm.conversion import stream_import as si
    from megatron_vlm.conversion.dist_reader import DistCheckpointReader
    from megatron_vlm.training.checkpoint import save_checkpoint

    llm_dir, llm = written["llm"]
    model = si.build_meta_model(ours_cfg, 7, None, torch.float32)
    shapes = {k: (v.shape, v.dtype) for k, v in hf.full_state(model).items()}
    sources = si.HFSources([llm_dir], ours_cfg, shapes)
    fresh = si.fresh_parts(shapes, sources.filled())
    assert fresh == ["vision tower", "connector"]
    si.materialise_parts(model, ours_cfg, fresh, torch.float32)
    assert all(v.is_meta == k.startswith("language_model.") for k, v in hf.full_state(model).items())

    computed, waiting = [], []
    real_compute, real_get = si.HFSources.compute, si.TensorFeed.get
    monkeypatch.setattr(si.HFSources, "compute",
                        lambda self, key: computed.append(key) or real_compute(self, key))
    monkeypatch.setattr(si.TensorFeed, "get",
                        lambda self, key: waiting.append(len(self._cache)) or real_get(self, key))
    strategy = si.streaming_save_strategy(model, sources)
    path = save_checkpoint(tmp_path / "ckpt", 0, [model], sharded_strategy=strategy)
    llm_keys = [k for k in shapes if k.startswith("language_model.")]
    assert len(computed) == len(llm_keys) and max(waiting) <= 2, (len(computed), max(waiting))
    reader = DistCheckpointReader(path)
    assert torch.equal(reader.read("language_model.decoder.layers.0.mixer.in_proj.weight"),
                       llm["backbone.layers.0.mixer.in_proj.weight"])
    assert torch.equal(reader.read("language_model.output_layer.weight"), llm["lm_head.weight"])
    # The fresh parts are initialised (not left empty) and written as they are.
    fc1 = reader.read("vision_projection.encoder.linear_fc1.weight")
    assert torch.equal(fc1, model.vision_projection.encoder.linear_fc1.weight.detach())
    assert 0.001 < fc1.std().item() < 1.0
