"""Bad data: build_shards skips each bad record with file:line and a reason; every PIL image mode
becomes the same RGB at build and load time; the loader checks field types, skips and counts
malformed samples by reason, lets programming errors through, and names a dataset with no usable
sample."""

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from megatron_vlm.data_prep.build_shards import build_shards
from megatron_vlm.data.dataset_stream import NoUsableSamples
from megatron_vlm.data.image import decode_tile, encode_tile, load_rgb, to_rgb
from megatron_vlm.data.loader import DatasetSpec, PackedVLMLoader
from megatron_vlm.data.schema import SAMPLE_SCHEMA, dumps_metadata
from megatron_vlm.data.shard_reader import read_shard
from megatron_vlm.data.shard_writer import ShardWriter
from megatron_vlm.data.tiling import TilingConfig
from tests.data.conftest import PATCH, TILE, make_image, tokenizer, tokenizer_dir  # noqa: F401


# ---- build_shards ---------------------------------------------------------------------------------
def _chat(i, images=None, **extra):
    rec = {"id": f"good{i}", "messages": [{"role": "user", "content": f"question {i}"},
                                          {"role": "assistant", "content": f"answer {i}"}]}
    if images:
        rec["images"] = images
    rec.update(extra)
    return json.dumps(rec).encode()


BAD_LINES = {  # reason -> (line bytes, counter, words of the logged reason)
    "invalid JSON": (b'{"id": "x", "messages": [', "bad_record", "invalid JSON"),
    "not an object": (b'["a", "b"]', "bad_record", "not a JSON object"),
    "images a string": (_chat(90, images="img/a.png"), "bad_record", "'images' is not a list"),
    "content a number": (b'{"messages": [{"role": "user", "content": 5}]}', "bad_record",
                         "'messages[0].content' is int"),
    "id an object": (b'{"id": {"a": 1}, "text": "doc"}', "bad_record", "'id' is dict"),
    "text a number": (b'{"text": 12}', "bad_record", "'text' is int"),
    "turn a string": (b'{"messages": ["hello"]}', "bad_record", "'messages[0]' is str"),
    "timestamps strings": (b'{"messages": [{"role": "user", "content": "<video>"}, {"role": '
                           b'"assistant", "content": "a"}], "videos": [{"frames": ["f.png"], '
                           b'"timestamps": ["x"]}]}', "bad_record", "timestamps' is not a list"),
    "latin-1 line": (b'{"text": "caf\xe9"}', "bad_record", "not UTF-8"),
    "missing image": (_chat(91, images=["img/none.png"]), "missing_image", "missing image"),
    "corrupt image": (_chat(92, images=["img/corrupt.png"]), "corrupt_image", "corrupt image"),
    "unreadable image": (_chat(93, images=["img/folder.png"]), "corrupt_image", "folder.png"),
}


def test_build_shards_skips_each_bad_record_with_its_line(tmp_path):
    (tmp_path / "img").mkdir()
    make_image(str(tmp_path / "img/ok.png"), (40, 30), seed=1)
    (tmp_path / "img/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "img/folder.png").mkdir()
    lines, expected_bad, good_ids = [], {}, []
    for i, (reason, (line, counter, words)) in enumerate(BAD_LINES.items()):
        good_ids.append(f"good{i}")
        lines.append(_chat(i, images=["img/ok.png"] if i % 2 else None))
        lines.append(line)
        expected_bad[len(lines)] = (counter, words)
    (tmp_path / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    logged = []
    manifest = build_shards(str(tmp_path / "data.jsonl"), str(tmp_path / "shards"),
                            tiling=TilingConfig(TILE, 1, 4, True), samples_per_shard=4,
                            log=logged.append)
    ids = [json.loads(s.members["json"])["id"] for shard in manifest["shards"]
           for s in read_shard(str(tmp_path / "shards" / shard["url"]))]
    assert ids == good_ids
    skips = [m for m in logged if m.startswith("skip ")]
    assert len(skips) == len(BAD_LINES), skips
    for line_no, (counter, words) in expected_bad.items():
        hit = [m for m in skips if m.startswith(f"skip data.jsonl:{line_no}: ")]
        assert len(hit) == 1 and words in hit[0], (line_no, words, hit)
    want = {k: 0 for k in manifest["skipped"]}
    for counter, _ in expected_bad.values():
        want[counter] += 1
    assert manifest["skipped"] == want, manifest["skipped"]
    assert f"(total {len(BAD_LINES)})" in logged[-1]


# ---- image modes ------------------------------------------------------------------------------
def _rgb(img):
    return np.asarray(img).astype(int).tolist()


def test_every_image_mode_becomes_the_right_rgb():
    grey16 = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert grey16.mode.startswith("I;16")
    assert _rgb(to_rgb(grey16)) == [[[0] * 3, [128] * 3, [255] * 3]]  # scaled, not clipped
    grey32 = grey16.convert("I")
    assert _rgb(to_rgb(grey32)) == [[[0] * 3, [128] * 3, [255] * 3]]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _rgb(to_rgb(floats)) == [[[0] * 3, [128] * 3, [255] * 3]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # index 1 (blue) is transparent -> white
    assert _rgb(to_rgb(palette)) == [[[255, 0, 0], [255, 255, 255]]]
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 255))
    la.putpixel((1, 0), (0, 0))  # fully transparent black -> white
    assert _rgb(to_rgb(la)) == [[[0, 0, 0], [255, 255, 255]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red ink-free magenta+yellow
    assert _rgb(to_rgb(cmyk)) == [[[255, 0, 0]]]
    assert _rgb(to_rgb(Image.new("1", (1, 1), 1))) == [[[255, 255, 255]]]


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("P", "PNG"), ("LA", "PNG"),
                                      ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("L", "PNG"),
                                      ("RGBA", "PNG"), ("1", "PNG")])
def test_build_and_load_convert_identically(tmp_path, mode, fmt):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (TILE, TILE), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (TILE, TILE, 4), dtype=np.uint8), "RGBA")
        img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.ADAPTIVE)
        if mode == "P":
            img.info["transparency"] = 3
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"transparency": 3} if mode == "P" else {}))
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(buf.getvalue())
    built = np.asarray(load_rgb(path))  # what build_shards tiles
    assert built.shape == (TILE, TILE, 3)
    # Written as an RGB tile and read back: the same pixels.
    assert (decode_tile(encode_tile(Image.fromarray(built)), TILE) == built).all()
    if fmt == "PNG":  # a tile stored in the source mode itself is converted the same way
        assert (decode_tile(buf.getvalue(), TILE) == built).all()


# ---- loader ---------------------------------------------------------------------------------------
def _meta(i, **change):
    meta = {"schema": SAMPLE_SCHEMA, "id": f"s{i}", "kind": "chat", "tile_size": TILE,
            "conversation": [{"role": "user", "content": "<image>\nwhat?"},
                             {"role": "assistant", "content": f"answer {i}"}],
            "media": [{"type": "image", "source": "x.png", "size": [TILE, TILE], "grid": [1, 1],
                       "thumbnail": False, "tiles": ["m00.t00.png"]}]}
    meta.update(change)
    return meta


def _tile():
    return encode_tile(Image.new("RGB", (TILE, TILE), (10, 20, 30)))


BAD_SAMPLES = {  # key -> (metadata (or raw bytes), counter)
    "badgrid": (lambda m: m["media"][0].update(grid="1x1") or m, "schema_error"),
    "badtiles": (lambda m: m["media"][0].update(tiles="m00.t00.png") or m, "schema_error"),
    "badcontent": (lambda m: m["conversation"][1].update(content=7) or m, "schema_error"),
    "badmedia": (lambda m: m.update(media={"type": "image"}) or m, "schema_error"),
    "badturn": (lambda m: m.update(conversation=["hi"]) or m, "schema_error"),
    "badkind": (lambda m: m.update(kind=3) or m, "schema_error"),
    "badtilesize": (lambda m: m.update(tile_size="32") or m, "schema_error"),
    "badjson": (b"{not json", "decode_error"),
    "notutf8": (b'{"id": "\xff"}', "decode_error"),
}


def _write_dataset(directory, good: int, bad: bool = True) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    writer = ShardWriter(os.path.join(directory, "data-00000.tar"))
    keys = []
    for i in range(good):
        writer.add(f"good{i:02d}", [("json", dumps_metadata(_meta(i))), ("m00.t00.png", _tile())])
        keys.append(f"good{i:02d}")
        if bad and i < len(BAD_SAMPLES):
            key, (make, _) = list(BAD_SAMPLES.items())[i]
            data = make if isinstance(make, bytes) else dumps_metadata(make(_meta(i)))
            writer.add(key, [("json", data), ("m00.t00.png", _tile())])
    writer.close()
    return keys


def _loader(tok, path, **kw):
    return PackedVLMLoader([DatasetSpec("d", path)], tok, seq_length=128, micro_batch_size=1,
                           tile_size=TILE, patch_size=PATCH, shuffle=False, **kw)


def test_loader_skips_and_counts_malformed_samples_by_reason(tokenizer, tmp_path, caplog):
    good = _write_dataset(str(tmp_path / "d"), good=len(BAD_SAMPLES) + 2)
    ld = _loader(tokenizer, str(tmp_path / "d"), num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.data"):
        used = [k.split("/")[-1] for b in ld for row in b["sample_keys"] for k in row]
    assert used == good
    counters = ld.counters["total"]
    for counter in ("schema_error", "decode_error"):
        assert counters[counter] == sum(1 for _, c in BAD_SAMPLES.values() if c == counter)
    for key in BAD_SAMPLES:
        assert sum(f"member {key}.json" in r.getMessage() for r in caplog.records) == 1, key


def test_loader_does_not_swallow_programming_errors(tokenizer, tmp_path):
    _write_dataset(str(tmp_path / "d"), good=2, bad=False)
    ld = _loader(tokenizer, str(tmp_path / "d"), num_epochs=1)

    def broken(meta):
        raise TypeError("a bug in the prompt encoder")

    ld.encoder.encode = broken
    with pytest.raises(TypeError, match="a bug in the prompt encoder"):
        next(ld)


def test_dataset_without_a_usable_sample_is_named(tokenizer, tmp_path):
    writer = ShardWriter(str(tmp_path / "bad" / "data-00000.tar")) if os.makedirs(
        tmp_path / "bad") is None else None
    for i in range(3):
        writer.add(f"bad{i}", [("json", b"{broken"), ("m00.t00.png", _tile())])
    writer.close()
    ld = _loader(tokenizer, str(tmp_path / "bad"), max_consecutive_errors=50)
    with pytest.raises(NoUsableSamples, match=r"dataset d \(.*bad\): no usable sample .*decode_error"):
        next(ld)


def test_training_reports_skipped_samples_by_reason(workdir):
    """A real (1-process) training run over a dataset with bad samples: it trains, and the skip
    counts by reason reach the console and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.reliability.conftest import launch_train

    os.makedirs(workdir / "bad")
    writer = ShardWriter(str(workdir / "bad" / "data-00000.tar"))
    for i in range(40):
        text = {"schema": SAMPLE_SCHEMA, "id": f"t{i}", "kind": "text", "text": f"doc {i} " * 20}
        writer.add(f"good{i:02d}", [("json", dumps_metadata(text))])
        writer.add(f"types{i:02d}", [("json", dumps_metadata(dict(text, text=["not", "text"])))])
        writer.add(f"json{i:02d}", [("json", b"{broken")])
    writer.close()
    proc = launch_train(workdir, "base", "train.steps=2", "schedule.warmup_steps=0",
                        "train.global_batch_size=2", "train.micro_batch_size=1", "checkpoint.dir=runs/bad_data",
                        "data.blend=[{path: demo_data/shards/text/train}, {path: bad/data-00000.tar}]",
                        "data.eval=[{path: demo_data/shards/text/eval}]", "eval.batches=1", nproc=1)
    line = next(x for x in proc.stdout.splitlines() if "data @ step" in x)
    assert "skipped/schema_error" in line and "skipped/decode_error" in line, proc.stdout[-2000:]
    events = EventAccumulator(str(workdir / "runs/bad_data/tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "data/skipped/schema_error" in tags and "data/skipped/decode_error" in tags, tags
    assert events.Scalars("data/skipped/schema_error")[-1].value >= 1
