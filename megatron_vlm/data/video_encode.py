"""Encode RGB frames into a video file (H.264 in .mp4, VP9 in .webm) with PyAV, and transcode.

Used by ``build_shards --transcode vp9`` (for machines whose DALI CPU decoder lacks the source
codec) and by the demo data generator. Frame timestamps are kept exactly (millisecond time
base), so variable-frame-rate input stays variable.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

CODECS = {"h264": ("libx264", "mp4"), "vp9": ("libvpx-vp9", "webm")}
_TIME_BASE = Fraction(1, 1000)


def encode_frames(frames, times: list[float], codec: str = "h264", crf: int = 30) -> bytes:
    """Encode RGB uint8 frames [n, H, W, 3] shown at ``times`` (seconds, increasing)."""
    import av

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} ({', '.join(CODECS)})")
    encoder, container_format = CODECS[codec]
    frames = list(frames)
    if not frames or len(frames) != len(times):
        raise ValueError("need one timestamp per frame, and at least one frame")
    height, width = frames[0].shape[:2]
    gaps = np.diff(times) if len(times) > 1 else np.array([1.0])
    rate = Fraction(round(1 / float(np.median(gaps)))) if gaps.min() > 0 else Fraction(30)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as out:
        stream = out.add_stream(encoder, rate=max(rate, Fraction(1)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = _TIME_BASE
        stream.codec_context.time_base = _TIME_BASE
        stream.options = {"crf": str(crf)} if codec == "h264" else {"crf": str(crf), "b:v": "0", "deadline": "realtime",
                                                                 "cpu-used": "8"}
        if codec == "h264":
            stream.options.update({"preset": "ultrafast", "bf": "0"})
        for frame_rgb, t in zip(frames, times):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
            frame.pts = int(round(t / _TIME_BASE))
            frame.time_base = _TIME_BASE
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode_all(data: bytes) -> tuple[list[np.ndarray], list[float]]:
    """Every frame (RGB) of an encoded video and its presentation time (s, from the first)."""
    import av

    frames, times = [], []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * stream.time_base))
    order = np.argsort(times, kind="stable")
    t0 = times[order[0]] if times else 0.0
    return [frames[i] for i in order], [times[i] - t0 for i in order]


def transcode(data: bytes, codec: str = "vp9") -> bytes:
    """Re-encode a video with ``codec``, keeping every frame's presentation time."""
    frames, times = decode_all(data)
    if not frames:
        raise ValueError("no decodable frame to transcode")
    height, width = frames[0].shape[:2]
    if height % 2 or width % 2:  # yuv420p needs even sizes
        frames = [f[: height - height % 2, : width - width % 2] for f in frames]
    return encode_frames(frames, times, codec)
