"""Every recipe value is range-checked; YAML syntax/encoding errors and malformed overrides give
one line each, before any compute."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vlm.training.recipe import RecipeError, check_paths, load_recipe

REPO = Path(__file__).resolve().parents[2]
STAGE1 = REPO / "recipes/tiny/stage1.yaml"

BAD_VALUES = {  # override -> words of the one-line error
    "optimizer.lr=.nan": "optimizer.lr: must be a finite number, got nan",
    "optimizer.lr=-1e-3": "need 0 <= min_lr <= lr and lr > 0",
    "optimizer.min_lr=.inf": "optimizer.min_lr: must be a finite number, got inf",
    "optimizer.weight_decay=-0.1": "optimizer.weight_decay: must be >= 0, got -0.1",
    "optimizer.adam_beta1=1.0": "optimizer.adam_beta1: must be in [0, 1), got 1.0",
    "optimizer.adam_beta2=-0.5": "optimizer.adam_beta2: must be in [0, 1)",
    "optimizer.adam_eps=0": "optimizer.adam_eps: must be > 0, got 0.0",
    "optimizer.clip_grad=-1": "optimizer.clip_grad: must be >= 0",
    "train.max_wall_minutes=-5": "train.max_wall_minutes: must be > 0, got -5.0",
    "train.max_wall_minutes=nan": "train.max_wall_minutes: must be a finite number",
    "train.steps=0": "train.steps: must be >= 1, got 0",
    "train.steps=2.5": "train.steps: expected int, got float 2.5",
    "train.micro_batch_size=3": "train.global_batch_size=8 is not a multiple of train.micro_batch",
    "train.seed=-1": "train.seed: must be >= 0, got -1",
    "schedule.warmup_steps=-2": "schedule.warmup_steps: must be >= 0, got -2",
    "data.seed=-3": "data.seed: must be >= 0",
    "data.tile_size=0": "data.tile_size: must be >= 1, got 0",
    "data.seq_length=-256": "data.seq_length: must be >= 1",
    "data.blend=[{path: a.tar, weight: .inf}]": "data.blend[0].weight: must be a finite number",
    "data.blend=[{path: a.tar, weight: -1}]": "data.blend[0].weight: must be > 0",
    "data.blend=[{path: 'a.tar::'}]": "data.blend[0].path: empty path in 'a.tar::'",
    "eval.max_new_tokens=0": "eval.max_new_tokens: must be >= 1, got 0",
    "eval.batches=-1": "eval.batches: must be >= 1",
    "checkpoint.keep=-1": "checkpoint.keep: must be >= 0",
    "checkpoint.dir=' '": "checkpoint.dir: must not be empty",
    "logging.interval=0": "logging.interval: must be >= 1",
}
BAD_OVERRIDES = {
    "train.steps": "must look like section.key=value",
    "train..steps=3": "empty key",
    "=3": "empty key",
    "train.steps=[1, 2": "train.steps: value '[1, 2' is not valid YAML",
    "train.steps.x=3": "override train.steps.x: steps is not a section",
    "data.blend=[{path: a, wieght: 2}]": "unknown key 'data.blend[0].wieght'",
}


@pytest.mark.parametrize("override", sorted(BAD_VALUES))
def test_each_bad_value_is_one_line(override):
    with pytest.raises(RecipeError) as err:
        load_recipe(STAGE1, [override])
    assert BAD_VALUES[override] in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert str(err.value).startswith(str(STAGE1))


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES))
def test_each_malformed_override_is_one_line(override):
    with pytest.raises(RecipeError) as err:
        load_recipe(STAGE1, [override])
    assert BAD_OVERRIDES[override] in str(err.value) and "\n" not in str(err.value), str(err.value)


def _validate(recipe: Path, cwd: Path):
    return subprocess.run([sys.executable, "-m", "megatron_vlm.train", "--recipe", str(recipe),
                           "--validate-only", "--world-size", "2"], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_yaml_syntax_and_encoding_errors_are_one_line(tmp_path):
    cases = {
        "syntax.yaml": (b"base: %s\ntrain: {steps: 3\noptimizer: {lr: 1}\n" % str(STAGE1).encode(),
                        "not valid YAML: line 3, column"),
        "tabs.yaml": (b"train:\n\tsteps: 3\n", "not valid YAML: line 2, column 1"),
        "latin1.yaml": (b"description: caf\xe9\n", "not UTF-8 text (byte 16"),
        "list.yaml": (b"- a\n- b\n", "a recipe must be a mapping of sections"),
        "intkey.yaml": (b"base: %s\n1: 2\n" % str(STAGE1).encode(), "key 1 is not a name"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RecipeError) as err:
            load_recipe(tmp_path / name)
        assert words in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
    # Through the launcher: exit code 2 and exactly one line on stderr.
    proc = _validate(tmp_path / "syntax.yaml", tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("recipe error: ") and "not valid YAML" in proc.stderr


def test_double_colon_shard_lists_pass_the_path_check(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(STAGE1)
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    a.write_bytes(b"")
    b.write_bytes(b"")
    recipe.model.config = str(REPO / recipe.model.config)
    recipe.data.tokenizer = str(tmp_path)
    recipe.data.eval = []
    recipe.data.blend[0].path = f"{a}::{b}"
    recipe.data.blend = recipe.data.blend[:1]
    check_paths(recipe)  # accepted: both exist
    recipe.data.blend[0].path = f"{a}::{tmp_path / 'missing.tar'}"
    with pytest.raises(RecipeError, match="data.blend.0..path: path does not exist: .*missing.tar"):
        check_paths(recipe)


def test_a_bad_value_on_two_ranks_is_printed_once(tmp_path):
    from megatron_vlm.distributed import free_port

    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(free_port()), "-m", "megatron_vlm.train",
                           "--recipe", "recipes/tiny/base.yaml", "optimizer.adam_eps=-1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("optimizer.adam_eps: must be > 0, got -1.0") == 1, out[-3000:]
    assert out.count("recipe error: ") == 1, out[-3000:]
