"""Megatron checkpoint <-> Hugging Face: export is loaded by transformers with the same logits,
import gives back the same weights bit for bit (megatron_vlm/cli/convert_checkpoint.py)."""

import json

import pytest
import torch

from megatron_vlm.conversion import hf
from megatron_vlm.models.vlm import load_vlm_config
from tests.conversion.conftest import OVERRIDES, RECIPE, run_cli
from tests.multiproc import run_multiproc

TOL = 1e-5  # fp32


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
    assert (workdir / "runs/stage1/step_0000002/description.json").is_file()
    for out in (vlm_dir, llm_dir):
        assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
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
    # The trained model's greedy tokens with plain transformers generate, LLM and VLM exports.
    for key in ("greedy_llm", "greedy_vlm", "greedy_vlm_image"):
        ours, theirs = r[key]
        assert ours == theirs and len(ours) >= 1, (key, ours, theirs)


def test_import_round_trips_bit_exactly(exported, monkeypatch, capsys):
    workdir, ckpt, vlm_dir, _ = exported
    proc = run_cli(workdir, "import", "--hf", str(vlm_dir), "--recipe", RECIPE,
                   "--out", "runs/imported", *OVERRIDES)
    assert "(vlm layout)" in proc.stdout
    imported = workdir / "runs/imported"
    assert (imported / "latest").read_text().strip() == "step_0000000"
    assert json.loads((imported / "step_0000000/meta.json").read_text())["step"] == 0
    (r,) = run_multiproc("tests.conversion.bodies:state_diffs", nproc=1, workdir=str(workdir),
                         recipe=RECIPE, overrides=OVERRIDES, a=str(ckpt), b=str(imported))
    assert r["keys_a"] == r["keys_b"] > 60 and not r["only_a"] and not r["only_b"]
    assert r["not_equal"] == []
    assert r["changed_by_training"] > 60  # the trained weights differ from a fresh init

    # The imported checkpoint (TP=1) holds the weights of the trained TP=2 one: their exports are
    # the same tensors, and the same files byte for byte.
    rc, _, _ = _cli_in_process(workdir, monkeypatch, capsys, "export", "--checkpoint",
                               "runs/imported", "--out", "hf/from_tp1")
    assert rc == 0
    from_tp2 = hf.read_safetensors(vlm_dir)
    from_tp1 = hf.read_safetensors(workdir / "hf/from_tp1")
    assert set(from_tp1) == set(from_tp2) and len(from_tp2) > 60
    assert all(torch.equal(from_tp1[k], v) for k, v in from_tp2.items())
    assert (workdir / "hf/from_tp1/model.safetensors").read_bytes() == \
        (vlm_dir / "model.safetensors").read_bytes()


def test_bf16_sharded_export_loads_in_transformers(exported, monkeypatch, capsys):
    from transformers import NemotronHForCausalLM

    workdir, _, _, llm_dir = exported
    rc, _, _ = _cli_in_process(workdir, monkeypatch, capsys, "export", "--checkpoint",
                               "runs/stage1", "--llm-only", "--out", "hf/bf16", "--dtype", "bf16",
                               "--max-shard-gb", str(256 / 1024 ** 2))
    assert rc == 0
    out = workdir / "hf/bf16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / f).is_file() for f in shards)
    fp32 = hf.read_safetensors(llm_dir)
    bf16 = hf.read_safetensors(out)
    assert set(bf16) == set(fp32)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, fp32[k].bfloat16()) for k, v in bf16.items())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, info = NemotronHForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in bf16.items())


def _cli_in_process(workdir, monkeypatch, capsys, *args) -> tuple:
    """(exit code, stdout, stderr) of megatron_vlm.cli.convert_checkpoint run in this process (it starts and
    ends its own one-process world): the libraries are imported already, which saves the seconds
    a fresh interpreter spends on them."""
    from megatron_vlm.cli.convert_checkpoint import main

    monkeypatch.chdir(workdir)
    capsys.readouterr()
    rc = main([*args, "--quiet"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_verify_passes_on_the_export_and_fails_on_a_damaged_one(exported, tmp_path, monkeypatch,
                                                                capsys):
    workdir, _, vlm_dir, _ = exported
    rc, out, _ = _cli_in_process(workdir, monkeypatch, capsys, "verify", "--checkpoint",
                                 "runs/stage1", "--hf", str(vlm_dir))
    assert rc == 0 and "max |logit diff|" in out and "image" in out
    diff = float(out.split("max |logit diff| ")[1].split()[0])
    assert diff <= TOL
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in vlm_dir.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    state = hf.read_safetensors(vlm_dir)
    state["language_model.model.norm_f.weight"] = state["language_model.model.norm_f.weight"] * 1.01
    hf.write_safetensors(state, damaged)
    rc, _, err = _cli_in_process(workdir, monkeypatch, capsys, "verify", "--checkpoint",
                                 "runs/stage1", "--hf", str(damaged))
    assert rc == 1 and "above the tolerance" in err


def test_bad_input_is_one_line_and_exit_2(exported, tmp_path, monkeypatch, capsys):
    workdir, _, vlm_dir, _ = exported
    rc, _, err = _cli_in_process(workdir, monkeypatch, capsys, "export", "--checkpoint",
                                 "runs/nowhere", "--out", "hf/x")
    assert rc == 2 and err.strip() == "error: --checkpoint runs/nowhere: no such directory"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes((vlm_dir / "model.safetensors").read_bytes())
    rc, _, err = _cli_in_process(workdir, monkeypatch, capsys, "import", "--hf", str(bad),
                                 "--recipe", RECIPE, "--out", "runs/bad", *OVERRIDES)
    assert rc == 2 and err.strip().splitlines()[-1].startswith(
        f"error: {bad}/config.json: not valid JSON")
    (bad / "config.json").write_text("{}")
    state = hf.read_safetensors(vlm_dir)
    state["language_model.model.layers.3.mixer.up_proj.weight"] = torch.zeros(7, 128)
    hf.write_safetensors(state, bad)
    rc, _, err = _cli_in_process(workdir, monkeypatch, capsys, "import", "--hf", str(bad),
                                 "--recipe", RECIPE, "--out", "runs/bad", *OVERRIDES)
    assert rc == 2 and "language_model.decoder.layers.3.mlp.linear_fc1.weight: HF gives (7, 128)" \
        in err.strip().splitlines()[-1]


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
    from megatron_vlm.conversion.hf_mapping_vision import vlm_vision_to_hf

    heads = vlm_cfg["vision_model"]["num_attention_heads"]
    released = {k.replace("language_model.model.", "language_model.backbone."): v
                for k, v in hf.ours_to_hf_vlm(ours, vlm_cfg).items() if k.startswith("language_model.")}
    released.update(vlm_vision_to_hf({k: v for k, v in ours.items()
                                      if not k.startswith("language_model.")}, heads, "released"))
    back, layout = hf.hf_to_ours(released, vlm_cfg)
    assert layout == "released"
    assert set(back) == set(ours) and all(torch.equal(v, ours[k]) for k, v in back.items())

    # An unknown tensor is an error, not silently dropped.
    with pytest.raises(ValueError, match=r"not mapped: \[.model.extra.weight.\]"):
        hf.hf_to_ours(dict(hf.read_safetensors(llm_dir), **{"model.extra.weight": torch.ones(1)}),
                      vlm_cfg)


def test_checkpoint_describes_itself(exported):
    """description.json holds the resolved recipe and model config: the recipe rebuilt from it is
    the one training used, the model config is the structured one the model was built from."""
    import dataclasses
    import os

    from megatron_vlm.training import checkpoint_meta
    from megatron_vlm.training.checkpoint import latest_checkpoint
    from megatron_vlm.training.recipe import load_recipe

    workdir, ckpt, _, _ = exported
    description = checkpoint_meta.read(latest_checkpoint(ckpt))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        trained = load_recipe(RECIPE, OVERRIDES + ["train.steps=2", "schedule.warmup_steps=0",
                                                   "parallel.tp=2", "eval.batches=1",
                                                   "checkpoint.dir=runs/stage1"])
    finally:
        os.chdir(cwd)
    saved = checkpoint_meta.recipe_from(description)
    assert dataclasses.asdict(saved) == dataclasses.asdict(trained)
    assert description["model_config"] == load_vlm_config("recipes/models/vlm_tiny.yaml")
    assert description["tokenizer"]["image_id"] is not None
    assert description["tokenizer"]["path"] == str((workdir / "demo_data/tokenizer").resolve())
    # megatron_vlm/cli/evaluate.py takes it when --recipe is not given (at its single-process layout).
    from megatron_vlm.cli.evaluate import EVAL_LAYOUT, _saved_recipe

    for_eval = _saved_recipe(str(ckpt), EVAL_LAYOUT)
    assert for_eval.parallel.tp == 1 and for_eval.model == trained.model
    assert for_eval.data == trained.data and for_eval.name == "stage1"


def test_damaged_checkpoint_is_one_line_and_exit_2(exported, monkeypatch, capsys):
    import shutil

    workdir, root, _, _ = exported
    copy = workdir / "runs/damaged"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root, copy, symlinks=True)
    step = sorted(p for p in copy.iterdir() if p.is_dir() and p.name.startswith("step_"))[-1]
    shard = max((p for p in step.rglob("*") if p.is_file() and p.suffix == ".distcp"),
                key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for target in (f"runs/damaged/{step.name}", "runs/damaged"):
        rc, _, err = _cli_in_process(workdir, monkeypatch, capsys, "export", "--checkpoint",
                                     target, "--out", "hf/damaged")
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: --checkpoint {target}"), err
        assert shard.name in lines[0] or "damaged" in lines[0] or "no usable" in lines[0], err
