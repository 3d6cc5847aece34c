"""Model YAMLs are checked like recipes (unknown keys with a did-you-mean, types, choices; one line
naming the file and key) and the shipped ones are found from an installed package."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_vlm.models.config import (ModelConfigError, load_model_config, load_radio_config,
                                        load_vlm_config, resolve_model_yaml)
from megatron_vlm.training.recipe import RecipeError, check_paths, load_recipe

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "recipes" / "models"


def _loader(raw: dict):
    if "language_model" in raw:
        return load_vlm_config
    return load_radio_config if "patch_size" in raw else load_model_config


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_model_configs_validate(path):
    raw = yaml.safe_load(path.read_text())
    cfg = _loader(raw)(path)
    assert cfg["name"] == path.stem
    assert set(raw) - {"language_model", "vision_model"} <= set(cfg)


def _write(tmp_path: Path, base: str, name: str, **changes) -> Path:
    raw = yaml.safe_load((MODELS / f"{base}.yaml").read_text())
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v != "DROP"}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("base,changes,expected", [
    ("nemotron_h_tiny", {"hiden_size": 128}, "unknown key 'hiden_size' (did you mean 'hidden_size'?)"),
    ("nemotron_h_tiny", {"hidden_size": "big"}, "hidden_size: expected int, got str 'big'"),
    ("nemotron_h_tiny", {"untie_embeddings_and_output_weights": 1},
     "untie_embeddings_and_output_weights: expected bool, got int 1"),
    ("nemotron_h_tiny", {"vocab_size": "DROP"}, "missing required key 'vocab_size'"),
    ("nemotron_h_tiny", {"params_dtype": "float8"}, "params_dtype: must be one of"),
    ("nemotron_h_tiny", {"position_embedding_type": "rope"}, "position_embedding_type: must be one of ('none',)"),
    ("radio_tiny", {"activation": "relu"}, "activation: must be one of ('gelu',)"),
    ("radio_tiny", {"patch_sise": 16}, "unknown key 'patch_sise' (did you mean 'patch_size'?)"),
    ("vlm_tiny", {"projector_hiden_size": 512}, "did you mean 'projector_hidden_size'?"),
    ("vlm_tiny", {"downsample_ratio": "half"}, "downsample_ratio: expected float, got str 'half'"),
])
def test_bad_model_config_is_one_line_naming_file_and_key(tmp_path, base, changes, expected):
    path = _write(tmp_path, base, "bad.yaml", **changes)
    with pytest.raises(ModelConfigError) as e:
        _loader(yaml.safe_load(path.read_text()))(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_error_in_a_part_names_the_part_file(tmp_path):
    llm = _write(tmp_path, "nemotron_h_tiny", "llm.yaml", mamba_head_dims=32)
    vlm = _write(tmp_path, "vlm_tiny", "vlm.yaml", language_model=str(llm))
    with pytest.raises(ModelConfigError, match=rf"^{llm}: unknown key 'mamba_head_dims' "
                                               r"\(did you mean 'mamba_head_dim'\?\)"):
        load_vlm_config(vlm)
    with pytest.raises(ModelConfigError, match=r"^LLM config \(dict\): unknown key 'hiden'"):
        load_model_config(dict(load_model_config("nemotron_h_tiny"), hiden=1))


def test_recipe_check_names_the_recipe_and_the_model_file(tmp_path):
    model = _write(tmp_path, "vlm_tiny", "vlm.yaml", vision_modle="radio_tiny")
    recipe = load_recipe(REPO / "recipes/tiny/stage1.yaml", [f"model.config={model}"])
    with pytest.raises(RecipeError, match=rf"stage1.yaml: model.config: {model}: unknown key "
                                          r"'vision_modle' \(did you mean 'vision_model'\?\)"):
        check_paths(recipe)


def test_shipped_configs_found_from_the_installed_package(tmp_path):
    """setup.py ships recipes/ as megatron_vlm/recipes; from outside the repo the recipe spelling
    ``recipes/models/x.yaml`` and a bare name resolve to the installed copy."""
    build = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(build)],
                   cwd=REPO, check=True, capture_output=True)
    lib = build / "lib"
    probe = ("import megatron_vlm, sys\n"
             "from megatron_vlm.models.config import load_vlm_config, resolve_model_yaml\n"
             "print(megatron_vlm.__file__)\n"
             "print(resolve_model_yaml('recipes/models/vlm_tiny.yaml'))\n"
             "print(resolve_model_yaml('nemotron_h_tiny'))\n"
             "print(load_vlm_config('recipes/models/vlm_tiny.yaml')['vision_model']['name'])\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(lib))
    proc = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env,
                          capture_output=True, text=True, check=True)
    package, vlm, llm, vision = proc.stdout.split()
    installed = lib / "megatron_vlm"
    assert package == str(installed / "__init__.py")
    assert vlm == str(installed / "recipes/models/vlm_tiny.yaml")
    assert llm == str(installed / "recipes/models/nemotron_h_tiny.yaml")
    assert vision == "radio_tiny"
    # In the checkout the same spellings resolve to the repository's files.
    assert resolve_model_yaml("nemotron_h_tiny") == MODELS / "nemotron_h_tiny.yaml"
