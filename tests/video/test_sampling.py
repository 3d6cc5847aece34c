"""Frame sampling by presentation time, and decoding the sampled frames (PyAV, DALI CPU)."""

import numpy as np
import pytest

from megatron_vlm.data.video import VideoError, choose_frames, frame_times, plan_frames, probe, sample_times
from megatron_vlm.data.video_decode import choose_backend, decode_clip
from tests.video.conftest import clip_bytes


def test_sample_times_counts():
    assert len(sample_times(0.0, 10.0, 2.0, 128)) == 20  # 10 s at 2 fps
    assert sample_times(0.0, 10.0)[:3] == [0.0, 0.5, 1.0]
    long = sample_times(0.0, 300.0, 2.0, 128)  # 5 min: capped, spread uniformly
    assert len(long) == 128 and long[0] == 0.0 and np.allclose(np.diff(long), 300 / 128)
    assert len(sample_times(3.0, 4.2, 2.0, 128)) == 3  # 3.0, 3.5, 4.0
    assert sample_times(0.0, 0.3) == [0.0]


def test_ten_second_30fps_clip_gives_20_frames():
    t = [k / 30 for k in range(300)]  # frame times of a 10 s 30 fps clip (ms rounding as in webm)
    t = [round(x, 3) for x in t]
    indices, times = plan_frames(t, 0.0, 10.0 + 0.001, 2.0, 128)
    assert len(indices) == 20 and indices[:3] == [0, 15, 30]
    assert len(plan_frames([k / 30 for k in range(9000)], 0.0, 300.0, 2.0, 128)[0]) == 128


def test_choose_frames_nearest_presentation_time():
    assert choose_frames([0.0, 0.1, 0.5, 0.55], [0.0, 0.3, 0.31, 0.54, 9.0]) == [0, 1, 2, 3, 3]


def test_vfr_clip_frames_within_half_a_frame():
    data, true_times = clip_bytes(8.0, 10, "h264", vfr=True)
    info = probe(data)
    assert info.variable_frame_rate and info.num_frames == len(true_times)
    clip = decode_clip(data, tile_size=16, backend="pyav")
    requested = sample_times(0.0, info.duration)
    assert len(clip.times) == len(requested) == 17  # 8.1 s
    gaps = np.diff(true_times)
    for t, want, idx in zip(clip.times, requested, clip.indices):
        if want > true_times[-1]:  # after the last frame's start: the last frame is shown
            assert idx == len(true_times) - 1
            continue
        local_gap = max(gaps[max(idx - 1, 0)], gaps[min(idx, len(gaps) - 1)])
        assert abs(t - want) <= local_gap / 2 + 1e-3, (t, want)
    # by time, not index x fps: in the slow half, index x fps would overshoot the clip
    assert max(clip.indices) < info.num_frames


def test_dali_cpu_matches_pyav_on_vp9():
    pytest.importorskip("nvidia.dali")
    data, _ = clip_bytes(6.0, 24, "vp9")
    assert choose_backend("vp9") == "dali_cpu" and choose_backend("h264") == "pyav"
    ref = decode_clip(data, tile_size=32, backend="pyav")
    dali = decode_clip(data, tile_size=32, backend="dali_cpu")
    assert dali.times == ref.times and dali.indices == ref.indices and len(ref.times) == 12
    diff = np.abs(dali.frames.astype(np.int16) - ref.frames.astype(np.int16))
    # Measured on these clips (3 seeds): median 1, 90th percentile 3-4, mean 2.2-2.4 levels; up
    # to ~50 only on the pixels at the red square's edges (chroma upsampling differs).
    assert np.median(diff) <= 2 and np.percentile(diff, 90) <= 5 and diff.mean() <= 3.0, diff.mean()
    assert ref.frames.std() > 10  # frames hold content


def test_pyav_decodes_only_what_it_needs():
    data, times = clip_bytes(20.0, 30, "h264")
    clip = decode_clip(data, tile_size=16, start=15.0, end=17.0, backend="pyav")
    assert clip.times == [0.0, 0.5, 1.0, 1.5] and len(times) == 600
    assert clip.decoded_frames < 600  # seeks near 15 s instead of decoding from the start


@pytest.mark.parametrize("case", ["empty", "truncated", "garbage", "audio_only", "too_short", "beyond"])
def test_bad_clips_raise_video_error(case):
    data, _ = clip_bytes(2.0, 10, "h264")
    kwargs = {}
    if case == "empty":
        data = b""
    elif case == "truncated":
        data = data[: len(data) // 3]
    elif case == "garbage":
        data = b"\x00\x01 not a video" * 50
    elif case == "audio_only":
        data = audio_only_file()
    elif case == "too_short":
        kwargs = dict(start=1.01, end=1.05)  # no frame inside (10 fps)
    elif case == "beyond":
        kwargs = dict(start=0.0, end=9.0)
    with pytest.raises(VideoError) as err:
        decode_clip(data, tile_size=16, backend="pyav", **kwargs)
    assert str(err.value) and err.value.kind in ("empty_video", "corrupt_video", "no_video_stream", "bad_clip")


def audio_only_file() -> bytes:
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in stream.encode(frame):
            out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return buf.getvalue()


def test_real_clips_frame_counts():
    ten, _ = clip_bytes(10.0, 30, "h264")  # 10 s at 30 fps
    clip = decode_clip(ten, tile_size=16, backend="pyav")
    assert len(clip.times) == 20 and clip.times[:3] == [0.0, 0.5, 1.0] and clip.indices[:2] == [0, 15]
    five_min, _ = clip_bytes(300.0, 2, "vp9")  # 5 min (2 fps source keeps the file small)
    clip = decode_clip(five_min, tile_size=16)
    assert len(clip.times) == 128 and abs(clip.times[1] - 300 / 128) <= 0.25


def test_auto_falls_back_to_pyav_when_dali_refuses():
    pytest.importorskip("nvidia.dali")
    data, _ = clip_bytes(2.0, 10, "h264")
    clip = decode_clip(data, tile_size=16, codec="vp9")  # claims VP9: DALI CPU is tried, refuses H.264
    assert clip.backend == "pyav" and len(clip.times) == 4
    with pytest.raises(VideoError):
        decode_clip(data, tile_size=16, backend="dali_cpu")
