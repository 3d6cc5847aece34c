"""Video: decoding only the sampled frames vs every frame, and what EVS saves the LLM.

1. Decode throughput on one 30 s, 30 fps, 256 px clip of the demo kind (shapes moving on a static
   background), H.264 and VP9: sampled frames/s delivered (2 fps -> 60 frames, resized to 512 px
   tiles) by each backend that takes the codec here (PyAV; DALI CPU for VP9), against decoding
   every frame with PyAV and keeping the sampled ones.
2. EVS: one demo clip sampled to 32 frames of 128 px tiles (16 tokens each) in the tiny VLM:
   LLM tokens per video, the sample's LLM input length, and one training step (forward +
   backward, fp32) in tokens/s and video samples/s at q = 0, 0.5, 0.75, 0.9.

    python -m bench.bench_video --out results.md
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np

from megatron_vlm.data_prep.demo_tasks import VIDEO_SIZE, render_clip  # noqa: E402
from megatron_vlm.data.video import frame_times, plan_frames  # noqa: E402
from megatron_vlm.data.video_decode import _to_tile, decode_clip  # noqa: E402
from megatron_vlm.data.video_encode import decode_all, encode_frames  # noqa: E402

from bench import emit, load_average  # noqa: E402

RATES = (0.0, 0.5, 0.75, 0.9)


def _clip(size: int, duration: float, fps: int, codec: str) -> bytes:
    from PIL import Image

    rng = random.Random(0)
    edge = VIDEO_SIZE - 10  # a ball crossing the demo scene from left to right
    frames, times = render_clip(rng, duration, fps, False, "red", (10, VIDEO_SIZE // 2), (edge, VIDEO_SIZE // 2))
    frames = [np.asarray(Image.fromarray(f).resize((size, size))) for f in frames]
    return encode_frames(frames, times, codec)


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_decode(tile: int = 512) -> list:
    rows = []
    for codec in ("h264", "vp9"):
        data = _clip(256, 30.0, 30, codec)
        times_all, _ = frame_times(data)
        indices, _ = plan_frames(times_all, 0.0, 30.0, 2.0, 128)
        backends = ["pyav"] + (["dali_cpu"] if codec == "vp9" else [])
        for backend in backends:
            decode_clip(data, tile_size=tile, backend=backend)  # warm-up (DALI builds its pipeline)
            sec = _best(lambda b=backend: decode_clip(data, tile_size=tile, backend=b))
            rows.append((codec, f"{backend}, sampled frames only", len(indices), sec))

        def every_frame():
            frames, _ = decode_all(data)
            return [_to_tile(frames[i], tile) for i in indices]

        sec = _best(every_frame)
        rows.append((codec, f"pyav, every frame ({len(times_all)}) then pick", len(indices), sec))
    return rows


def bench_evs(frames_n: int = 32, tile: int = 128, repeats: int = 3) -> list:
    import torch

    from megatron_vlm.data.image import normalize_tiles
    from megatron_vlm.distributed import destroy_distributed, initialize_distributed
    from megatron_vlm.media_format import num_kept_tokens, provisional_frame_counts
    from megatron_vlm.models.packing import make_packed_seq_params
    from megatron_vlm.models.vlm import build_vlm
    from megatron_vlm.platform import setup_platform

    setup_platform()
    initialize_distributed(single_process=True)
    image_id, img_start, img_end = 7, 8, 9
    model = build_vlm("vlm_tiny", impl="local", image_token_id=image_id, img_end_token_id=img_end,
                      use_cpu_initialization=True)
    data = _clip(tile, 60.0, 8, "h264")
    clip = decode_clip(data, tile_size=tile, max_frames=frames_n, backend="pyav")
    tiles = normalize_tiles(clip.frames)
    tpf = model.tokens_per_tile(tiles)
    g = torch.Generator().manual_seed(0)
    rows = []
    for q in RATES:
        keep = num_kept_tokens(frames_n, tpf, q) if q > 0 else frames_n * tpf
        ids = torch.randint(10, 4000, (20,), generator=g).tolist()
        for count in provisional_frame_counts(frames_n, tpf, keep):
            ids += [11, 12, 13, 14, 15, 16, 17, 18, img_start] + [image_id] * count + [img_end, 19]
        ids += torch.randint(10, 4000, (12,), generator=g).tolist()
        tokens = torch.tensor([ids])
        labels = torch.roll(tokens, -1, 1)
        mask = torch.zeros_like(tokens, dtype=torch.float)
        mask[0, -12:-1] = 1
        packed = make_packed_seq_params(torch.tensor([0, len(ids)], dtype=torch.int32))
        kwargs = dict(tiles=tiles, labels=labels, packed_seq_params=packed,
                      tiles_per_media=torch.tensor([frames_n]), media_tokens=torch.tensor([keep]))

        def step():
            model.zero_grad(set_to_none=True)
            loss = (model(tokens, **kwargs) * mask).sum() / mask.sum()
            loss.backward()

        step()
        sec = statistics.median(_best(step, 1) for _ in range(repeats))
        rows.append((q, keep, len(ids), sec))
    destroy_distributed()
    return rows, tpf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    decode = bench_decode()
    evs, tpf = bench_evs()
    lines = ["## Video: sampled decoding and EVS", "",
             "Decoding one 30 s, 30 fps, 256 px clip at 2 fps (60 frames) into 512 px tiles; best of 3, wall "
             "clock, one process.", "",
             "| codec | backend | sampled frames | seconds | sampled frames/s |", "|---|---|---|---|---|"]
    for codec, backend, n, sec in decode:
        lines.append(f"| {codec} | {backend} | {n} | {sec:.3f} | {n / sec:,.0f} |")
    lines += ["", f"EVS in the tiny VLM: one demo clip, 32 frames of 128 px tiles ({tpf} tokens per frame), "
              "one forward + backward (fp32, median of 3).", "",
              "| q | LLM tokens per video | LLM input length | step seconds | LLM tokens/s | videos/s |",
              "|---|---|---|---|---|---|"]
    for q, keep, length, sec in evs:
        lines.append(f"| {q} | {keep} | {length} | {sec:.3f} | {length / sec:,.0f} | {1 / sec:.2f} |")
    lines += ["", "The machine's load at run time: "
              f"{load_average()} (1/5/15 min)."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
