"""Raw shard sample (member bytes) -> validated metadata + decoded uint8 tiles.

Any problem raises SampleError naming the member at fault, so the loader can log
"shard S member M: reason", count it under `kind`, and move on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .image import ImageDecodeError, decode_tile
from .schema import SchemaError, media_tile_names, validate_metadata
from .shard_reader import RawSample


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


def decode_sample(raw: RawSample, tile_size: int) -> DecodedSample:
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
    tiles = []
    for item in media:
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
    return DecodedSample(key=raw.key, shard=raw.shard, meta=meta, tiles=array)
