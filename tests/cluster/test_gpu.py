"""GPU smoke tests (``make test-gpu``; pytest marker ``gpu``). Skipped, with the reason printed,
on machines without CUDA. Under 10 minutes on one GPU; the TP=2 step needs two.

* TransformerEngine spec vs the local spec on the same weights (bf16 tolerance);
* mamba-ssm / causal-conv1d kernels vs our torch conv + SSD scan (packed and plain);
* a bf16 and an fp8 training step of the tiny VLM through the real CLI;
* DALI's GPU (NVDEC) video decode vs PyAV on a clip generated here;
* a TP=2 training step when two GPUs exist.
"""

import io
import math

import numpy as np
import pytest
import torch

from tests.multiproc import run_multiproc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA here)"),
]

GPU_ENV = {"MEGATRON_VLM_CPU": "0"}


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(not _has("transformer_engine"), reason="TransformerEngine is not installed")
def test_te_spec_matches_local_spec():
    (res,) = run_multiproc("tests.cluster.gpu_bodies:te_vs_local", nproc=1, env=GPU_ENV)
    print(f"TE vs local (bf16): {res['losses']}; missing {res['missing']}")
    assert not res["missing"] and not res["unexpected"], res
    local, te = res["losses"]["local"], res["losses"]["te"]
    assert math.isfinite(local) and abs(te - local) <= 2e-2 * abs(local)  # bf16 rounding


@pytest.mark.skipif(not (_has("mamba_ssm") and _has("causal_conv1d")),
                    reason="mamba-ssm / causal-conv1d are not installed")
def test_mamba_kernels_match_torch_scan():
    (res,) = run_multiproc("tests.cluster.gpu_bodies:mamba_kernels_vs_scan", nproc=1, env=GPU_ENV)
    for key, (diff, scale) in res.items():
        print(f"{key}: max |kernel - torch| {diff:.3g} (max |torch| {scale:.3g})")
        assert diff <= 2e-3 * max(1.0, scale), key


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_tiny_vlm_training_step(workdir, precision):
    if precision == "fp8" and not _has("transformer_engine"):
        pytest.skip("fp8 needs TransformerEngine")
    from tests.training.conftest import launch_train, read_log

    launch_train(workdir, "stage1", "parallel.tp=1", f"train.precision={precision}",
                 "checkpoint.init_from=null", "train.steps=3", "train.global_batch_size=2", "train.micro_batch_size=1",
                 "schedule.warmup_steps=0", "eval.batches=1", "logging.interval=1",
                 f"checkpoint.dir=runs/{precision}", nproc=1)
    log = read_log(workdir / "runs" / precision)
    losses = [log[s]["loss"] for s in (1, 2, 3)]
    print(f"{precision}: losses {losses}, peak memory {log[3]['peak_memory_gib']:.2f} GiB, "
          f"{log[3]['tokens_per_s']:.0f} tok/s")
    assert all(math.isfinite(x) for x in losses) and 5.0 < losses[0] < 10.0
    assert log[3]["peak_memory_gib"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_training_step(workdir):
    from tests.training.conftest import launch_train, read_log

    launch_train(workdir, "stage1", "parallel.tp=2", "parallel.sequence_parallel=true",
                 "train.precision=bf16", "checkpoint.init_from=null", "train.steps=2",
                 "train.global_batch_size=2", "train.micro_batch_size=1", "schedule.warmup_steps=0", "eval.batches=1",
                 "logging.interval=1", "checkpoint.dir=runs/tp2", nproc=2)
    log = read_log(workdir / "runs" / "tp2")
    assert all(math.isfinite(log[s]["loss"]) for s in (1, 2))


def _h264_clip(frames: int = 24, size: int = 128, fps: int = 8) -> bytes:
    """An H.264 MP4 whose frames are flat colours changing every frame (easy to compare)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            rgb = np.zeros((size, size, 3), dtype=np.uint8)
            rgb[..., 0] = (40 + 8 * i) % 256
            rgb[..., 1] = (200 - 6 * i) % 256
            rgb[: size // 2, :, 2] = 120
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.mark.skipif(not _has("nvidia.dali"), reason="DALI is not installed")
def test_dali_gpu_video_decode_matches_pyav():
    video_decode = pytest.importorskip("megatron_vlm.data.video_decode",
                                       reason="megatron_vlm.data.video_decode is absent")
    data = _h264_clip()
    gpu = video_decode.decode_clip(data, tile_size=64, fps=4.0, backend="dali_gpu")
    cpu = video_decode.decode_clip(data, tile_size=64, fps=4.0, backend="pyav")
    diff = np.abs(gpu.frames.astype(np.int16) - cpu.frames.astype(np.int16))
    print(f"DALI GPU vs PyAV: {len(gpu.frames)} frames, mean |diff| {diff.mean():.2f}, "
          f"max {diff.max()}")
    assert gpu.backend == "dali_gpu" and gpu.indices == cpu.indices and len(gpu.frames) > 4
    assert diff.mean() <= 3.0  # same bitstream; colour conversion may round differently
