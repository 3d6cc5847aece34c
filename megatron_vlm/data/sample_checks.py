"""Field and type checks of a shard sample's metadata, before anything uses it.

``validate_metadata`` (schema.py) checks the sample's meaning (placeholders vs media, roles);
it presumes the fields have the right JSON types. A sample written by another tool, or damaged,
may not: this check runs first and turns every wrong type into a :class:`SampleError` naming the
field, so the loader can count and skip the sample without catching Python's built-in errors
(which would hide our own bugs).
"""

from __future__ import annotations

import json

from .sample_decoder import SampleError
from .shard_reader import RawSample


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metadata_type_problem(meta) -> str | None:
    """The first field of ``meta`` with a wrong JSON type, described; None if all fit."""
    if not isinstance(meta, dict):
        return f"metadata is a {type(meta).__name__}, not an object"
    for key, ok, want in (("schema", isinstance(meta.get("schema"), str), "a string"),
                          ("kind", isinstance(meta.get("kind"), str), "a string")):
        if not ok:
            return f"{key} is {meta.get(key)!r:.60}, expected {want}"
    if "tile_size" in meta and not _is_int(meta["tile_size"]):
        return f"tile_size is {meta['tile_size']!r:.40}, expected an integer"
    if meta["kind"] == "text":
        if not isinstance(meta.get("text"), str):
            return "text is missing or not a string"
    conversation = meta.get("conversation", [])
    if not isinstance(conversation, list):
        return "conversation is not a list"
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            return f"conversation[{i}] is not an object"
        for field in ("role", "content"):
            if not isinstance(turn.get(field), str):
                return f"conversation[{i}].{field} is {turn.get(field)!r:.40}, expected a string"
        if turn.get("reasoning") is not None and not isinstance(turn["reasoning"], str):
            return f"conversation[{i}].reasoning is not a string"
    media = meta.get("media", [])
    if not isinstance(media, list):
        return "media is not a list"
    for i, item in enumerate(media):
        where = f"media[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            return f"{where} is not an object with a string type"
        if item["type"] == "image":
            tiles, grid = item.get("tiles"), item.get("grid")
            if not isinstance(tiles, list) or not all(isinstance(t, str) for t in tiles):
                return f"{where}.tiles is not a list of member names"
            if not isinstance(grid, list) or len(grid) != 2 or not all(_is_int(g) and g >= 1 for g in grid):
                return f"{where}.grid is {grid!r:.40}, expected [columns, rows]"
            if "thumbnail" in item and not isinstance(item["thumbnail"], bool):
                return f"{where}.thumbnail is not true/false"
        elif item["type"] == "video" and "member" in item:  # encoded clip (schema.py)
            if not isinstance(item["member"], str):
                return f"{where}.member is not a member name"
            probe = item.get("probe")
            if not isinstance(probe, dict):
                return f"{where}.probe is not an object"
            for key in ("duration", "fps"):
                if key in probe and not _is_number(probe[key]):
                    return f"{where}.probe.{key} is not a number"
            for key in ("start", "end"):
                if item.get(key) is not None and not _is_number(item[key]):
                    return f"{where}.{key} is not a number"
        elif item["type"] == "video":
            frames = item.get("frames")
            if not isinstance(frames, list):
                return f"{where}.frames is not a list"
            for j, frame in enumerate(frames):
                if not isinstance(frame, dict) or not isinstance(frame.get("tile"), str):
                    return f"{where}.frames[{j}] has no member name"
                if "t" in frame and not _is_number(frame["t"]):
                    return f"{where}.frames[{j}].t is not a number"
        else:
            return f"{where}.type is {item['type']!r:.40}, expected image or video"
    return None


def check_raw_sample(raw: RawSample) -> None:
    """Raise SampleError if the sample's metadata is not JSON of the expected types."""
    member = f"{raw.key}.json"
    data = raw.members.get("json")
    if data is None:
        raise SampleError("decode_error", member, "metadata member missing")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError("decode_error", member, f"bad JSON: {exc}") from exc
    problem = metadata_type_problem(meta)
    if problem is not None:
        raise SampleError("schema_error", member, problem)
