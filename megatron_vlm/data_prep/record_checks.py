"""JSON types of an input record, checked before building (records.py presumes them).

A record from another tool may put a number where a path belongs, a string where a list belongs,
and so on; each such record is skipped by build_shards with ``file:line: reason`` instead of
ending the run with a Python error.
"""

from __future__ import annotations


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def record_type_problem(record: dict) -> str | None:
    """The first field of ``record`` with a wrong JSON type, described; None if all fit."""
    if "id" in record and not isinstance(record["id"], (str, int)):
        return f"'id' is {type(record['id']).__name__}, expected a string"
    if "system" in record and record["system"] is not None and not isinstance(record["system"], str):
        return "'system' is not a string"
    if "text" in record and "messages" not in record and "conversations" not in record:
        if not isinstance(record["text"], str):
            return f"'text' is {type(record['text']).__name__}, expected a string"
    for key in ("messages", "conversations"):
        turns = record.get(key)
        if turns is None:
            continue
        if not isinstance(turns, list):
            return f"'{key}' is {type(turns).__name__}, expected a list of turns"
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                return f"'{key}[{i}]' is {type(turn).__name__}, expected an object"
            for field in ("role", "from", "content", "value"):
                if field in turn and not isinstance(turn[field], str):
                    return f"'{key}[{i}].{field}' is {type(turn[field]).__name__}, expected a string"
            if turn.get("reasoning") is not None and not isinstance(turn["reasoning"], str):
                return f"'{key}[{i}].reasoning' is not a string"
    answer = record.get("answer")
    if answer is not None and not (isinstance(answer, str) or (_strings(answer) and answer)):
        return "'answer' is not a string or a list of strings"
    images = record.get("images")
    if images is not None and not _strings(images):
        return "'images' is not a list of paths"
    videos = record.get("videos")
    if videos is not None:
        if not isinstance(videos, list) or not all(isinstance(v, dict) for v in videos):
            return "'videos' is not a list of objects"
        for i, video in enumerate(videos):
            if "frames" in video and not _strings(video["frames"]):
                return f"'videos[{i}].frames' is not a list of paths"
            times = video.get("timestamps")
            if times is not None and not (isinstance(times, list) and all(_is_number(t) for t in times)):
                return f"'videos[{i}].timestamps' is not a list of numbers"
            if "source" in video and not isinstance(video["source"], str):
                return f"'videos[{i}].source' is not a string"
    return None
