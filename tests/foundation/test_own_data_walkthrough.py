"""README "Train on your own data", followed on a generated folder: the README's example records,
its recipe and its commands are read from README.md itself, so they cannot drift from what runs.

The data steps and recipe validation run in ``make test``; training, evaluation and export (a
minute or more on 2 busy cores) in ``make test-all``.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Train on your own data"
# Test-size overrides appended to the README's training command (its recipe trains 200 steps).
TRAIN_OVERRIDES = ["train.steps=2", "train.global_batch_size=2", "train.micro_batch_size=1", "schedule.warmup_steps=0",
                   "eval.batches=1"]


def _section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def _block(section: str, lang: str, after: str = "") -> str:
    """The first ```lang block of the section after the text ``after``."""
    at = section.index(after) if after else 0
    match = re.search(rf"```{lang}\n(.*?)```", section[at:], re.S)
    assert match, f"no {lang} block in the README section"
    return match.group(1)


def readme_commands() -> list:
    block = _block(_section(), "bash", "<!-- own-data-commands")
    cmds = [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert all(c[0] == "python" for c in cmds), cmds
    return [[sys.executable] + c[1:] for c in cmds]


def _image(path: Path, size, seed: int) -> None:
    g = np.random.default_rng(seed)
    img = np.full((size[1], size[0], 3), g.integers(0, 256, 3), dtype=np.uint8)
    x, y = g.integers(0, size[0] // 2), g.integers(0, size[1] // 2)
    img[y:y + size[1] // 3, x:x + size[0] // 3] = g.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _question(i: int, answer: str) -> dict:
    return {"id": f"q{i}", "images": [f"images/q{i}.png"], "answer": answer, "messages": [
        {"role": "system", "content": "/no_think"},
        {"role": "user", "content": "<image>\nWhat colour is the square?"},
        {"role": "assistant", "content": answer}]}


def make_folder(root: Path) -> None:
    """my_data/: the README's example records (their images and clip generated) plus a few more
    image questions for training, and 3 held-out questions with answers."""
    from megatron_vlm.data.video_encode import encode_frames
    from tests.video.conftest import moving_square

    data = root / "my_data"
    examples = [json.loads(line) for line in _block(_section(), "json").splitlines() if line.strip()]
    for k, name in enumerate(("a1", "a2", "a3")):
        _image(data / "images" / f"{name}.png", (96 + 32 * k, 64), k)
    times = [t / 4 for t in range(10)]  # 2.5 s at 4 fps
    (data / "clips").mkdir(parents=True)
    (data / "clips" / "v1.mp4").write_bytes(encode_frames(moving_square(times, size=64), times, "h264"))
    colours = ["red", "blue", "green", "yellow"]
    train = examples + [_question(i, colours[i % 4]) for i in range(6)]
    held_out = [_question(100 + i, colours[i % 4]) for i in range(3)]
    for i in list(range(6)) + [100, 101, 102]:
        _image(data / "images" / f"q{i}.png", (64 + 16 * (i % 3), 64), 10 + i)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    recipe = _block(_section(), "yaml")
    target = recipe.splitlines()[0].lstrip("# ").strip()
    assert target == "recipes/my_data/sft.yaml", target
    # recipes/: the repo's tiny recipes and models, plus the README's recipe
    (root / "recipes" / "my_data").mkdir(parents=True)
    for sub in ("tiny", "models"):
        (root / "recipes" / sub).symlink_to(REPO / "recipes" / sub)
    (root / target).write_text(recipe)


def run(cmd: list, root: Path, extra=(), timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd + list(extra), cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc) -> str:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The folder, then the README's data commands (tokenizer, shards, inspect, validation)."""
    root = tmp_path_factory.mktemp("own_data")
    make_folder(root)
    cmds = readme_commands()
    data_steps = [c for c in cmds if c[2].startswith("megatron_vlm.data_prep.") or "--validate-only" in c]
    outputs = [_ok(run(c, root)) for c in data_steps]
    return root, cmds, outputs


def test_readme_data_steps_and_validation(prepared):
    root, cmds, outputs = prepared
    assert [c[2] for c in cmds] == ["megatron_vlm.data_prep.train_tokenizer", "megatron_vlm.data_prep.build_shards",
                                    "megatron_vlm.data_prep.build_shards", "megatron_vlm.data_prep.inspect", "megatron_vlm.train",
                                    "megatron_vlm.train", "megatron_vlm.cli.evaluate", "megatron_vlm.cli.convert_checkpoint"]
    train = json.loads((root / "my_data/shards/train/index.json").read_text())
    held_out = json.loads((root / "my_data/shards/eval/index.json").read_text())
    # every README example record and every generated question became a sample, at 64 px
    assert train["num_samples"] == 5 + 6 and sum(train["skipped"].values()) == 0, train["skipped"]
    assert held_out["num_samples"] == 3 and train["tiling"]["tile_size"] == 64
    assert json.loads(outputs[1].strip().splitlines()[-1])["num_samples"] == 11
    # inspect: the README's clip and all images are there
    assert "samples: 11" in outputs[3] and "media: image=9, video=1" in outputs[3], outputs[3]

def test_readme_recipe_refuses_shards_of_another_tile_size(prepared, monkeypatch):
    """What ``--validate-only data.tile_size=128`` would say (checked in-process: one process
    start less), in one line naming the folder and both sizes."""
    from megatron_vlm.training.recipe import RecipeError, check_paths, load_recipe

    root = prepared[0]
    monkeypatch.chdir(root)
    recipe = load_recipe(root / "recipes/my_data/sft.yaml", ["data.tile_size=128"])
    with pytest.raises(RecipeError) as err:
        check_paths(recipe)
    line = str(err.value)
    assert "\n" not in line and "data.blend[0].path: my_data/shards/train: shards hold" in line, line
    assert "hold 64 px tiles" in line and "data.tile_size is 128" in line, line


@pytest.mark.slow
def test_readme_train_evaluate_export(prepared):
    root, cmds, _ = prepared
    train = next(c for c in cmds if c[2] == "megatron_vlm.train" and "--validate-only" not in c)
    _ok(run(train, root, TRAIN_OVERRIDES))
    assert (root / "runs/my_data/sft/latest").read_text().strip() == "step_0000002"
    out = _ok(run(next(c for c in cmds if c[2] == "megatron_vlm.cli.evaluate"), root))
    scores = json.loads((root / "runs/my_data/sft/scores.json").read_text())
    assert set(scores) == {"my_data_acc", "my_data_anls"} and "3 samples" in out, (scores, out)
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    _ok(run(next(c for c in cmds if c[2] == "megatron_vlm.cli.convert_checkpoint"), root))
    config = json.loads((root / "hf/my_data/config.json").read_text())
    assert config["model_type"] == "nemotron_h_omni" or "text_config" in config, config
    assert any(p.suffix == ".safetensors" for p in (root / "hf/my_data").iterdir())


def test_a_tokenizer_larger_than_the_model_vocab_is_refused_at_start_up(prepared, tmp_path, monkeypatch):
    """The README's tokenizer on a tiny VLM whose LLM has 256 ids: one line, before any model is built."""
    import yaml

    from megatron_vlm.data.tokenizer import VLMTokenizer
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.recipe import RecipeError, load_recipe

    root = prepared[0]
    monkeypatch.chdir(root)
    llm = yaml.safe_load((REPO / "recipes/models/nemotron_h_tiny.yaml").read_text())
    llm["vocab_size"] = 256
    (tmp_path / "llm.yaml").write_text(yaml.safe_dump(llm))
    vlm = yaml.safe_load((REPO / "recipes/models/vlm_tiny.yaml").read_text())
    vlm["language_model"] = str(tmp_path / "llm.yaml")
    (tmp_path / "vlm.yaml").write_text(yaml.safe_dump(vlm))
    n = VLMTokenizer.from_pretrained(root / "my_data/tokenizer").vocab_size
    assert n > 256
    recipe = load_recipe(root / "recipes/my_data/sft.yaml", [f"model.config={tmp_path / 'vlm.yaml'}"])
    with pytest.raises(RecipeError) as err:
        build_model_chunks(recipe)
    assert str(err.value).endswith(f"data.tokenizer has {n} tokens but the model's vocab_size is 256")
