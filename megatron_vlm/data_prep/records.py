"""JSONL conversation records -> shard samples (metadata + pre-cut tiles).

Accepted input: ``JSONL_FORMAT`` below (what ``build_shards --help`` prints): image and video
conversations, multi-turn, system prompt, the reasoning switch and traces, plain documents, and
an optional reference ``answer`` that is kept in the sample's metadata for evaluation.

A video given by ``source`` (an encoded file; ``start``/``end`` in seconds optional) is probed once
(codec, duration, fps, frame count go into the metadata), its sampled frames are test-decoded, and
its bytes are stored as they are (or re-encoded with ``--transcode vp9``); the loader samples and
decodes it. Unusable videos are reported like bad images (``missing_video``, ``bad_video``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from megatron_vlm.data.image import encode_tile, load_rgb
from megatron_vlm.data.schema import (
    IMAGE_PLACEHOLDER,
    SAMPLE_SCHEMA,
    VIDEO_PLACEHOLDER,
    SchemaError,
    dumps_metadata,
    frame_member,
    tile_member,
    validate_metadata,
    video_member,
)
from megatron_vlm.data.tiling import TilingConfig, resize_frame, tile_image

JSONL_FORMAT = """\
JSONL format: one JSON object per line; media paths are relative to the JSONL (or --image-root).

  Image conversation (one "<image>" per image, in the order of "images"):
    {"id": "x1",
     "messages": [{"role": "system", "content": "/no_think"},
                  {"role": "user", "content": "<image>\\nWhat is written here?"},
                  {"role": "assistant", "content": "HELLO"}],
     "images": ["images/x1.png"], "answer": "HELLO"}
  Multi-turn, several images: any number of user/assistant turns; each "<image>" in a user
    turn takes the next path of "images". Without any "<image>", one per image is put at the
    start of the first user turn.
  Video from a file ("start"/"end" in seconds, optional; the loader samples video.fps frames/s):
    {"messages": [{"role": "user", "content": "<video>\\nWhat happens?"},
                  {"role": "assistant", "content": "A ball rolls left."}],
     "videos": [{"source": "clips/a.mp4", "start": 2.0, "end": 14.5}]}
  Video as frames: "videos": [{"frames": ["f0.png", "f1.png"], "timestamps": [0.0, 0.5]}]
  Plain document (loss on every token): {"id": "doc1", "text": "..."}

  Turns: "role" is system | user | assistant ("conversations" with {"from": "human" | "gpt" |
    "system", "value": ...} is accepted too). A top-level "system": "..." adds a system turn.
  Reasoning: "/think" or "/no_think" in the system (or a user) turn switches it on or off (the
    switch is removed from the text); an assistant turn may carry "reasoning": "..." (its
    <think> block). Without reasoning the answer follows an empty <think></think>.
  Loss: on the assistant turns only (think block, answer, end of turn).
  "answer" (optional): the reference answer evaluation scores against (default: the last
    assistant turn); "id" (optional): the sample's id (default: line<N>).
  Records that do not fit are skipped with file:line and a reason, and counted in index.json.
"""

_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}


class RecordError(ValueError):
    """A record that cannot become a sample; `kind` is the summary counter it goes to."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class BuildOptions:
    tiling: TilingConfig
    image_format: str = "png"  # "png" or "jpeg"
    jpeg_quality: int = 95
    image_root: str | None = None  # base for relative media paths (default: the JSONL's folder)
    source_name: str = ""  # recorded in metadata (the JSONL's file name, not its absolute path)
    transcode: str | None = None  # re-encode videos with this codec ("vp9") before storing

    @property
    def ext(self) -> str:
        return "png" if self.image_format == "png" else "jpg"


def _normalise_turns(record: dict) -> list[dict]:
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise RecordError("bad_record", "no 'messages' / 'conversations' list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise RecordError("bad_record", f"turn is not an object: {turn!r:.60}")
        role = _ROLE_ALIASES.get(turn.get("role", turn.get("from")))
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            raise RecordError("bad_record", f"turn without a known role or text content: {turn!r:.60}")
        norm = {"role": role, "content": content}
        if role == "assistant" and turn.get("reasoning"):
            norm["reasoning"] = str(turn["reasoning"])
        out.append(norm)
    if record.get("system") and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": str(record["system"])})
    return out


def _resolve(path: str, base: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


def _load_media_image(path: str):
    try:
        return load_rgb(path)
    except FileNotFoundError as exc:
        raise RecordError("missing_image", f"missing image {path}") from exc
    except Exception as exc:  # Pillow's errors for bad files are varied
        raise RecordError("corrupt_image", f"corrupt image {path}: {type(exc).__name__}: {exc}") from exc


def build_sample(record: dict, line: int, base_dir: str, options: BuildOptions) -> tuple[dict, list[tuple[str, bytes]]]:
    """(metadata, [(member suffix, bytes)]) for one record; raises RecordError."""
    base = options.image_root or base_dir
    meta: dict = {"schema": SAMPLE_SCHEMA, "id": str(record.get("id", f"line{line}")),
                  "source": {"file": options.source_name, "line": line}}
    members: list[tuple[str, bytes]] = []
    if "text" in record and "messages" not in record and "conversations" not in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise RecordError("bad_record", "empty 'text'")
        meta.update(kind="text", text=record["text"], media=[])
        validate_metadata(meta)
        return meta, members

    turns = _normalise_turns(record)
    images = record.get("images") or []
    videos = record.get("videos") or []
    n_img = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
    if images and n_img == 0:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise RecordError("bad_record", "images but no user turn to attach them to")
        first_user["content"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + first_user["content"]
        n_img = len(images)
    if n_img != len(images):
        raise RecordError("bad_record", f"{n_img} <image> placeholders for {len(images)} images")

    # Media in placeholder order over the conversation.
    order = []
    for t in turns:
        for part in _split_placeholders(t["content"]):
            if part in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                order.append(part)
    if order.count(VIDEO_PLACEHOLDER) != len(videos):
        raise RecordError("bad_record", f"{order.count(VIDEO_PLACEHOLDER)} <video> placeholders for {len(videos)} videos")
    media: list[dict] = []
    image_iter, video_iter = iter(images), iter(videos)
    cfg = options.tiling
    for m, kind in enumerate(order):
        if kind == IMAGE_PLACEHOLDER:
            src = next(image_iter)
            img = _load_media_image(_resolve(src, base))
            tiled = tile_image(img, cfg)
            names = []
            for j, tile in enumerate(tiled.tiles):
                name = tile_member(m, j, options.ext)
                members.append((name, encode_tile(tile, options.image_format, options.jpeg_quality)))
                names.append(name)
            media.append({"type": "image", "source": src, "size": list(tiled.source_size),
                          "grid": list(tiled.grid), "thumbnail": tiled.has_thumbnail, "tiles": names})
        else:
            video = next(video_iter)
            if isinstance(video, str) or (isinstance(video, dict) and "frames" not in video and "source" in video):
                item, name, data = _encoded_video(video, m, base, options)
                members.append((name, data))
                media.append(item)
                continue
            frames = video.get("frames") or []
            times = video.get("timestamps") or [0.5 * i for i in range(len(frames))]  # 2 fps default
            if not frames or len(times) != len(frames):
                raise RecordError("bad_record", "video without frames, or timestamps that do not match them")
            entries = []
            for j, (src, t) in enumerate(zip(frames, times)):
                tile = resize_frame(_load_media_image(_resolve(src, base)), cfg.tile_size)
                name = frame_member(m, j, options.ext)
                members.append((name, encode_tile(tile, options.image_format, options.jpeg_quality)))
                entries.append({"t": float(t), "tile": name})
            media.append({"type": "video", "source": video.get("source", frames[0]), "frames": entries})
    meta.update(kind="chat", conversation=turns, media=media, tile_size=cfg.tile_size)
    if record.get("answer") is not None:  # the reference(s) evaluation scores against
        meta["answer"] = record["answer"]
    try:
        validate_metadata(meta)
    except SchemaError as exc:
        raise RecordError("bad_record", str(exc)) from exc
    return meta, members


def _encoded_video(video, media_index: int, base: str, options: BuildOptions) -> tuple[dict, str, bytes]:
    """(media item, member name, bytes) for a video given as an encoded file."""
    from megatron_vlm.data.video import VideoError, clip_bounds, probe
    from megatron_vlm.data.video_decode import decode_clip
    from megatron_vlm.data.video_encode import transcode

    video = {"source": video} if isinstance(video, str) else video
    src = video["source"]
    path = _resolve(src, base)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise RecordError("missing_video", f"missing video {path}") from exc
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        info = probe(data)
        start, end = clip_bounds(info, video.get("start"), video.get("end"))
        if options.transcode:
            data, ext = transcode(data, options.transcode), "webm"
            info = probe(data)
        # decode the frames the loader will sample (default 2 fps), small: catches damage now
        decode_clip(data, tile_size=8, start=start, end=end, codec=info.codec, backend="pyav")
    except VideoError as exc:
        raise RecordError("bad_video", f"video {path}: {exc.kind}: {exc}") from exc
    except ValueError as exc:  # e.g. transcoding a file without decodable frames
        raise RecordError("bad_video", f"video {path}: {exc}") from exc
    if not re.fullmatch(r"[a-z0-9]{1,8}", ext):
        ext = "bin"
    name = video_member(media_index, ext)
    item = {"type": "video", "source": src, "member": name, "start": round(start, 6), "end": round(end, 6),
            "probe": info.to_dict()}
    return item, name, data


def _split_placeholders(text: str) -> list[str]:
    return _PLACEHOLDERS.split(text)


def tile_record(record: dict, line: int, base_dir: str, tiling: TilingConfig,
                source_name: str = "") -> tuple[dict, list[tuple[str, bytes]]]:
    """``build_sample`` with default options: the evaluation's ``record_builder`` (it tiles raw
    demo records that have no shards exactly as build_shards would)."""
    return build_sample(record, line, base_dir, BuildOptions(tiling=tiling, source_name=source_name))


def sample_members(meta: dict, tile_members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """All members of a sample in file order: metadata first, then tiles."""
    return [("json", dumps_metadata(meta))] + tile_members
