import numpy as np
import pytest
import torch

from megatron_vlm.data.batch import check_batch, collate_rows
from megatron_vlm.data.blend import WeightedBlend
from megatron_vlm.data.image import denormalize_tiles
from megatron_vlm.data.packing import PackedItem, RowPacker, fit_to_length
from megatron_vlm.data.prompt import EncodedSample

PAD, IMG, T = 0, 99, 4


def sample(n, first, targets_from=None, tiles=(), last_media=-1, tile_value=0):
    tokens = np.arange(first, first + n, dtype=np.int64)
    for i in range(n):
        if i <= last_media and i > 0:
            tokens[i] = IMG if i < last_media else 98
    targets = np.zeros(n, dtype=bool)
    if targets_from is not None:
        targets[targets_from:] = True
    enc = EncodedSample(tokens, targets, list(tiles), last_media)
    pixels = np.full((sum(tiles), T, T, 3), tile_value, dtype=np.uint8)
    return PackedItem(enc, pixels, key=f"k{first}")


def test_collate_contract_exact_values():
    a = sample(5, 10, targets_from=3)            # targets: tokens 13, 14
    b = sample(3, 20, targets_from=0)            # all targets (plain text)
    c = sample(8, 30, targets_from=6)
    rows = [[a, b], [c]]
    batch = collate_rows(rows, seq_length=10, pad_id=PAD, tile_size=T)
    assert batch["tokens"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22, 0, 0],
                                        [30, 31, 32, 33, 34, 35, 36, 37, 0, 0]]
    # labels: next token within the sample; last token of a sample and padding -> pad
    assert batch["labels"].tolist() == [[11, 12, 13, 14, 0, 21, 22, 0, 0, 0],
                                        [31, 32, 33, 34, 35, 36, 37, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1, 1, 0, 0, 0],
                                           [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1],
                                              [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]]
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 10, 18, 20]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 8
    assert batch["tiles"].shape == (0, 3, T, T)
    assert batch["sample_keys"] == [["k10", "k20"], ["k30"]]
    assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32


def test_full_rows_have_no_padding_segment_and_tiles_keep_order():
    TPT = 2
    a = sample(6, 100, targets_from=5, tiles=[2], last_media=5, tile_value=10)  # 4 <image> tokens
    b = sample(4, 200, targets_from=2)
    c = sample(10, 300, targets_from=8, tiles=[1, 2], last_media=7, tile_value=30)
    batch = collate_rows([[a, b], [c]], seq_length=10, pad_id=PAD, tile_size=T)
    assert batch["cu_seqlens"].tolist() == [0, 6, 10, 20]
    assert batch["tiles_per_media"].tolist() == [2, 1, 2]
    values = denormalize_tiles(batch["tiles"])[:, 0, 0, 0].tolist()
    assert values == [10, 10, 30, 30, 30]
    check_batch(batch, IMG, TPT)  # 4 + 6 <image> tokens == 5 tiles x 2 tokens per tile
    with pytest.raises(AssertionError):
        check_batch({**batch, "tiles": batch["tiles"][:4]}, IMG, TPT)  # a tile short


def test_fit_to_length_policy():
    text = sample(50, 1, targets_from=10).encoded
    fit = fit_to_length(text, 20)
    assert fit.truncated and len(fit.sample) == 20 and fit.sample.tokens[-1] == 20
    assert fit_to_length(text, 50).sample is text
    late_image = sample(50, 1, targets_from=32, tiles=[3], last_media=30).encoded
    skipped = fit_to_length(late_image, 30)                      # </img> at 30 does not fit in 30
    assert skipped.sample is None and skipped.skip_reason == "media_too_long"
    cut = fit_to_length(late_image, 33)
    assert cut.truncated and len(cut.sample) == 33 and cut.sample.tiles_per_media == [3]
    no_target = fit_to_length(late_image, 32)                    # only target 32 would be cut off
    assert no_target.sample is None and no_target.skip_reason == "no_target_left"


def test_row_packer_greedy_order():
    packer = RowPacker(seq_length=10)
    for n in (4, 5, 3, 10, 2):
        packer.add(sample(n, n * 10))
    rows = packer.rows
    assert [[len(i.encoded) for i in r] for r in rows] == [[4, 5], [3], [10]]
    assert [len(i.encoded) for i in packer.current] == [2]
    with pytest.raises(ValueError):
        packer.add(sample(11, 0))


def test_weighted_blend_is_deterministic_and_proportional():
    blend = WeightedBlend([3.0, 1.0, 0.0], seed=5)
    picks = [blend.choose(i) for i in range(20000)]
    assert picks == [WeightedBlend([3.0, 1.0, 0.0], seed=5).choose(i) for i in range(20000)]
    assert 2 not in picks
    assert abs(picks.count(0) / len(picks) - 0.75) < 0.015
    other = [WeightedBlend([3.0, 1.0, 0.0], seed=6).choose(i) for i in range(200)]
    assert other != picks[:200]
    with pytest.raises(ValueError):
        WeightedBlend([0.0, 0.0], seed=1)
