"""Raw shard sample (member bytes) -> validated metadata + decoded uint8 tiles.

Any problem raises SampleError naming the member at fault, so the loader can log
"shard S member M: reason", count it under `kind`, and move on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .image import ImageDecodeError, decode_tile
from .schema import SchemaError, is_encoded_video, media_tile_names, validate_metadata
from .shard_reader import RawSample
from .video import VideoError, VideoOptions


class SampleError(ValueError):
    def __init__(self, kind: str, member: str, reason: str):
        super().__init__(f"member {member}: {reason}")
        self.kind, self.member, self.reason = kind, member, reason


@dataclass
class DecodedSample:
    key: str
    shard: str
    meta: dict
    tiles: np.ndarray  # uint8 [N, T, T, 3], all media tiles in placeholder order
    video_backends: tuple[str, ...] = ()  # backend that decoded each encoded clip


def _decode_video(raw: RawSample, item: dict, tile_size: int, options: VideoOptions):
    """Sample + decode an encoded clip; fills item["frames"] with the decoded timestamps."""
    from .video_decode import decode_clip  # PyAV/DALI load only when a shard holds clips

    member = f"{raw.key}.{item['member']}"
    data = raw.members.get(item["member"])
    if data is None:
        raise SampleError("decode_error", member, "video member missing")
    try:
        clip = decode_clip(data, tile_size=tile_size, fps=options.fps, max_frames=options.max_frames,
                           start=item.get("start"), end=item.get("end"),
                           codec=item["probe"].get("codec"), backend=options.backend)
    except VideoError as exc:
        raise SampleError("video_error", member, f"{exc.kind}: {exc}") from exc
    item["frames"] = [{"t": t} for t in clip.times]
    return clip


def decode_sample(raw: RawSample, tile_size: int, video: VideoOptions | None = None) -> DecodedSample:
    json_name = f"{raw.key}.json"
    try:
        meta = json.loads(raw.members["json"].decode("utf-8"))
        validate_metadata(meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError("decode_error", json_name, f"bad JSON: {exc}") from exc
    except SchemaError as exc:
        raise SampleError("schema_error", json_name, str(exc)) from exc
    media = meta.get("media", [])
    if media and int(meta.get("tile_size", -1)) != tile_size:
        raise SampleError("schema_error", json_name,
                          f"tiles are {meta.get('tile_size')} px, the loader expects {tile_size} px")
    tiles, backends = [], []
    for item in media:
        if is_encoded_video(item):
            clip = _decode_video(raw, item, tile_size, video or VideoOptions())
            tiles.extend(clip.frames)
            backends.append(clip.backend)
            continue
        for name in media_tile_names(item):
            data = raw.members.get(name)
            member = f"{raw.key}.{name}"
            if data is None:
                raise SampleError("decode_error", member, "tile member missing")
            try:
                tiles.append(decode_tile(data, tile_size))
            except ImageDecodeError as exc:
                raise SampleError("decode_error", member, f"cannot decode tile ({exc})") from exc
    array = np.stack(tiles) if tiles else np.zeros((0, tile_size, tile_size, 3), dtype=np.uint8)
    return DecodedSample(key=raw.key, shard=raw.shard, meta=meta, tiles=array, video_backends=tuple(backends))
