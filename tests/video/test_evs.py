"""EVS equals the reference rule of transformers' nemotron_h_omni, exactly."""

import numpy as np
import pytest
import torch
from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import compute_retention_mask

from megatron_vlm.data.video import draw_rate
from megatron_vlm.media_format import num_kept_tokens, provisional_frame_counts
from megatron_vlm.models.evs import kept_per_frame, retention_mask


@pytest.mark.parametrize("seed", range(6))
def test_mask_equals_transformers(seed):
    gen = torch.Generator().manual_seed(seed)
    for T in (1, 2, 3, 7, 16):
        for side in (2, 4, 6):  # feature grid side after the spatial merge
            for q in (0.0, 0.1, 0.5, 0.75, 0.9, 0.99):
                tpf = side * side
                emb = torch.randn(T * tpf, 8, generator=gen)
                if seed % 2:  # partly static: repeated frames give ties and zero scores
                    emb.view(T, tpf, 8)[1::2] = emb.view(T, tpf, 8)[:-1:2][: (T // 2)]
                ref = compute_retention_mask(video_embeds=emb, thw=torch.tensor([T, 2 * side, 2 * side]),
                                             spatial_merge_size=2, q=q)
                keep = num_kept_tokens(T, tpf, q)
                ours = retention_mask(emb, T, keep)
                assert torch.equal(ours, ref), (T, side, q)
                assert int(ours.sum()) == keep
                counts = kept_per_frame(ours, T)
                assert int(counts.sum()) == keep and int(counts[0]) == tpf


def test_static_clip_keeps_one_frame():
    frame = torch.randn(16, 32)
    emb = frame.repeat(10, 1)  # 10 identical frames
    mask = retention_mask(emb, 10, num_kept_tokens(10, 16, 0.9))
    assert kept_per_frame(mask, 10).tolist() == [16] + [0] * 9


def test_provisional_counts_sum_and_first_frame():
    for T in (1, 2, 5, 9):
        for q in (0.0, 0.5, 0.75, 0.9, 0.97):
            keep = num_kept_tokens(T, 4, q)
            counts = provisional_frame_counts(T, 4, keep)
            assert sum(counts) == keep and counts[0] == 4 and len(counts) == T
            assert max(counts) <= 4


def test_beta_rate_mean_near_target():
    rng = np.random.default_rng(0)
    draws = [draw_rate(0.75, "beta", rng) for _ in range(2000)]
    assert abs(np.mean(draws) - 0.75) < 0.01 and np.std(draws) > 0.05
    assert draw_rate(0.75, "fixed", rng) == 0.75


def test_uniform_rate_covers_zero_to_target():
    rng = np.random.default_rng(0)
    draws = np.array([draw_rate(0.75, "uniform", rng) for _ in range(2000)])
    assert draws.min() >= 0.0 and draws.max() <= 0.75
    assert abs(draws.mean() - 0.375) < 0.015 and (draws < 0.1).mean() > 0.1
