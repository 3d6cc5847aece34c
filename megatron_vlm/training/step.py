"""One optimizer step through megatron's pipeline schedules, and the masked LM loss."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterator, List

import torch

from megatron_vlm.platform import device


def masked_lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean token loss over the positions the mask selects (the model returns per-token losses).

    Returns megatron's ``(loss, reported)`` pair. The schedule divides by the number of
    microbatches and DDP averages over data-parallel ranks, so the step optimises the mean of the
    per-microbatch means whatever the layout (for the same microbatches).
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}


def lm_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Forward step for a decoder that takes (tokens, position_ids, attention_mask, labels)."""
    from megatron_vlm.training.batch_io import get_batch

    batch = get_batch(data_iterator)  # read once per model-parallel group, on the device
    output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"),
                   labels=batch.get("labels"))
    return output, partial(masked_lm_loss, batch["loss_mask"])


def _last_stage_mean(losses: List[dict], key: str) -> torch.Tensor:
    """Average the reported loss over microbatches, then share it from the last pipeline stage."""
    from megatron.core import parallel_state

    value = torch.zeros(1, dtype=torch.float64, device=device())  # nccl reduces GPU tensors
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        value[0] = torch.stack([d[key].double() for d in losses]).mean()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value / parallel_state.get_data_parallel_world_size()


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
    """megatron's pipeline schedule over the microbatches; the mean loss, on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=data_iterator, model=model_chunks,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)
    return float(_last_stage_mean(losses, "lm loss").item())
