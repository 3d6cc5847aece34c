"""Small encoded clips (real H.264 / VP9 files written with PyAV) and a tiny tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_vlm.data.video_encode import encode_frames

SIZE = 32


def moving_square(times: list[float], size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Frames [n, size, size, 3]: a square moving right over a static background."""
    rng = np.random.default_rng(seed)  # smooth static background (a colour gradient), as in real scenes
    ramp = np.linspace(0, 1, size)
    colours = rng.integers(20, 120, (2, 3))
    background = (colours[0] * ramp[:, None, None] + colours[1] * ramp[None, :, None]).astype(np.uint8)
    frames = np.repeat(background[None], len(times), axis=0)
    for i, t in enumerate(times):
        x = int(t * 7) % (size - 8)
        frames[i, 8:16, x:x + 8] = (250, 40, 40)
    return frames


def clip_bytes(duration: float, fps: float, codec: str, vfr: bool = False, seed: int = 0) -> tuple[bytes, list[float]]:
    times = [k / fps for k in range(int(round(duration * fps)))]
    if vfr:  # first half at fps, then frames at 1/3 of it
        half = len(times) // 2
        times = times[:half] + [times[half - 1] + 3 * (k + 1) / fps for k in range((len(times) - half) // 3)]
    return encode_frames(moving_square(times, seed=seed), times, codec), times


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from megatron_vlm.data_prep.train_tokenizer import train_bpe
    from megatron_vlm.data.tokenizer import VLMTokenizer
    from tests.data.conftest import corpus_lines

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe(corpus_lines(), vocab_size=400).save(out)
    return VLMTokenizer.from_pretrained(str(out))
