"""One optimizer step through megatron's pipeline schedules, and the masked LM loss."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterator, List

import torch

from megatron_vlm.platform import device


def masked_lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of the token losses the mask selects, and how many tokens that is (per-token loss).

    Returns megatron's ``(loss_sum, num_tokens, reported)`` triple, as Megatron-LM's ``loss_func``.
    With ``calculate_per_token_loss`` (set by ``wrap_with_ddp``) the schedule backpropagates the
    sums unscaled, DDP sums the gradients over data- and context-parallel ranks and
    ``finalize_model_grads`` divides them by the total token count: the step optimises the mean over
    every supervised token of the global batch, so a packed row with few targets weighs less than
    a full one, and a context-parallel rank holding no target contributes nothing. ``reported``
    carries ``[sum, count]``; :func:`_token_mean` turns it into the same mean.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.to(losses.device).float().reshape(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    reported = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": reported}


def lm_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Forward step for a decoder that takes (tokens, position_ids, attention_mask, labels)."""
    from megatron_vlm.training.batch_io import get_batch

    batch = get_batch(data_iterator)  # read once per model-parallel group, on the device
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                   labels=batch.get("labels"))
    return output, partial(masked_lm_loss, batch["loss_mask"])


def packed_lm_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Forward step for the hybrid LLM on packed rows (``cu_seqlens``), with context parallelism:
    tokens, labels and loss mask are cut to this CP rank's share (the model keeps the global
    ``cu_seqlens``, as megatron expects)."""
    from megatron_vlm.models.context_parallel import shard_tokens
    from megatron_vlm.models.packing import make_packed_seq_params

    batch = next(data_iterator)
    cu = batch.get("cu_seqlens")
    packed = make_packed_seq_params(cu, cu_seqlens_padded=cu) if cu is not None else None
    output = model(shard_tokens(batch["tokens"], cu), None, None,
                   labels=shard_tokens(batch["labels"], cu), packed_seq_params=packed)
    return output, partial(masked_lm_loss, shard_tokens(batch["loss_mask"], cu))


def _token_mean(losses: List[dict], key: str) -> torch.Tensor:
    """Total loss / total tokens over microbatches and data- and context-parallel ranks, shared
    from the last pipeline stage (0 when no rank holds a supervised token, as the gradients)."""
    from megatron.core import parallel_state

    value = torch.zeros(2, dtype=torch.float64, device=device())  # nccl reduces GPU tensors
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        value += torch.stack([d[key].double().to(value.device) for d in losses]).sum(dim=0)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(
        value, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return value[0] / value[1].clamp(min=1.0)


def train_step(model_chunks: list, optimizer, data_iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int,
               forward_step_func: Callable = lm_forward_step) -> dict:
    """Forward/backward over ``num_microbatches``, then one optimizer step. Returns loss and norm.

    A NaN/inf loss leaves the weights untouched (no optimizer step); the caller decides whether
    that stops training.
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _scheduled_mean_loss(model_chunks, data_iterator, num_microbatches, seq_length,
                                micro_batch_size, forward_step_func, forward_only=False)
    if not math.isfinite(loss):  # every rank sees the same reduced loss: all skip the update
        return {"loss": loss, "grad_norm": float("nan"), "update_successful": False}
    update_successful, grad_norm, _ = optimizer.step()
    return {"loss": loss, "grad_norm": float(grad_norm or 0.0),
            "update_successful": bool(update_successful)}


@torch.no_grad()
def eval_step(model_chunks: list, data_iterator, num_microbatches: int, seq_length: int,
              micro_batch_size: int, forward_step_func: Callable = lm_forward_step) -> float:
    return _scheduled_mean_loss(model_chunks, data_iterator, num_microbatches, seq_length,
                                micro_batch_size, forward_step_func, forward_only=True)


def _scheduled_mean_loss(model_chunks, data_iterator, num_microbatches, seq_length,
                         micro_batch_size, forward_step_func, forward_only: bool) -> float:
    """megatron's pipeline schedule over the microbatches; the per-token mean loss, on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model_chunks,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)
    return float(_token_mean(losses, "lm loss").item())
