"""Encoded clips from JSONL to shards (probed, stored as is) to the loader's packed batches:
backends counted, timestamps in the prompt, EVS shortening the sample, bad videos skipped."""

from __future__ import annotations

import json
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from megatron_vlm.data_prep.build_shards import build_shards
from megatron_vlm.data.batch import check_batch
from megatron_vlm.data.loader import DatasetSpec, PackedVLMLoader
from megatron_vlm.data.shard_writer import ShardWriter
from megatron_vlm.data.tiling import TilingConfig
from megatron_vlm.data.video import VideoOptions
from tests.video.conftest import clip_bytes
from tests.video.test_sampling import audio_only_file

TILE, PATCH, TPF = 32, 8, 4


def chat(i: int, video) -> str:
    return json.dumps({"id": f"v{i}", "messages": [
        {"role": "user", "content": "<video>\nwhere does the square go"},
        {"role": "assistant", "content": "right"}], "videos": [video]})


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    os.makedirs(root / "clips")
    files = {"a.mp4": clip_bytes(6.0, 30, "h264")[0], "b.webm": clip_bytes(5.0, 25, "vp9", seed=1)[0],
             "empty.mp4": b"", "audio.wav": audio_only_file()}
    files["cut.mp4"] = files["a.mp4"][: len(files["a.mp4"]) // 4]
    for name, data in files.items():
        (root / "clips" / name).write_bytes(data)
    for j in range(2):  # old format: pre-extracted frames
        Image.new("RGB", (40, 30), (50 * j, 90, 20)).save(root / "clips" / f"f{j}.png")
    lines = [
        chat(0, {"type": "video", "source": "clips/a.mp4", "start": 1.0, "end": 5.0}),
        chat(1, {"type": "video", "source": "clips/b.webm"}),
        chat(2, {"frames": ["clips/f0.png", "clips/f1.png"], "timestamps": [0.0, 0.5]}),
        chat(3, {"type": "video", "source": "clips/missing.mp4"}),
        chat(4, {"type": "video", "source": "clips/empty.mp4"}),
        chat(5, {"type": "video", "source": "clips/cut.mp4"}),
        chat(6, {"type": "video", "source": "clips/audio.wav"}),
        chat(7, {"type": "video", "source": "clips/a.mp4", "start": 2.0, "end": 9.0}),
        chat(8, {"type": "video", "source": "clips/a.mp4", "start": 1.01, "end": 1.02}),
    ]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root, files


def build(video_dir, out, **kwargs):
    root, _ = video_dir
    messages = []
    manifest = build_shards(str(root / "data.jsonl"), str(out), tiling=TilingConfig(TILE, 1, 4, True),
                            samples_per_shard=2, log=messages.append, **kwargs)
    return manifest, messages


def test_build_stores_clips_as_is_and_reports_bad_ones(video_dir, tmp_path):
    root, files = video_dir
    manifest, messages = build(video_dir, tmp_path / "shards")
    assert manifest["num_samples"] == 3
    assert manifest["skipped"]["missing_video"] == 1 and manifest["skipped"]["bad_video"] == 5, manifest["skipped"]
    bad = [m for m in messages if m.startswith("skip")]
    assert len(bad) == 6 and all("data.jsonl:" in m for m in bad)
    assert any("no_video_stream" in m for m in bad) and any("beyond" in m for m in bad)
    members = {}
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "shards" / shard["url"]) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()
    assert members["s000000001.m00.mp4"] == files["a.mp4"]  # bytes as they are
    assert members["s000000002.m00.webm"] == files["b.webm"]
    meta = json.loads(members["s000000001.json"])["media"][0]
    assert meta["probe"]["codec"] == "h264" and meta["probe"]["num_frames"] == 180
    assert meta["start"] == 1.0 and meta["end"] == 5.0 and abs(meta["probe"]["duration"] - 6.0) < 0.01
    assert "s000000003.m00.f001.png" in members  # the old format still builds


def test_transcode_vp9(video_dir, tmp_path):
    manifest, _ = build(video_dir, tmp_path / "shards", transcode="vp9")
    with tarfile.open(tmp_path / "shards" / manifest["shards"][0]["url"]) as tar:
        meta = json.loads(tar.extractfile("s000000001.json").read())
    assert meta["media"][0]["member"] == "m00.webm" and meta["media"][0]["probe"]["codec"] == "vp9"
    assert meta["media"][0]["probe"]["num_frames"] == 180


def loader_batches(tokenizer, shards, video: VideoOptions, seq=512):
    loader = PackedVLMLoader([DatasetSpec("v", str(shards))], tokenizer, seq_length=seq, micro_batch_size=1,
                             tile_size=TILE, patch_size=PATCH, shuffle=False, num_epochs=1, video=video)
    batches = list(loader)
    return batches, loader.counters["total"]


def test_loader_decodes_clips_and_counts_backends(video_dir, tmp_path, tokenizer):
    build(video_dir, tmp_path / "shards")
    batches, counters = loader_batches(tokenizer, tmp_path / "shards", VideoOptions())
    dali = pytest.importorskip("nvidia.dali") is not None
    assert counters["video_pyav"] == 1 and counters["video_dali_cpu"] == (1 if dali else 0)
    assert counters["samples_used"] == 3
    tiles = [int(b["tiles"].shape[0]) for b in batches]
    # a.mp4 [1, 5) at 2 fps: 8 frames; b.webm 5 s: 10 frames; old format: 2 frames
    assert sorted(t for t in tiles if t) == [2, 8, 10]
    for b in batches:
        check_batch(b, tokenizer.image_id, TPF)
    text = tokenizer.decode(batches[0]["tokens"][0].tolist())
    assert "Frame 1 sampled at 0.00 seconds:" in text and "Frame 8 sampled at 3.50 seconds:" in text


def test_evs_rate_shortens_each_video_by_the_pruned_count(video_dir, tmp_path, tokenizer):
    build(video_dir, tmp_path / "shards")
    plain, _ = loader_batches(tokenizer, tmp_path / "shards", VideoOptions())
    pruned, _ = loader_batches(tokenizer, tmp_path / "shards", VideoOptions(evs_rate=0.75))
    for a, b in zip(plain, pruned):
        frames = int(a["tiles"].shape[0])
        keep = max(TPF, int(frames * TPF * 0.25))
        length = lambda x: int((x["loss_mask"].shape[1]) - (x["cu_seqlens"][-1] - x["cu_seqlens"][-2]))  # noqa: E731
        assert length(a) - length(b) == frames * TPF - keep
        assert int(b["media_tokens"].sum()) == keep and int((b["tokens"] == tokenizer.image_id).sum()) == keep
    beta, _ = loader_batches(tokenizer, tmp_path / "shards", VideoOptions(evs_rate=0.5, evs_rate_sampling="beta"))
    again, _ = loader_batches(tokenizer, tmp_path / "shards", VideoOptions(evs_rate=0.5, evs_rate_sampling="beta"))
    assert [b["media_tokens"].tolist() for b in beta] == [b["media_tokens"].tolist() for b in again]


def test_damaged_clip_in_a_shard_is_skipped_and_named(video_dir, tmp_path, tokenizer, caplog):
    build(video_dir, tmp_path / "shards")
    with tarfile.open(tmp_path / "shards" / "shard-00000.tar") as tar:
        good = {i.name.split(".", 1)[1]: tar.extractfile(i).read() for i in tar.getmembers()
                if i.name.startswith("s000000001.")}
    meta = json.loads(good["json"])
    writer = ShardWriter(str(tmp_path / "bad.tar"))
    writer.add("broken", [("json", good["json"]), ("m00.mp4", good["m00.mp4"][:300])])
    late = dict(meta, media=[dict(meta["media"][0], start=50.0, end=60.0)])
    writer.add("late", [("json", json.dumps(late).encode()), ("m00.mp4", good["m00.mp4"])])
    writer.add("ok", [("json", good["json"]), ("m00.mp4", good["m00.mp4"])])
    writer.close()
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.data"):
        loader = PackedVLMLoader([DatasetSpec("v", str(tmp_path / "bad.tar"))], tokenizer, seq_length=512,
                                 micro_batch_size=1, tile_size=TILE, patch_size=PATCH, shuffle=False, num_epochs=1)
        batches = list(loader)
    counters = loader.counters["total"]
    assert counters["video_error"] == 2 and counters["samples_used"] == 1 and len(batches) == 1
    assert any("bad.tar" in r.message and "broken.m00.mp4" in r.message for r in caplog.records)
    assert any("late.m00.mp4" in r.message and "bad_clip" in r.message for r in caplog.records)
    assert np.asarray(batches[0]["tiles"]).shape[0] == 8


def test_loader_batch_through_the_model_with_evs(video_dir, tmp_path, tokenizer, megatron_single):
    """Real shards -> loader (q = 0.75) -> tiny VLM: the frame wrappers are rebuilt from the
    tokenizer's ids, every text token outside the videos stays, and the loss is finite."""
    import torch

    from megatron_vlm.models.evs import kept_per_frame, retention_mask
    from megatron_vlm.models.packing import make_packed_seq_params
    from megatron_vlm.models.vlm import build_vlm

    root, _ = video_dir
    build_shards(str(root / "data.jsonl"), str(tmp_path / "shards"), tiling=TilingConfig(64, 1, 4, True),
                 log=lambda m: None)
    loader = PackedVLMLoader([DatasetSpec("v", str(tmp_path / "shards"))], tokenizer, seq_length=768,
                             micro_batch_size=1, tile_size=64, patch_size=16, shuffle=False, num_epochs=1,
                             video=VideoOptions(evs_rate=0.75))
    batch = next(loader)  # the two clips packed in one row
    assert batch["tiles_per_media"].tolist() == [8, 10]
    model = build_vlm("vlm_tiny", impl="local", image_token_id=tokenizer.image_id,
                      img_end_token_id=tokenizer.img_end_id, use_cpu_initialization=True).eval()
    tiles = batch["tiles"]
    with torch.no_grad():
        image = model.image_embeddings(tiles)
        ids, kept = model.prune_videos(batch["tokens"], image, batch["tiles_per_media"], batch["media_tokens"], 4)
        loss = model(batch["tokens"], tiles=tiles, labels=batch["labels"],
                     packed_seq_params=make_packed_seq_params(batch["cu_seqlens"]),
                     tiles_per_media=batch["tiles_per_media"], media_tokens=batch["media_tokens"])
    assert kept.shape[0] == int(batch["media_tokens"].sum()) == 8 + 10  # max(4, int(T * 4 * 0.25))
    before, after = batch["tokens"][0], ids[0]
    text = before != tokenizer.image_id
    assert torch.equal(before[text], after[after != tokenizer.image_id])  # text order kept
    assert int((after == tokenizer.image_id).sum()) == int((before == tokenizer.image_id).sum())
    # per frame, the rebuilt count is EVS's own count for that frame
    counts, inside = [], False
    for t in after.tolist():
        if t == tokenizer.img_start_id:
            counts.append(0)
            inside = True
        elif t == tokenizer.img_end_id:
            inside = False
        elif t == tokenizer.image_id and inside:
            counts[-1] += 1
    first = retention_mask(image[: 8 * 4], 8, 8)
    assert counts[:8] == kept_per_frame(first, 8).tolist() and len(counts) == 18
    assert torch.isfinite(loss).all() and float((loss * batch["loss_mask"]).sum()) > 0
