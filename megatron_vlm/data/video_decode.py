"""Decode the sampled frames of an encoded clip into uint8 tiles, behind one interface.

    clip = decode_clip(data, tile_size=512, fps=2.0, max_frames=128, start=0.0, end=None)
    clip.frames  # uint8 [n, 512, 512, 3];  clip.times  # presentation times (s, from start)

Backends (``backend="auto"`` picks the first that applies):

- ``dali_gpu``: DALI ``fn.decoders.video`` with ``device="mixed"`` (NVDEC) when CUDA is present.
- ``dali_cpu``: DALI's CPU decoder, for the codecs it accepts in the pinned release
  (``DALI_CPU_CODECS``: VP8, VP9, MJPEG; it refuses H.264 here).
- ``pyav``: FFmpeg through PyAV, any codec; seeks to the keyframe before each sampled frame when
  the next one is far ahead, so only the needed stretches are decoded.

With ``auto``, a clip DALI refuses is decoded by PyAV (and counted there). Frames are chosen by
presentation time from the packet timestamps (``video.plan_frames``); DALI is
given their presentation-order indices. Every backend resizes with the same bicubic rule as
video tiles built offline (``tiling.resize_frame``), so the loader normalises them like image tiles.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .tiling import resize_frame
from .video import VideoError, frame_times, plan_frames

DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")
BACKENDS = ("dali_gpu", "dali_cpu", "pyav")
_SEEK_GAP_S = 1.0  # seek instead of decoding through when the next sampled frame is this far ahead


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 [n, T, T, 3]
    times: list[float]  # presentation time of each frame, seconds from the clip's start
    indices: list[int]  # presentation-order index of each frame in the file
    backend: str
    decoded_frames: int  # frames the backend decoded to produce these (>= n for PyAV)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no GPU path
        return False


@functools.lru_cache(maxsize=1)
def _dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


def choose_backend(codec: str, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown video backend {requested!r} (auto | {' | '.join(BACKENDS)})")
        return requested
    if _dali_importable() and _cuda_available():
        return "dali_gpu"
    if _dali_importable() and codec in DALI_CPU_CODECS:
        return "dali_cpu"
    return "pyav"


def _to_tile(rgb: np.ndarray, tile_size: int) -> np.ndarray:
    return np.asarray(resize_frame(Image.fromarray(rgb), tile_size))


# ---- PyAV --------------------------------------------------------------------------------------
def decode_pyav(data: bytes, indices: list[int], times_all: list[float]) -> tuple[list[np.ndarray], int]:
    """RGB frames at the given presentation-order indices (repeats allowed) + frames decoded."""
    import av

    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        base = float(stream.time_base)
        offset = float(stream.start_time * base) if stream.start_time is not None else None
        position = None  # presentation time of the last decoded frame
        k = 0
        while k < len(wanted):
            target = times_all[wanted[k]]
            if position is None or target - position > _SEEK_GAP_S:
                seek_pts = int((target + (offset or 0.0)) / base)
                container.seek(seek_pts, stream=stream, backward=True, any_frame=False)
            try:
                for frame in container.decode(stream):
                    decoded += 1
                    if frame.pts is None:
                        continue
                    if offset is None:
                        offset = frame.pts * base
                    t = frame.pts * base - offset
                    position = t
                    matched = False
                    # match by time: the plan's times come from the same packet timestamps
                    while k < len(wanted) and times_all[wanted[k]] <= t + 1e-6:
                        if abs(times_all[wanted[k]] - t) <= 1e-6:
                            got[wanted[k]] = frame.to_ndarray(format="rgb24")
                        k += 1
                        matched = True
                    if k == len(wanted) or (matched and times_all[wanted[k]] - t > _SEEK_GAP_S):
                        break  # done, or the next sampled frame is far: seek to it
                else:
                    break  # end of the stream
            except av.error.FFmpegError as exc:
                raise VideoError("corrupt_video", f"cannot decode frames: {exc}") from exc
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VideoError("corrupt_video", f"frames {missing[:5]} could not be decoded (truncated file?)")
    return [got[i] for i in indices], decoded


# ---- DALI --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _dali_pipeline(device: str):
    from nvidia.dali import fn, pipeline_def, types

    device_id = None
    if device == "mixed":
        import torch

        device_id = torch.cuda.current_device()  # this rank's GPU

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device=device, frames=frames)

    pipeline = pipe()
    pipeline.build()
    return pipeline


def decode_dali(data: bytes, indices: list[int], device: str = "cpu") -> list[np.ndarray]:
    """RGB frames at presentation-order ``indices`` decoded by DALI (``device`` cpu or mixed)."""
    pipeline = _dali_pipeline(device)
    try:
        pipeline.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
        pipeline.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
        (out,) = pipeline.run()
    except Exception as exc:  # DALI reports decoder failures as RuntimeError with C++ context
        _dali_pipeline.cache_clear()  # a failed run leaves the pipeline unusable
        raise VideoError("corrupt_video", f"DALI cannot decode: {str(exc).splitlines()[0][:200]}") from exc
    if hasattr(out, "as_cpu"):
        out = out.as_cpu()
    frames = np.asarray(out[0])
    if frames.shape[0] != len(indices):
        raise VideoError("corrupt_video", f"DALI returned {frames.shape[0]} frames, {len(indices)} requested")
    return list(frames)


# ---- the interface ------------------------------------------------------------------------------
def decode_clip(data: bytes, *, tile_size: int, fps: float = 2.0, max_frames: int = 128,
                start: float | None = None, end: float | None = None, codec: str | None = None,
                backend: str = "auto") -> DecodedClip:
    """Sample and decode a clip of an encoded video (raises VideoError for unusable input)."""
    times_all, stream = frame_times(data)
    if not times_all:
        raise VideoError("corrupt_video", "video stream holds no frames")
    codec = codec or stream.codec
    gap = times_all[-1] - times_all[-2] if len(times_all) > 1 else 1.0 / max(fps, 1e-6)
    duration = times_all[-1] + gap
    start = 0.0 if start is None else float(start)
    end = duration if end is None else float(end)
    if start < 0 or start >= duration or end > duration + 1e-3 or end <= start:
        raise VideoError("bad_clip", f"clip [{start:.3f}s, {end:.3f}s) does not fit the video ({duration:.3f}s)")
    indices, times = plan_frames(times_all, start, end, fps, max_frames)
    name = choose_backend(codec, backend)
    rgb = None
    if name != "pyav":
        try:
            rgb = decode_dali(data, indices, "mixed" if name == "dali_gpu" else "cpu")
            decoded = len(set(indices))
        except VideoError:
            if backend != "auto":
                raise
            name = "pyav"  # e.g. a codec profile this DALI build refuses: FFmpeg decides
    if rgb is None:
        rgb, decoded = decode_pyav(data, indices, times_all)
    frames = np.stack([_to_tile(f, tile_size) for f in rgb])
    return DecodedClip(frames=frames, times=times, indices=indices, backend=name, decoded_frames=decoded)
