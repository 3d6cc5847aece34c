"""The VLM's forward step for megatron's schedules (``train_step(..., forward_step_func=...)``)."""

from __future__ import annotations

from functools import partial

import torch

from megatron_vlm.models.context_parallel import shard_tokens
from megatron_vlm.models.packing import make_packed_seq_params
from megatron_vlm.training.batch_io import get_batch
from megatron_vlm.training.step import masked_lm_loss


ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def schedule_shape(seq_length: int, micro_batch_size: int) -> tuple[int, int]:
    """(seq_length, micro_batch_size) for megatron's schedule: a micro batch of packed rows goes
    through the model as ONE row of ``micro_batch_size * seq_length`` tokens (megatron's THD
    layout has b = 1; ``cu_seqlens`` already indexes the rows flattened, and no sample crosses a
    row), so pipeline stages exchange [mbs * seq, 1, h] activations."""
    return seq_length * micro_batch_size, 1


def as_one_row(batch: dict) -> dict:
    """The micro batch's [B, S] token tensors as [1, B * S] (see ``schedule_shape``)."""
    return {k: (v.reshape(1, -1) if k in ROW_KEYS and v is not None and v.dim() == 2 else v)
            for k, v in batch.items()}


def vlm_forward_step(data_iterator, model: torch.nn.Module):
    """Batches follow the data contract (``tokens``, ``labels``, ``loss_mask``, optional ``tiles``,
    optional ``cu_seqlens``/``max_seqlen`` for packed rows); ``get_batch`` gives each pipeline
    stage what it uses, on the device."""
    batch = get_batch(data_iterator)
    cu_seqlens, packed = batch.get("cu_seqlens"), None
    if cu_seqlens is not None:  # max_seqlen comes from the host-side batch: no device sync
        packed = make_packed_seq_params(cu_seqlens, max_seqlen=batch.get("max_seqlen"))
        batch = as_one_row(batch)
    output = model(batch.get("tokens"), tiles=batch.get("tiles"), labels=batch.get("labels"),
                   packed_seq_params=packed, tiles_per_media=batch.get("tiles_per_media"),
                   media_tokens=batch.get("media_tokens"))
    # The model returns this context-parallel rank's token losses: take its share of the mask.
    return output, partial(masked_lm_loss, shard_tokens(batch.get("loss_mask"), cu_seqlens))
