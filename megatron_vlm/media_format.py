"""What the data pipeline and the model agree on about media, in one place below both.

- Pixel normalisation: ``x = (pixel / 255 - CLIP_MEAN) / CLIP_STD`` per channel. The statistics
  are OpenAI CLIP's, which RADIO (c-RADIOv2-VLM-H) uses; the data pipeline normalises float tiles
  with them, the model normalises uint8 tiles on its device, the HF export checks them.
- EVS token counts: the ``<image>`` tokens a pruned video keeps depend only on its frames, the
  tokens per frame and the rate, so the data pipeline writes them into the prompt before any vision
  pass and the model prunes to the same count (``models/evs.py`` does the pruning).
"""

from __future__ import annotations

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def num_kept_tokens(num_frames: int, tokens_per_frame: int, rate: float) -> int:
    """Tokens a video keeps at pruning rate ``rate`` (same expression as the reference)."""
    return max(tokens_per_frame, int(num_frames * tokens_per_frame * (1 - rate)))


def provisional_frame_counts(num_frames: int, tokens_per_frame: int, num_keep: int) -> list[int]:
    """Per-frame ``<image>`` counts written by the data pipeline before the vision pass.

    Frame 1 is always kept whole (it scores highest); the rest is spread evenly over the later
    frames. The model replaces these counts with the real ones after pruning (same total)."""
    counts = [tokens_per_frame] + [0] * (num_frames - 1)
    rest = num_keep - tokens_per_frame
    if num_frames == 1 or not 0 <= rest <= (num_frames - 1) * tokens_per_frame:
        if rest == 0:
            return counts
        raise ValueError(f"cannot keep {num_keep} tokens of {num_frames} frames x {tokens_per_frame}")
    for i in range(1, num_frames):
        counts[i] = rest // (num_frames - 1) + (1 if i - 1 < rest % (num_frames - 1) else 0)
    return counts
