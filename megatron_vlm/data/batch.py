"""The batch the model consumes (contract between the data and model code).

``next(loader)`` returns a dict:

==================  ======================  ===========================================================
key                 type / shape            meaning
==================  ======================  ===========================================================
``tokens``          LongTensor [B, S]       input ids; each row holds whole samples packed end to end,
                                            then ``pad_id`` up to S.
``labels``          LongTensor [B, S]       next token *within the same sample*: ``labels[b, i] =
                                            tokens[b, i + 1]`` when i + 1 is in the same sample. At a
                                            sample's last token and in padding the value is
                                            ``pad_id`` and must be ignored (loss_mask is 0 there).
``loss_mask``       FloatTensor [B, S]      1.0 where ``labels`` is an assistant target (the
                                            assistant answer incl. its think block and closing
                                            eos; every token of plain ``text`` samples), else 0.0.
``position_ids``    LongTensor [B, S]       0, 1, 2, ... restarting at 0 at every packed sample
                                            (and at the trailing padding).
``cu_seqlens``      IntTensor [n_seg + 1]   int32 cumulative segment boundaries over the flattened
                                            ``B * S`` token stream, THD style (megatron's
                                            ``PackedSeqParams.cu_seqlens_q/kv``): ``[0, len_0, ...,
                                            B * S]``. Every packed sample is a segment; the trailing
                                            padding of a row (if any) is its own segment, with
                                            loss_mask 0. Segments never cross rows.
``max_seqlen``      int                     longest segment.
``tiles``           FloatTensor [N, 3, T, T] CLIP-normalised tiles, in the order their ``<image>``
                                            tokens appear in the flattened batch (row 0 first; per
                                            image: grid tiles row-major, then the thumbnail; per
                                            video: one tile per frame). ``[0, 3, T, T]`` if none.
``tiles_per_media`` LongTensor [M]          tiles of each image/video, in the same order.
``media_tokens``    LongTensor [M]          ``<image>`` tokens of each media: tiles x tokens_per_tile,
                                            fewer for a video pruned by EVS (see models/vlm.py);
                                            -1 = tiles x tokens_per_tile.
``sample_keys``     list[list[str]]         ``dataset/shard/key`` of each sample, per row (tracing).
==================  ======================  ===========================================================

With context parallelism the loader pads every sample to a multiple of ``2 * cp``
(``pad_multiple``): the ``pad_id`` tokens after a sample belong to its segment (in ``cu_seqlens``
and ``position_ids``), with loss_mask 0. Being after the sample, they never change its losses
(attention is causal, the Mamba scan runs forward). The model then cuts every segment into
``2 * cp`` chunks; CP rank r takes chunks r and 2cp-1-r (``models/context_parallel.py``).

Each tile accounts for exactly ``tokens_per_tile = (T / patch / 2) ** 2`` consecutive
``<image>`` tokens (256 at T=512, patch 16), so
``(tokens == image_id).sum() == tiles.shape[0] * tokens_per_tile``; the model replaces the
``<image>`` embeddings, in order, with the projected vision embeddings of ``tiles``.
"""

from __future__ import annotations

import numpy as np
import torch

from .image import normalize_tiles
from .packing import PackedItem, padded_length


def collate_rows(rows: list[list[PackedItem]], seq_length: int, pad_id: int, tile_size: int,
                 pad_multiple: int = 1) -> dict:
    batch_size = len(rows)
    tokens = np.full((batch_size, seq_length), pad_id, dtype=np.int64)
    labels = np.full((batch_size, seq_length), pad_id, dtype=np.int64)
    loss_mask = np.zeros((batch_size, seq_length), dtype=np.float32)
    position_ids = np.zeros((batch_size, seq_length), dtype=np.int64)
    seg_lengths: list[int] = []
    tiles, tiles_per_media, media_tokens, keys = [], [], [], []
    for b, row in enumerate(rows):
        pos = 0
        row_keys = []
        for item in row:
            enc = item.encoded
            n = len(enc)
            end = pos + n
            tokens[b, pos:end] = enc.tokens
            labels[b, pos : end - 1] = enc.tokens[1:]
            loss_mask[b, pos : end - 1] = enc.targets[1:]
            occupied = padded_length(n, pad_multiple)  # pad_id tokens after the sample, mask 0
            position_ids[b, pos : pos + occupied] = np.arange(occupied)
            seg_lengths.append(occupied)
            if enc.tiles_per_media:
                tiles.append(item.tiles)
                tiles_per_media.extend(enc.tiles_per_media)
                known = len(enc.media_tokens) == len(enc.tiles_per_media)  # -1: tiles x tokens_per_tile
                media_tokens.extend(enc.media_tokens if known else [-1] * len(enc.tiles_per_media))
            row_keys.append(item.key)
            pos += occupied
        if pos > seq_length:
            raise ValueError(f"row {b} holds {pos} tokens, more than {seq_length}")
        if pos < seq_length:
            position_ids[b, pos:] = np.arange(seq_length - pos)
            seg_lengths.append(seq_length - pos)
        keys.append(row_keys)
    cu_seqlens = np.zeros(len(seg_lengths) + 1, dtype=np.int32)
    np.cumsum(seg_lengths, out=cu_seqlens[1:])
    if tiles:
        tiles_tensor = normalize_tiles(np.concatenate(tiles, axis=0))
    else:
        tiles_tensor = torch.zeros((0, 3, tile_size, tile_size), dtype=torch.float32)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(max(seg_lengths)),
        "tiles": tiles_tensor,
        "tiles_per_media": torch.tensor(tiles_per_media, dtype=torch.long),
        "media_tokens": torch.tensor(media_tokens, dtype=torch.long),
        "sample_keys": keys,
    }


def check_batch(batch: dict, image_id: int, tokens_per_tile: int) -> None:
    """Assert the invariants of the contract above (cheap; for tests and debugging)."""
    tokens, labels, mask, pos = batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"]
    B, S = tokens.shape
    assert tokens.dtype == labels.dtype == pos.dtype == torch.long and mask.dtype == torch.float32
    assert labels.shape == mask.shape == pos.shape == (B, S)
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * S
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert all(n > 0 for n in lengths) and batch["max_seqlen"] == max(lengths)
    flat_pos, flat_tok, flat_lab, flat_mask = pos.reshape(-1), tokens.reshape(-1), labels.reshape(-1), mask.reshape(-1)
    for start, n in zip(cu[:-1].tolist(), lengths):
        assert start // S == (start + n - 1) // S, "segment crosses a row"
        assert torch.equal(flat_pos[start : start + n], torch.arange(n))
        assert flat_mask[start + n - 1] == 0, "last token of a segment has no in-segment label"
        sel = flat_mask[start : start + n - 1] > 0
        assert torch.equal(flat_lab[start : start + n - 1][sel], flat_tok[start + 1 : start + n][sel])
    n_image_tokens = int((tokens == image_id).sum())
    expected = batch["tiles"].shape[0] * tokens_per_tile
    if "media_tokens" in batch:
        full = batch["tiles_per_media"] * tokens_per_tile
        expected = int(torch.where(batch["media_tokens"] < 0, full, batch["media_tokens"]).sum())
    assert n_image_tokens == expected, (n_image_tokens, batch["tiles"].shape)
    assert int(batch["tiles_per_media"].sum()) == batch["tiles"].shape[0]
