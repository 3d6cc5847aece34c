"""The recompute / fp8 recipe sections: validation, what reaches megatron, and the fp8 guard."""

import pytest

from megatron_vlm.training.model_setup import check_fp8_available, fp8_overrides, recompute_overrides
from megatron_vlm.training.recipe import RecipeError, load_recipe

STAGE = "recipes/tiny/stage1.yaml"


def test_defaults_and_megatron_fields():
    recipe = load_recipe(STAGE)
    assert recipe.recompute.mode == "none" and recompute_overrides(recipe.recompute) == {}
    full = load_recipe(STAGE, ["recompute.mode=full", "recompute.method=block",
                               "recompute.num_layers=2"])
    assert recompute_overrides(full.recompute) == {
        "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}
    selective = load_recipe(STAGE, ["recompute.mode=selective"])
    assert recompute_overrides(selective.recompute) == {
        "recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    fp8 = load_recipe(STAGE, ["fp8.recipe=tensorwise", "fp8.margin=1", "fp8.amax_history_len=16"])
    assert fp8_overrides(fp8.fp8) == {"fp8": "e4m3", "fp8_recipe": "tensorwise", "fp8_margin": 1,
                                      "fp8_amax_history_len": 16}
    assert fp8_overrides(recipe.fp8)["fp8"] == "hybrid"  # delayed scaling: e4m3 fwd, e5m2 bwd


@pytest.mark.parametrize("override, message", [
    ("recompute.mode=partial", "recompute.mode: must be one of"),
    ("recompute.method=random", "recompute.method: must be one of"),
    ("recompute.num_layers=0", "recompute.num_layers: must be >= 1"),
    ("fp8.recipe=e5m2", "fp8.recipe: must be one of"),
    ("parallel.vpp=2", "unknown key 'parallel.vpp'"),
])
def test_bad_values_give_one_line(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(STAGE, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fp8_without_transformer_engine_is_one_line():
    with pytest.raises(RecipeError, match="fp8 needs a GPU with TransformerEngine") as err:
        check_fp8_available("stage.yaml", on_cpu=True)
    assert "\n" not in str(err.value)


def test_full_recipes_recompute_where_the_planner_needs_it():
    modes = {s: load_recipe(f"recipes/nano_v2_vl/stage{s}.yaml").recompute for s in range(5)}
    assert {s: r.mode for s, r in modes.items()} == {0: "none", 1: "none", 2: "none", 3: "full",
                                                      4: "full"}
    assert all(r.vision for r in modes.values())
