"""The VLM's forward step for megatron's schedules (``train_step(..., forward_step_func=...)``)."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_vlm.training.batch_io import get_batch
from megatron_vlm.training.step import masked_lm_loss


def packed_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """Packed-sample boundaries for the model; ``max_seqlen`` comes from the host-side batch, so
    no device sync is needed to find it."""
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def vlm_forward_step(data_iterator, model: torch.nn.Module):
    """Batches follow the data contract (``tokens``, ``labels``, ``loss_mask``, optional ``tiles``,
    optional ``cu_seqlens``/``max_seqlen`` for packed rows); ``get_batch`` gives each pipeline
    stage what it uses, on the device."""
    batch = get_batch(data_iterator)
    packed = None
    if batch.get("cu_seqlens") is not None:
        packed = packed_params(batch["cu_seqlens"], batch["max_seqlen"])
    output = model(batch.get("tokens"), tiles=batch.get("tiles"), labels=batch.get("labels"),
                   packed_seq_params=packed)
    return output, partial(masked_lm_loss, batch.get("loss_mask"))
