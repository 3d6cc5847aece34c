import json
import logging
import os
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
from PIL import Image

from megatron_vlm.data.batch import check_batch
from megatron_vlm.data.image import encode_tile
from megatron_vlm.data.loader import DatasetSpec, PackedVLMLoader, resolve_shards
from megatron_vlm.data.schema import dumps_metadata
from megatron_vlm.data.shard_reader import read_shard
from megatron_vlm.data.shard_writer import ShardWriter

from .conftest import PATCH, TILE
from .loader_probe import run as probe_run

HERE = os.path.dirname(os.path.abspath(__file__))
TPT = (TILE // PATCH // 2) ** 2


def manifest_keys(shard_dir: str) -> dict[str, list[str]]:
    """shard file name -> sample keys, read straight from the tars."""
    urls, _ = resolve_shards(shard_dir)
    return {os.path.basename(u): [r.key for r in read_shard(u)] for u in urls}


def loader(tokenizer, datasets, **kw):
    args = dict(seq_length=128, micro_batch_size=2, tile_size=TILE, patch_size=PATCH, seed=7, shuffle_window=3)
    args.update(kw)
    return PackedVLMLoader(datasets, tokenizer, **args)


def read_all(ld) -> list[dict]:
    return list(ld)


# ---- data-parallel split ------------------------------------------------------------------------
@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_ranks_disjoint_and_exact_counts(tokenizer, dataset_a, dp_size):
    per_shard = manifest_keys(dataset_a)
    manifest = json.load(open(os.path.join(dataset_a, "index.json")))
    counts = {s["url"]: s["num_samples"] for s in manifest["shards"]}
    assert sum(counts.values()) == 48 == sum(len(k) for k in per_shard.values())
    seen = []
    for rank in range(dp_size):
        ld = loader(tokenizer, [DatasetSpec("a", dataset_a)], dp_rank=rank, dp_size=dp_size, num_epochs=1)
        keys = [k for b in read_all(ld) for row in b["sample_keys"] for k in row]
        my_shards = [os.path.basename(ld.streams[0].urls[i]) for i in ld.streams[0].shards_of_epoch(0)]
        assert len(keys) == len(set(keys)) == sum(counts[s] for s in my_shards)
        assert {k.split("/")[1] for k in keys} == set(my_shards)
        assert ld.counters["total"]["samples_used"] == len(keys)
        seen.append(set(keys))
    for i in range(dp_size):
        for j in range(i + 1, dp_size):
            assert not seen[i] & seen[j]
    everything = {f"a/{shard}/{key}" for shard, keys in per_shard.items() for key in keys}
    assert set().union(*seen) == everything


def test_epochs_cover_every_sample_once_in_new_orders(tokenizer, dataset_a):
    ld = loader(tokenizer, [DatasetSpec("a", dataset_a)], num_epochs=2, shuffle_window=4)
    keys = [k for b in read_all(ld) for row in b["sample_keys"] for k in row]
    assert len(keys) == 96
    assert set(Counter(keys).values()) == {2}
    assert keys[:48] != keys[48:]  # reshuffled
    unshuffled = loader(tokenizer, [DatasetSpec("a", dataset_a)], num_epochs=1, shuffle=False)
    plain = [k for b in read_all(unshuffled) for row in b["sample_keys"] for k in row]
    assert sorted(plain) == sorted(keys[:48]) and plain != keys[:48]


@pytest.mark.parametrize("dp_size", [6, 8])
def test_fewer_shards_than_ranks_splits_by_sample(tokenizer, dataset_b, dp_size):
    all_keys = {f"b/{shard}/{k}" for shard, keys in manifest_keys(dataset_b).items() for k in keys}
    assert len(all_keys) == 30 and len(manifest_keys(dataset_b)) == 5 < dp_size
    seen = []
    for rank in range(dp_size):
        ld = loader(tokenizer, [DatasetSpec("b", dataset_b)], dp_rank=rank, dp_size=dp_size, num_epochs=1,
                    seq_length=512)
        assert ld.streams[0].split_by == "sample"
        keys = [k for b in read_all(ld) for row in b["sample_keys"] for k in row]
        assert len(keys) == len(set(keys)) and abs(len(keys) - 30 / dp_size) <= 2
        seen.append(set(keys))
    assert sum(len(s) for s in seen) == 30 and set().union(*seen) == all_keys


# ---- batches ------------------------------------------------------------------------------------
def test_batches_follow_the_contract(tokenizer, dataset_a, dataset_b):
    ld = loader(tokenizer, [DatasetSpec("a", dataset_a, 2.0), DatasetSpec("b", dataset_b, 1.0)])
    n_tiles = 0
    for _ in range(12):
        b = next(ld)
        check_batch(b, tokenizer.image_id, TPT)
        assert b["tokens"].shape == (2, 128) and b["tiles"].shape[1:] == (3, TILE, TILE)
        n_tiles += b["tiles"].shape[0]
    assert n_tiles > 0
    c = ld.counters["total"]
    assert c["truncated_text"] > 0  # dataset b has 400-word answers, longer than 128 tokens ...
    assert c["skipped_no_target"] > 0  # ... and 400-word questions, which leave nothing to learn
    assert c["samples_used"] + c["skipped_no_target"] == c["samples_read"]


def test_image_samples_that_do_not_fit_are_skipped(tokenizer, dataset_a, caplog):
    # 24 tokens: any image with more than 5 tiles (4 tokens each) cannot fit with its prompt
    ld = loader(tokenizer, [DatasetSpec("a", dataset_a)], seq_length=40, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.data"):
        batches = read_all(ld)
    for b in batches:
        check_batch(b, tokenizer.image_id, TPT)
    c = ld.counters["total"]
    assert c["skipped_too_long"] > 0
    assert c["samples_used"] + c["skipped_too_long"] + c["skipped_no_target"] == c["samples_read"] == 48
    assert sum("skipped_too_long" in r.message and ".tar" in r.message for r in caplog.records) == c["skipped_too_long"]


def test_blend_follows_weights(tokenizer, dataset_a, dataset_b):
    ld = loader(tokenizer, [DatasetSpec("a", dataset_a, 3.0), DatasetSpec("b", dataset_b, 1.0)], seq_length=512)
    for _ in range(40):
        next(ld)
    used = {k: v["samples_used"] for k, v in ld.counters["per_dataset"].items()}
    assert 0.65 < used["a"] / (used["a"] + used["b"]) < 0.85, used


# ---- damaged shards -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged_dataset(tmp_path_factory, dataset_a) -> tuple[str, list[str]]:
    """corrupt.tar: ok1, bad JPEG tile, missing JSON, ok2, truncated last member; then good.tar."""
    root = tmp_path_factory.mktemp("damaged")
    urls, _ = resolve_shards(dataset_a)
    samples = [r for u in urls for r in read_shard(u)]
    image_samples = [r for r in samples if any(k.endswith(".png") for k in r.members)]
    ok1, ok2, trunc = image_samples[0], image_samples[1], image_samples[2]

    meta = json.loads(ok1.members["json"])
    n = len(meta["media"][0]["tiles"])
    meta["media"][0]["tiles"] = [f"m00.t{j:02d}.jpg" for j in range(n)]
    tile = Image.new("RGB", (TILE, TILE), (200, 40, 40))
    jpeg = encode_tile(tile, "jpeg")
    bad_jpeg_members = [("json", dumps_metadata(meta))] + [(f"m00.t{j:02d}.jpg", jpeg) for j in range(n)]
    bad_jpeg_members[2] = (bad_jpeg_members[2][0], jpeg[: len(jpeg) // 2])  # tile 1 cut in half

    corrupt = str(root / "corrupt.tar")
    w = ShardWriter(corrupt)
    w.add("ok1", sorted(ok1.members.items()))
    w.add("badjpeg", bad_jpeg_members)
    w.add("nojson", [(k, v) for k, v in sorted(ok2.members.items()) if k != "json"])
    w.add("ok2", sorted(ok2.members.items()))
    w.add("trunc", sorted(trunc.members.items()))
    w.close()
    with tarfile.open(corrupt) as t:
        last = t.getmembers()[-1]
    with open(corrupt, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)

    good = str(root / "good.tar")
    w = ShardWriter(good)
    for r in samples[10:16]:
        w.add(r.key, sorted(r.members.items()))
    w.close()
    return str(root), [corrupt, good]


def test_damaged_shard_is_skipped_counted_and_logged(tokenizer, damaged_dataset, caplog):
    root, urls = damaged_dataset
    ld = loader(tokenizer, [DatasetSpec("d", urls)], num_epochs=1, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.data"):
        batches = read_all(ld)
    keys = [k for b in batches for row in b["sample_keys"] for k in row]
    assert [k.split("/")[2] for k in keys[:2]] == ["ok1", "ok2"]
    assert len(keys) == 2 + 6  # the good shard is read in full after the damage
    c = ld.counters["total"]
    assert (c["decode_error"], c["missing_json"], c["truncated_member"]) == (1, 1, 1)
    assert c["samples_read"] == 5 + 6 and c["samples_used"] == 8
    messages = [r.getMessage() for r in caplog.records]
    assert any("corrupt.tar" in m and "badjpeg.m00.t01.jpg" in m and "decode_error" in m for m in messages)
    assert any("corrupt.tar" in m and "nojson.json missing" in m for m in messages)
    assert any("corrupt.tar" in m and "trunc." in m and "truncated" in m for m in messages)
    assert len(messages) == 3


def test_unreadable_shard_is_counted(tokenizer, damaged_dataset, tmp_path):
    _, urls = damaged_dataset
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 40)
    ld = loader(tokenizer, [DatasetSpec("d", [str(junk), urls[1]])], num_epochs=1, shuffle=False)
    keys = [k for b in read_all(ld) for row in b["sample_keys"] for k in row]
    assert len(keys) == 6 and ld.counters["total"]["open_failed"] == 1


# ---- exact resume -------------------------------------------------------------------------------
def test_resume_in_new_process_gives_identical_batches(tokenizer_dir, dataset_a, dataset_b, damaged_dataset, tmp_path):
    _, damaged_urls = damaged_dataset
    config = {
        "datasets": [["a", dataset_a, 2.0], ["b", dataset_b, 1.0], ["d", damaged_urls, 0.7]],
        "tokenizer": tokenizer_dir, "seq_length": 128, "micro_batch_size": 2, "seed": 11,
        "tile_size": TILE, "patch_size": PATCH, "shuffle_window": 3,
    }
    n_first, n_next = 9, 8
    reference = probe_run(config, n_first + n_next)  # uninterrupted, in this process
    assert len(set(reference["digests"])) == n_first + n_next

    cfg_path, state_path = tmp_path / "config.json", tmp_path / "state.json"
    cfg_path.write_text(json.dumps(config))
    probe = os.path.join(HERE, "loader_probe.py")
    subprocess.run([sys.executable, probe, str(cfg_path), str(tmp_path / "first.json"), "--batches", str(n_first),
                    "--save-state", str(state_path)], check=True)
    subprocess.run([sys.executable, probe, str(cfg_path), str(tmp_path / "second.json"), "--batches", str(n_next),
                    "--load-state", str(state_path)], check=True)
    first = json.loads((tmp_path / "first.json").read_text())
    second = json.loads((tmp_path / "second.json").read_text())
    assert first["digests"] == reference["digests"][:n_first]
    assert second["digests"] == reference["digests"][n_first:]
    assert second["counters"] == reference["counters"]
    assert second["state"] == reference["state"]
    # the run crossed the damaged shard and an epoch boundary of the smaller datasets
    assert reference["counters"]["total"]["decode_error"] >= 1
    assert reference["state"]["positions"]["b"][0] >= 1 or reference["state"]["positions"]["d"][0] >= 1


@pytest.mark.parametrize("dp_rank, dp_size", [(0, 1), (4, 6)])  # (4, 6): dataset b is split by sample
def test_state_dict_round_trip_in_process(tokenizer, dataset_a, dataset_b, dp_rank, dp_size):
    specs = [DatasetSpec("a", dataset_a, 1.0), DatasetSpec("b", dataset_b, 1.0)]
    ld = loader(tokenizer, specs, seq_length=96, dp_rank=dp_rank, dp_size=dp_size, shuffle_window=2)
    for _ in range(5):
        next(ld)
    state = json.loads(json.dumps(ld.state_dict()))  # must be JSON-serialisable
    expected = [next(ld)["sample_keys"] for _ in range(6)]
    fresh = loader(tokenizer, specs, seq_length=96, dp_rank=dp_rank, dp_size=dp_size, shuffle_window=2)
    fresh.load_state_dict(state)
    assert [next(fresh)["sample_keys"] for _ in range(6)] == expected
    assert fresh.counters == ld.counters
    with pytest.raises(ValueError):
        loader(tokenizer, specs, seq_length=96, dp_size=dp_size + 1, dp_rank=0).load_state_dict(state)


def test_pipe_urls_and_brace_globs_stream_the_same_samples(tokenizer, dataset_a):
    local = loader(tokenizer, [DatasetSpec("a", dataset_a)], num_epochs=1, shuffle_window=5)
    expected = [b["sample_keys"] for b in read_all(local)]
    glob = f"pipe:cat {dataset_a}/a-{{00000..00011}}.tar"  # streamed through webdataset's gopen
    streamed = loader(tokenizer, [DatasetSpec("a", glob)], num_epochs=1, shuffle_window=5)
    assert len(streamed.streams[0].urls) == 12
    got = [next(streamed)["sample_keys"] for _ in range(4)]
    state = streamed.state_dict()  # resume mid-shard on a non-seekable stream
    resumed = loader(tokenizer, [DatasetSpec("a", glob)], num_epochs=1, shuffle_window=5)
    resumed.load_state_dict(state)
    got += [b["sample_keys"] for b in resumed]
    assert state["positions"]["a"][2] % 5 != 0  # mid-window
    assert got == expected


def test_folder_without_manifest(tokenizer, dataset_a, tmp_path):
    import shutil

    for name in os.listdir(dataset_a):
        if name.endswith(".tar"):
            shutil.copy(os.path.join(dataset_a, name), tmp_path / name)
    urls, manifest = resolve_shards(str(tmp_path))
    assert manifest is None and len(urls) == 12


def test_rank_without_samples_ends_a_finite_pass(tokenizer, tmp_path, dataset_a):
    urls, _ = resolve_shards(dataset_a)
    first = next(read_shard(urls[0]))
    w = ShardWriter(str(tmp_path / "one.tar"))
    w.add(first.key, sorted(first.members.items()))
    w.close()
    spec = [DatasetSpec("one", [str(tmp_path / "one.tar")])]
    assert len([k for b in read_all(loader(tokenizer, spec, dp_rank=0, dp_size=2, num_epochs=1))
                for row in b["sample_keys"] for k in row]) == 1
    assert read_all(loader(tokenizer, spec, dp_rank=1, dp_size=2, num_epochs=1)) == []


def test_prefetching_loader_same_batches_and_state(tokenizer, dataset_a, dataset_b):
    from megatron_vlm.data.prefetch import PrefetchingLoader

    specs = [DatasetSpec("a", dataset_a, 1.0), DatasetSpec("b", dataset_b, 1.0)]
    plain = loader(tokenizer, specs)
    expected, states = [], []
    for _ in range(8):
        expected.append(next(plain)["sample_keys"])
        states.append(plain.state_dict())
    pre = PrefetchingLoader(loader(tokenizer, specs), depth=3)
    got = []
    for i in range(5):
        got.append(next(pre)["sample_keys"])
        assert pre.state_dict() == states[i]  # what was consumed, not what was prefetched
    resumed = PrefetchingLoader(loader(tokenizer, specs), depth=2)
    resumed.load_state_dict(pre.state_dict())
    pre.close()
    got += [next(resumed)["sample_keys"] for _ in range(3)]
    assert got == expected and resumed.state_dict() == states[-1]
    resumed.close()
    finite = PrefetchingLoader(loader(tokenizer, [DatasetSpec("a", dataset_a)], num_epochs=1))
    assert sum(len(r) for b in finite for r in b["sample_keys"]) == 48
