"""Video clips: probing encoded bytes, and choosing which frames to sample.

Sampling rule (one pure function, ``sample_times``): frames are requested at ``fps`` (default 2)
from the clip's start, ``t_k = start + k / fps`` for every ``t_k < end``; a clip that would give
more than ``max_frames`` gets ``max_frames`` requests spread uniformly over it,
``t_k = start + k * (end - start) / max_frames``. Each request is served by the frame whose
presentation time is nearest (``choose_frames``), so variable-frame-rate clips are sampled by
time, never by ``index x fps``. The prompt shows each chosen frame's presentation time relative
to the clip's start.
"""

from __future__ import annotations

import io
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np


class VideoError(ValueError):
    """An encoded clip that cannot be used; ``kind`` is the counter it goes to."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class VideoInfo:
    codec: str  # FFmpeg codec name: "h264", "vp9", ...
    duration: float  # seconds, from the last frame's presentation time + one frame
    fps: float  # average frame rate
    num_frames: int
    width: int
    height: int
    variable_frame_rate: bool

    def to_dict(self) -> dict:
        return {"codec": self.codec, "duration": round(self.duration, 6), "fps": round(self.fps, 6),
                "num_frames": self.num_frames, "width": self.width, "height": self.height,
                "vfr": self.variable_frame_rate}


def sample_times(start: float, end: float, fps: float = 2.0, max_frames: int = 128) -> list[float]:
    """Requested timestamps (seconds) for a clip [start, end): at ``fps``, at most ``max_frames``."""
    if not end > start:
        raise ValueError(f"clip end {end} is not after its start {start}")
    if fps <= 0 or max_frames < 1:
        raise ValueError("fps must be > 0 and max_frames >= 1")
    duration = end - start
    # t_k = start + k/fps < end - 10 ms: container time bases (1 ms in WebM) round durations up
    count = int(np.ceil((duration - 0.01) * fps - 1e-9))
    count = max(count, 1)
    if count > max_frames:
        step = duration / max_frames
        return [start + k * step for k in range(max_frames)]
    return [start + k / fps for k in range(count)]


def choose_frames(frame_times: list[float], requested: list[float]) -> list[int]:
    """Index (in presentation order) of the frame nearest each requested time; ties go earlier."""
    if not frame_times:
        raise ValueError("no frames to choose from")
    chosen = []
    for t in requested:
        i = bisect_left(frame_times, t)
        if i == len(frame_times) or (i > 0 and t - frame_times[i - 1] <= frame_times[i] - t):
            i -= 1
        chosen.append(i)
    return chosen


def _open(data: bytes):
    import av

    if not data:
        raise VideoError("empty_video", "zero-length video")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # FFmpeg's errors for bad input are varied
        raise VideoError("corrupt_video", f"cannot open video: {type(exc).__name__}: {exc}") from exc
    if not container.streams.video:
        container.close()
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError("no_video_stream", f"no video stream (streams: {', '.join(kinds)})")
    return container


@dataclass(frozen=True)
class StreamInfo:
    codec: str
    width: int
    height: int
    average_rate: float  # 0.0 when the container does not say


def frame_times(data: bytes) -> tuple[list[float], StreamInfo]:
    """Presentation times (s, sorted, from the first frame) of every frame, read from the packets
    (no decoding), and the video stream's codec and size."""
    container = _open(data)
    try:
        stream = container.streams.video[0]
        base = float(stream.time_base)
        ctx = stream.codec_context
        info = StreamInfo(codec=ctx.name, width=int(ctx.width), height=int(ctx.height),
                          average_rate=float(stream.average_rate) if stream.average_rate else 0.0)
        times = []
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size:
                    times.append(packet.pts * base)
        except Exception as exc:
            raise VideoError("corrupt_video", f"cannot read packets: {type(exc).__name__}: {exc}") from exc
        start = float(stream.start_time * base) if stream.start_time is not None else (min(times) if times else 0.0)
        return sorted(t - start for t in times), info
    finally:
        container.close()


def probe(data: bytes) -> VideoInfo:
    """Codec, duration, frame rate and frame count of an encoded clip (raises VideoError)."""
    times, stream = frame_times(data)
    if not times:
        raise VideoError("corrupt_video", "video stream holds no frames")
    gaps = np.diff(times) if len(times) > 1 else np.array([0.0])
    rate = stream.average_rate or (1 / float(np.median(gaps)) if gaps.any() else 1.0)
    last_gap = float(gaps[-1]) if len(times) > 1 else 1 / rate
    vfr = bool(len(times) > 2 and gaps.max() - gaps.min() > 0.25 * float(np.median(gaps)))
    return VideoInfo(codec=stream.codec, duration=times[-1] + last_gap,
                     fps=len(times) / (times[-1] + last_gap), num_frames=len(times),
                     width=stream.width, height=stream.height, variable_frame_rate=vfr)


def clip_bounds(info: VideoInfo, start: float | None, end: float | None) -> tuple[float, float]:
    """Validated [start, end) of a clip of a video (defaults: the whole video)."""
    start = 0.0 if start is None else float(start)
    end = info.duration if end is None else float(end)
    if start < 0 or start >= info.duration:
        raise VideoError("bad_clip", f"start {start:.3f}s is outside the video (duration {info.duration:.3f}s)")
    if end > info.duration + 1e-3:
        raise VideoError("bad_clip", f"end {end:.3f}s is beyond the video's duration {info.duration:.3f}s")
    if end <= start:
        raise VideoError("bad_clip", f"clip end {end:.3f}s is not after its start {start:.3f}s")
    return start, min(end, info.duration)


def plan_frames(times: list[float], start: float, end: float, fps: float, max_frames: int) -> tuple[list[int], list[float]]:
    """(frame indices, their presentation times relative to ``start``) to decode for a clip."""
    inside = [t for t in times if start - 1e-6 <= t < end]
    if not inside:
        raise VideoError("bad_clip", f"clip [{start:.3f}s, {end:.3f}s) holds no frame (shorter than one frame interval)")
    first = times.index(inside[0])
    chosen = choose_frames(inside, sample_times(start, end, fps, max_frames))
    return [first + i for i in chosen], [round(inside[i] - start, 6) for i in chosen]


@dataclass(frozen=True)
class VideoOptions:
    """How the loader samples, decodes and prunes encoded clips (recipe section ``video``)."""

    fps: float = 2.0
    max_frames: int = 128
    backend: str = "auto"  # auto | dali_gpu | dali_cpu | pyav
    evs_rate: float = 0.0  # EVS pruning rate q (0 = off)
    evs_rate_sampling: str = "fixed"  # fixed | beta | uniform (a per-sample draw, training)


def set_evs_rates(meta: dict, options: VideoOptions, seed: int, key: str) -> None:
    """Give each video of a sample its EVS rate (``evs_rate`` on the media item, read by the prompt
    encoder). A per-sample draw is seeded by the sample key, so a resumed loader redraws the same."""
    if options.evs_rate <= 0:
        return
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    for item in meta.get("media", []):
        if item.get("type") == "video":
            item["evs_rate"] = draw_rate(options.evs_rate, options.evs_rate_sampling, rng)


def draw_rate(target: float, sampling: str, rng, concentration: float = 20.0) -> float:
    """EVS pruning rate of one training sample: ``target`` ("fixed"); a Beta draw with mean
    ``target`` ("beta"), as the paper's uptraining with stochastic pruning rates; or uniform in
    [0, ``target``] ("uniform"), so that one model serves every rate up to ``target``, pruning
    off included."""
    if sampling == "fixed" or target <= 0.0:
        return float(target)
    if sampling == "uniform":
        return float(rng.uniform(0.0, target))
    if sampling != "beta":
        raise ValueError(f"unknown EVS rate sampling {sampling!r} (fixed | beta | uniform)")
    a, b = target * concentration, (1 - target) * concentration
    return float(min(max(rng.beta(a, b), 0.0), 0.99))
