"""Every shipped recipe validates; each kind of bad recipe fails with one readable line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vlm.training.recipe import RecipeError, check_against_world, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE_SETS = {"tiny": 2, "nano_v2_vl": 256}  # the world size each set is written for


def stage_recipes(name):
    return sorted(p for p in (REPO / "recipes" / name).glob("*.yaml") if not p.name.startswith("_"))


@pytest.mark.parametrize("recipe_set", sorted(RECIPE_SETS))
def test_shipped_recipes_validate(recipe_set):
    files = stage_recipes(recipe_set)
    assert [p.stem for p in files if p.stem.startswith("stage")] == [f"stage{i}" for i in range(5)]
    for path in files:
        recipe = load_recipe(path)
        assert check_against_world(recipe, RECIPE_SETS[recipe_set]) >= 1
        assert (REPO / recipe.model.config).is_file(), recipe.model.config
        if recipe.name.startswith("stage"):
            assert recipe.checkpoint.init_from, f"{path.name} must start from the previous stage"


def test_tiny_recipes_pass_the_launcher_check(workdir):
    for path in stage_recipes("tiny"):
        proc = subprocess.run([sys.executable, "-m", "megatron_vlm.train", "--recipe",
                               f"recipes/tiny/{path.name}", "--validate-only", "--world-size", "2"],
                              cwd=workdir, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.returncode == 0, proc.stderr


BAD = {
    "unknown key": ("train: {stepz: 3}", "unknown key 'train.stepz' (did you mean 'steps'?)"),
    "wrong type": ("train: {global_batch_size: eight}",
                   "train.global_batch_size: expected int, got str 'eight'"),
    "bad choice": ("train: {precision: fp16}",
                   "train.precision: must be one of ('fp32', 'bf16', 'fp8'), got 'fp16'"),
    "parallel sizes": ("parallel: {tp: 3}",
                       "parallel: parallel sizes tp=3 x pp=1 x cp=1 = 3 do not divide the world "
                       "size 2"),
    "missing data": ("data: {blend: [{path: demo_data/shards/nothing_here/train}]}",
                     "data.blend[0].path: path does not exist: demo_data/shards/nothing_here/train"),
    "fp8 without TE": ("train: {precision: fp8}", "train.precision: fp8 needs TransformerEngine"),
    "nothing to train": ("model: {freeze: [vision, connector, llm]}",
                         "model.freeze: every part is frozen"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_recipe_gives_one_line_error(workdir, kind):
    body, message = BAD[kind]
    bad = workdir / "bad.yaml"
    bad.write_text(f"base: recipes/tiny/stage1.yaml\n{body}\n")
    proc = subprocess.run([sys.executable, "-m", "megatron_vlm.train", "--recipe", str(bad),
                           "--validate-only", "--world-size", "2"], cwd=workdir,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"recipe error: {bad}: ") and message in lines[0], lines[0]


def test_overrides_and_base_merge():
    recipe = load_recipe(REPO / "recipes/tiny/stage1.yaml",
                         ["train.steps=17", "parallel.tp=1", "optimizer.lr=3e-3"])
    assert recipe.train.steps == 17 and recipe.parallel.tp == 1
    assert recipe.optimizer.lr == 3e-3  # YAML alone would read "3e-3" as a string
    assert recipe.optimizer.clip_grad == 1.0  # from _common.yaml
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(REPO / "recipes/tiny/stage1.yaml", ["train.steps"])
