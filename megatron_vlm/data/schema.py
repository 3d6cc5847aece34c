"""On-disk format of pre-tiled WebDataset shards and of their manifest.

Shard = a POSIX (ustar) tar file. A *sample* is a run of consecutive members sharing a key
(WebDataset convention: the key is the member name up to the first dot). Keys match
``[A-Za-z0-9_-]+``. Members of sample ``KEY``:

    KEY.json              metadata, UTF-8 JSON (sorted keys), always first
    KEY.m00.t00.png       image 0, tile 0 ... (grid tiles row-major, then the thumbnail)
    KEY.m01.f000.png      media 1 is a video: frame 0, one tile per frame (pre-extracted frames)
    KEY.m02.webm          media 2 is an encoded clip: the file's bytes as they are (.mp4, .webm, ...)
    (``.jpg`` instead of ``.png`` when the shards were built with JPEG tiles)

Metadata (``schema`` = ``megatron_vlm.sample/1``)::

    {
      "schema": "megatron_vlm.sample/1",
      "id": "ocr-000123",                      # unique within the dataset
      "source": {"file": "train.jsonl", "line": 123},
      "kind": "chat",                          # or "text" (plain document, loss on all tokens)
      "conversation": [                        # kind == "chat"
        {"role": "system", "content": "/no_think"},
        {"role": "user", "content": "<image>\\nWhat does the sign say?"},
        {"role": "assistant", "content": "STOP", "reasoning": "..."}   # reasoning optional
      ],
      "text": "...",                           # kind == "text"
      "tile_size": 512,
      "media": [                               # in the order of their placeholders
        {"type": "image", "source": "images/a.png", "size": [300, 200],
         "grid": [3, 2], "thumbnail": true,
         "tiles": ["m00.t00.png", ..., "m00.t06.png"]},
        {"type": "video", "source": "clips/b.mp4",
         "frames": [{"t": 0.0, "tile": "m01.f000.png"}, {"t": 0.5, "tile": "m01.f001.png"}]},
        {"type": "video", "source": "clips/c.mp4", "member": "m02.mp4",   # encoded clip
         "start": 0.0, "end": 12.5,                                        # seconds of the file
         "probe": {"codec": "h264", "duration": 30.0, "fps": 30.0, "num_frames": 900,
                   "width": 640, "height": 360, "vfr": false}}
      ]

An encoded clip is sampled and decoded by the loader (``video.py``, ``video_decode.py``); the
decoder then fills in ``frames`` (``[{"t": seconds from start}]``) for the prompt.
    }

Placeholders: each ``<image>`` in a user/system turn stands for the next ``image`` media item,
each ``<video>`` for the next ``video`` item; media are listed in placeholder order over the
whole conversation. Tile member names are the part after ``KEY.``.

Manifest ``index.json`` next to the shards (``schema`` = ``megatron_vlm.shards/1``)::

    {"schema": "megatron_vlm.shards/1", "num_samples": 1000, "image_format": "png",
     "tiling": {"tile_size": 512, "min_tiles": 1, "max_tiles": 12, "use_thumbnail": true},
     "shards": [{"url": "train-00000.tar", "num_samples": 256, "num_bytes": 123456}, ...],
     "skipped": {"missing_image": 1, "corrupt_image": 2, "bad_record": 0}, "source": "train.jsonl"}

Shard urls are relative to the manifest's directory unless absolute or a URL.
"""

from __future__ import annotations

import json
import re

SAMPLE_SCHEMA = "megatron_vlm.sample/1"
MANIFEST_SCHEMA = "megatron_vlm.shards/1"
MANIFEST_NAME = "index.json"

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = ("system", "user", "assistant")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


class SchemaError(ValueError):
    """Metadata that does not follow the sample schema."""


def tile_member(media_index: int, tile_index: int, ext: str) -> str:
    return f"m{media_index:02d}.t{tile_index:02d}.{ext}"


def frame_member(media_index: int, frame_index: int, ext: str) -> str:
    return f"m{media_index:02d}.f{frame_index:03d}.{ext}"


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/KEY.m00.t01.png' -> ('dir/KEY', 'm00.t01.png') (WebDataset's key/suffix split)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def count_placeholders(text: str) -> tuple[int, int]:
    return text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)


def video_member(media_index: int, ext: str) -> str:
    return f"m{media_index:02d}.{ext}"


def is_encoded_video(item: dict) -> bool:
    return item.get("type") == "video" and "member" in item


def media_tile_names(item: dict) -> list[str]:
    """Member suffixes holding a media item's tiles, in token order (none for encoded clips)."""
    if item["type"] == "image":
        return list(item["tiles"])
    if is_encoded_video(item):
        return []
    return [f["tile"] for f in item["frames"]]


def validate_metadata(meta: dict) -> None:
    """Raise SchemaError if `meta` is not a valid sample metadata dict."""
    if not isinstance(meta, dict):
        raise SchemaError("metadata is not a JSON object")
    if meta.get("schema") != SAMPLE_SCHEMA:
        raise SchemaError(f"schema is {meta.get('schema')!r}, expected {SAMPLE_SCHEMA!r}")
    kind = meta.get("kind")
    media = meta.get("media", [])
    if not isinstance(media, list):
        raise SchemaError("media is not a list")
    n_images = n_videos = 0
    if kind == "chat":
        conv = meta.get("conversation")
        if not isinstance(conv, list) or not conv:
            raise SchemaError("chat sample without conversation turns")
        for turn in conv:
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise SchemaError(f"bad turn {turn!r:.80}")
            i, v = count_placeholders(turn["content"])
            if (i or v) and turn["role"] == "assistant":
                raise SchemaError("media placeholder in an assistant turn")
            n_images += i
            n_videos += v
        if not any(t["role"] == "assistant" for t in conv):
            raise SchemaError("chat sample without an assistant turn")
    elif kind == "text":
        if not isinstance(meta.get("text"), str):
            raise SchemaError("text sample without text")
        if media:
            raise SchemaError("text sample with media")
    else:
        raise SchemaError(f"unknown kind {kind!r}")
    types = [m.get("type") if isinstance(m, dict) else None for m in media]
    if types.count("image") != n_images or types.count("video") != n_videos or len(types) != n_images + n_videos:
        raise SchemaError(
            f"{n_images} <image> and {n_videos} <video> placeholders but media types {types}"
        )
    for item in media:
        if item["type"] == "image":
            if not item.get("tiles"):
                raise SchemaError("image without tiles")
            cols, rows = item["grid"]
            if len(item["tiles"]) != cols * rows + (1 if item.get("thumbnail") else 0):
                raise SchemaError(f"image grid {cols}x{rows} does not match {len(item['tiles'])} tiles")
        elif is_encoded_video(item):
            if not isinstance(item["member"], str) or not isinstance(item.get("probe"), dict):
                raise SchemaError("encoded video without a member name or probe data")
        elif not item.get("frames"):
            raise SchemaError("video without frames")


def dumps_metadata(meta: dict) -> bytes:
    """Canonical JSON bytes (sorted keys, no whitespace variation) so shards are reproducible."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
