"""Efficient Video Sampling (EVS): drop video tokens that repeat the previous frame.

The inference rule (Nemotron Nano V2 VL; ``transformers``' ``compute_retention_mask``): on the
post-connector embeddings of a video, ``[T, tokens_per_frame, h]``, each token's score is
``1 - cos(token, same position in the previous frame)``; the first frame scores 255 (above any
cosine dissimilarity, which is at most 2) so it is always kept whole; the
``num_kept_tokens(T, tpf, q)`` best tokens are kept by a stable, descending global sort, in their
original order.

Because the kept count depends only on T, tokens per frame and q, the data pipeline fixes it when it
packs a sample, before any vision pass (``megatron_vlm.media_format`` holds the counts both sides
use; see ``vlm.py`` for the sequence layout).
"""

from __future__ import annotations

import torch

FIRST_FRAME_SCORE = 255.0


def retention_mask(embeddings: torch.Tensor, num_frames: int, num_keep: int) -> torch.Tensor:
    """Boolean [T * tpf] mask of the kept tokens of one video's embeddings [T * tpf, h]."""
    frames = embeddings.reshape(num_frames, -1, embeddings.shape[-1])
    tokens_per_frame = frames.shape[1]
    if not tokens_per_frame <= num_keep <= num_frames * tokens_per_frame:
        raise ValueError(f"EVS keeps {num_keep} tokens of a {num_frames}-frame video with "
                         f"{tokens_per_frame} tokens per frame: must be between one frame and all")
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(frames[1:], frames[:-1], dim=-1)
    first = torch.full_like(frames[:1, :, 0], FIRST_FRAME_SCORE)
    scores = torch.cat([first, dissimilarity], dim=0).reshape(-1)
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order[:num_keep]] = True
    return mask


def kept_per_frame(mask: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Kept tokens of each frame, [T] (sums to the mask's count)."""
    return mask.reshape(num_frames, -1).sum(dim=1)
