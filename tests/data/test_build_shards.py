import filecmp
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from megatron_vlm.data_prep.build_shards import build_shards
from megatron_vlm.data.schema import validate_metadata
from megatron_vlm.data.shard_reader import read_shard
from megatron_vlm.data.tiling import TilingConfig, num_tiles

from .conftest import REPO, make_image, write_records

TILING = TilingConfig(32, 1, 6, True)


def _with_bad_media(directory) -> str:
    """20 good records, plus a corrupt JPEG, a missing image and a malformed line."""
    path = write_records(str(directory), 20, seed=5)
    make_image(os.path.join(directory, "img", "ok.jpg"), (64, 48), 1)
    with open(os.path.join(directory, "img", "ok.jpg"), "rb") as f:
        data = f.read()
    with open(os.path.join(directory, "img", "broken.jpg"), "wb") as f:
        f.write(data[: len(data) // 3])
    extra = [
        {"messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
         "images": ["img/broken.jpg"]},
        {"messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
         "images": ["img/nowhere.png"]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "images": ["img/ok.jpg"]},
    ]
    with open(path, "a") as f:
        for r in extra:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")
    return path


def test_deterministic_and_worker_independent(tmp_path):
    jsonl = _with_bad_media(tmp_path)
    logs = []
    m1 = build_shards(jsonl, str(tmp_path / "one"), tiling=TILING, samples_per_shard=5, workers=2, log=logs.append)
    m2 = build_shards(jsonl, str(tmp_path / "two"), tiling=TILING, samples_per_shard=5, workers=1, log=lambda m: None)
    m3 = build_shards(jsonl, str(tmp_path / "one"), tiling=TILING, samples_per_shard=5, workers=2, log=lambda m: None)
    assert m1 == m2 == m3
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two"))
    assert names == ["index.json"] + [f"shard-{i:05d}.tar" for i in range(5)]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two", names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == 6
    with tarfile.open(tmp_path / "one" / "shard-00000.tar") as t:
        for info in t.getmembers():
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)


def test_bad_media_are_reported_counted_and_skipped(tmp_path):
    jsonl = _with_bad_media(tmp_path)
    logs = []
    manifest = build_shards(jsonl, str(tmp_path / "out"), tiling=TILING, samples_per_shard=5, log=logs.append)
    assert manifest["skipped"] == {"missing_image": 1, "corrupt_image": 1, "bad_record": 1}
    assert manifest["num_samples"] == 21
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 5, 5, 1]
    assert any("broken.jpg" in m and ":21:" in m for m in logs)
    assert any("nowhere.png" in m and ":22:" in m for m in logs)
    assert any(":24:" in m and "invalid JSON" in m for m in logs)
    assert "skipped missing_image=1, corrupt_image=1, bad_record=1 (total 3)" in logs[-1]
    # every written sample is valid and its tiles are what the rule says
    total = 0
    for shard in manifest["shards"]:
        raws = list(read_shard(str(tmp_path / "out" / shard["url"])))
        assert len(raws) == shard["num_samples"] and all(r.error is None for r in raws)
        for r in raws:
            meta = json.loads(r.members["json"])
            validate_metadata(meta)
            for item in meta["media"]:
                w, h = item["size"]
                assert len(item["tiles"]) == num_tiles(w, h, TILING)
                for name in item["tiles"]:
                    assert Image.open(__import__("io").BytesIO(r.members[name])).size == (32, 32)
            total += 1
    assert total == 21
    llava = [json.loads(r.members["json"]) for r in read_shard(str(tmp_path / "out" / "shard-00004.tar"))][0]
    assert llava["conversation"][0] == {"role": "user", "content": "<image>\nq"}  # placeholder added


def test_shard_size_limit_and_stale_shards(tmp_path):
    jsonl = write_records(str(tmp_path), 12, seed=3)
    out = str(tmp_path / "out")
    many = build_shards(jsonl, out, tiling=TILING, samples_per_shard=2, log=lambda m: None)
    assert len(many["shards"]) == 6
    few = build_shards(jsonl, out, tiling=TILING, samples_per_shard=100, max_shard_bytes=20_000, log=lambda m: None)
    assert sum(s["num_samples"] for s in few["shards"]) == 12
    assert all(s["num_bytes"] < 20_000 + 15_000 for s in few["shards"])
    assert sorted(os.listdir(out)) == ["index.json"] + [s["url"] for s in few["shards"]]


def test_cli(tmp_path):
    jsonl = _with_bad_media(tmp_path)
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "megatron_vlm.data_prep.build_shards", "--input", jsonl, "--out", str(out),
                           "--tile-size", "32", "--max-tiles", "4", "--samples-per-shard", "8", "--workers", "2",
                           "--image-format", "jpeg"], cwd=REPO, capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"num_samples": 21, "num_shards": 3,
                       "skipped": {"missing_image": 1, "corrupt_image": 1, "bad_record": 1}}
    assert "broken.jpg" in proc.stderr and "nowhere.png" in proc.stderr
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["image_format"] == "jpg" and manifest["tiling"]["max_tiles"] == 4
    with tarfile.open(out / "shard-00000.tar") as t:
        assert any(n.endswith(".jpg") for n in t.getnames())


def test_video_record_fits_the_schema(tmp_path, tokenizer):
    from megatron_vlm.data.prompt import PromptEncoder
    from megatron_vlm.data.sample_decoder import decode_sample

    os.makedirs(tmp_path / "clip")
    frames = []
    for i in range(3):
        make_image(str(tmp_path / "clip" / f"f{i}.png"), (80, 45), i)  # 16:9 frames -> squashed to one tile
        frames.append(f"clip/f{i}.png")
    rec = {"messages": [{"role": "user", "content": "<video>\nwhat happens?"}, {"role": "assistant", "content": "a"}],
           "videos": [{"frames": frames, "timestamps": [0.0, 0.5, 1.0], "source": "clip.mp4"}]}
    (tmp_path / "v.jsonl").write_text(json.dumps(rec) + "\n")
    m = build_shards(str(tmp_path / "v.jsonl"), str(tmp_path / "out"), tiling=TILING, log=lambda msg: None)
    assert m["num_samples"] == 1 and m["num_tiles"] == 3
    raw = next(read_shard(str(tmp_path / "out" / m["shards"][0]["url"])))
    sample = decode_sample(raw, 32)
    assert sample.meta["media"][0]["frames"][1] == {"t": 0.5, "tile": "m00.f001.png"}
    assert sample.tiles.shape == (3, 32, 32, 3)
    enc = PromptEncoder(tokenizer, 4).encode(sample.meta)
    assert enc.tiles_per_media == [3] and (enc.tokens == tokenizer.image_id).sum() == 3 * 4


# ---- --help, progress, the tile size a recipe must agree with -------------------------------------
def test_help_documents_the_format_and_every_default():
    from megatron_vlm.data_prep.build_shards import _parser

    parser = _parser()
    text = parser.format_help()
    for word in ('"messages"', '"images"', "<image>", "<video>", '"videos"', '"start"', '"end"',
                 '"frames"', '"system"', "/think", "/no_think", '"reasoning"', '"answer"', '"text"',
                 "Multi-turn"):
        assert word in text, word
    for action in parser._actions:
        if action.option_strings and not action.required and action.dest != "help":
            assert "default" in (action.help or ""), action.dest


def test_progress_lines_are_throttled_with_rate_and_eta(tmp_path):
    jsonl = _with_bad_media(tmp_path)  # 24 non-empty lines, 21 usable
    ticks = iter(0.5 * i for i in range(1000))  # a clock that advances 0.5 s per reading
    logs = []
    build_shards(jsonl, str(tmp_path / "out"), tiling=TILING, log=logs.append, progress_every=1.0,
                 clock=lambda: next(ticks))
    lines = [m for m in logs if "records/s" in m]
    # a line every 2 records (1 s), none for the last record (the summary follows)
    assert [int(m.split(": ")[1].split("/")[0]) for m in lines] == list(range(2, 24, 2))
    assert lines[0] == "build_shards data.jsonl: 2/24 records (8%), 2.0 records/s, ETA 0:00:11"
    quiet = []
    build_shards(jsonl, str(tmp_path / "out2"), tiling=TILING, log=quiet.append, progress_every=0)
    assert not any("records/s" in m for m in quiet)


def test_a_recipe_refuses_shards_of_another_tile_size(tmp_path, tokenizer_dir, monkeypatch):
    from megatron_vlm.training.recipe import RecipeError, check_paths, load_recipe

    jsonl = write_records(str(tmp_path), 4, seed=3)
    build_shards(jsonl, str(tmp_path / "s32"), tiling=TILING, log=lambda m: None)  # 32 px
    monkeypatch.chdir(REPO)
    shards = str(tmp_path / "s32")
    recipe = load_recipe(os.path.join(REPO, "recipes", "tiny", "base.yaml"),
                         [f"data.blend=[{{path: {shards}}}]", "data.eval=[]",
                          f"data.tokenizer={tokenizer_dir}"])
    assert recipe.data.tile_size == 64
    with pytest.raises(RecipeError) as err:
        check_paths(recipe)
    msg = str(err.value)
    assert "\n" not in msg and "data.blend[0].path" in msg and shards in msg
    assert "hold 32 px tiles" in msg and "data.tile_size is 64" in msg
    recipe.data.tile_size = 32
    check_paths(recipe)  # agreeing sizes pass
    recipe.data.eval = recipe.data.blend  # eval sets are checked too
    recipe.data.tile_size = 48
    with pytest.raises(RecipeError, match=r"data.blend\[0\].path: .* hold 32 px"):
        check_paths(recipe)
