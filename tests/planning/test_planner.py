"""The capacity planner: parameter counts equal the built models exactly, activation memory
matches the saved tensors of one step at 1K tokens, and the verdict / suggestions behave."""

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_vlm import planning
from megatron_vlm.models.llm import count_parameters

REPO = Path(__file__).resolve().parents[2]


def _by_part(model, vlm: bool) -> dict:
    llm = model.language_model if vlm else model
    kinds = {"M": "mamba", "*": "attention", "-": "mlp"}
    out = {"embedding": count_parameters(llm.embedding), "final_norm": count_parameters(llm.decoder.final_norm),
           "output_layer": count_parameters(llm.output_layer), "mamba": 0, "attention": 0, "mlp": 0}
    for layer, kind in zip(llm.decoder.layers, llm.decoder.layer_type_list):
        out[kinds[kind]] += count_parameters(layer)
    if vlm:
        out["vision"] = count_parameters(model.vision_model)
        out["connector"] = count_parameters(model.vision_projection)
    return out


@pytest.mark.parametrize("name,vlm,meta", [("nemotron_h_tiny", False, False),
                                           ("vlm_tiny", True, False),
                                           ("vlm_nemotron_nano_v2_vl", True, True)])
def test_parameter_counts_equal_the_built_models(megatron_single, name, vlm, meta):
    from megatron_vlm.models.llm import build_hybrid_llm
    from megatron_vlm.models.vlm import build_vlm

    kwargs = dict(impl="local", use_cpu_initialization=True, perform_initialization=not meta)
    with torch.device("meta" if meta else "cpu"):
        model = build_vlm(name, image_token_id=7, **kwargs) if vlm else build_hybrid_llm(name, **kwargs)
    counts = planning.parameter_counts(planning.ModelShape.load(name))
    assert {k: v.total for k, v in counts.items()} == _by_part(model, vlm)
    assert planning.part_totals(counts)["total"] == count_parameters(model)


def test_tensor_parallel_shard_is_what_a_rank_holds():
    shape = planning.ModelShape.load("nemotron_h_12b")
    counts = planning.parameter_counts(shape, tp=8)
    mamba = planning.llm_layer_params(shape, "M")
    # per rank: in_proj rows, conv, dt/A/D, norm and out_proj columns / 8; the pre-norm weight whole
    assert mamba.per_rank(8) == (5120 * 22656 + 12288 * 5 + 3 * 128 + 10240 + 10240 * 5120) / 8 + 5120
    assert counts["embedding"].per_rank(8) == 131072 * 5120 / 8


def test_activations_match_saved_tensors_at_1k(megatron_single):
    """The planner's torch-path activations equal one measured step within 15% per layer type."""
    from bench.bench_memory import measure, planned, vlm_inputs
    from megatron_vlm.models.vlm import build_vlm

    torch.manual_seed(0)
    model = build_vlm("vlm_tiny", impl="local", image_token_id=7, use_cpu_initialization=True)
    tokens, tiles = vlm_inputs(1024)
    shape = planning.ModelShape.load("vlm_tiny")
    largest = None
    for mode in ("none", "full"):
        got = measure(model, tokens, tiles, mode)
        largest = largest or got["_largest layer"]  # of the none run: what a recompute rebuilds
        want = planned(shape, 1024, mode, vlm=True)
        if mode == "full":
            assert want["recompute peak"] == pytest.approx(largest, rel=0.15)
        for part in ("mamba", "attention", "mlp", "logits", "vision", "connector"):
            assert want[part] == pytest.approx(got[part], rel=0.15), (mode, part)


def _layout(**kw):
    base = dict(tp=8, pp=1, cp=1, dp=32, sequence_parallel=True, seq_length=16384,
                global_batch=128, precision="bf16")
    base.update(kw)
    return planning.Layout(**base)


def test_verdict_and_smallest_change():
    shape = planning.ModelShape.load("vlm_nemotron_nano_v2_vl")
    h100 = planning.Hardware.named("h100")
    small = planning.plan(shape, _layout(), h100)
    assert small.fits and small.verdict().startswith("FITS")
    big = planning.plan(shape, _layout(seq_length=131072, dp=32), h100)
    assert not big.fits and "DOES NOT FIT" in big.verdict() and big.suggestions
    # the suggested change really fits, and memory falls with each lever
    assert planning.plan(shape, _layout(seq_length=131072, recompute="full"), h100).fits
    acts = [planning.plan(shape, _layout(seq_length=131072, **kw), h100, suggest=False).peak.activation_total
            for kw in ({}, dict(cp=2, dp=16), dict(cp=4, dp=8))]
    assert acts[0] > acts[1] > acts[2]
    # a bigger GPU fits what the smaller does not
    assert planning.plan(shape, _layout(seq_length=32768), planning.Hardware.named("h100", 30)).fits is False
    assert planning.plan(shape, _layout(seq_length=32768), planning.Hardware.named("b200")).fits


def test_flops_per_token_match_megatron_anchor():
    """About 72 / 80 / 95 GFLOP per token for the 12B LLM at 8K / 49K / 131K (training = 3x)."""
    shape = planning.ModelShape.load("nemotron_h_12b")
    for seq, want in ((8192, 72), (49152, 80), (131072, 95)):
        got = 3 * sum(planning.flops_per_token(shape, seq).values()) / 1e9
        assert got == pytest.approx(want, rel=0.03), seq


def test_cli_reads_recipes_and_overrides(capsys):
    from megatron_vlm.cli.plan import main

    rc = main(["--recipe", str(REPO / "recipes/nano_v2_vl/stage4.yaml"), "--cp", "4",
               "--recompute", "full"])
    out = capsys.readouterr().out
    assert "cp=4" in out and "recompute=full" in out and rc == 0
    assert main(["--recipe", str(REPO / "recipes/nano_v2_vl/stage4.yaml"), "--gpus", "12"]) == 2


def test_recipe_keys_of_other_features_are_read(tmp_path):
    """recompute.* and parallel.cp_comm_type (added by other branches) reach the layout, whether or
    not this branch's recipe validation knows them."""
    recipe = tmp_path / "stage4_cp.yaml"
    recipe.write_text(f"base: {REPO / 'recipes/nano_v2_vl/stage4.yaml'}\n"
                      "parallel: {cp: 4, cp_comm_type: all_gather}\n"
                      "recompute: {mode: full, vision: true}\n")
    h100 = planning.Hardware.named("h100")
    p = planning.plan_recipe(recipe, h100)
    L = p.layout
    assert (L.cp, L.cp_comm_type, L.recompute, L.dp) == (4, "all_gather", "full", 8)
    assert p.fits
    # all_gather CP keeps the other ranks' keys and values: more attention memory than p2p
    kept = planning.plan_recipe(recipe, h100, recompute="none").peak.activations["attention"]
    p2p = planning.plan_recipe(recipe, h100, recompute="none", cp_comm_type="p2p")
    assert kept > p2p.peak.activations["attention"]
