"""Wrap model chunks in megatron's DistributedDataParallel and build megatron's optimizer."""

from __future__ import annotations

from typing import List

import torch

from megatron_vlm.training.recipe import OptimizerSection


def wrap_with_ddp(model_chunks: List[torch.nn.Module], distributed_optimizer: bool,
                  overlap_grad_reduce: bool = False) -> list:
    """Megatron DDP over each chunk; the gradient buffers are fp32 so accumulation is exact."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=distributed_optimizer,
    )
    wrapped = []
    for index, chunk in enumerate(model_chunks):
        # Per-token loss (training/step.py masked_lm_loss): DDP sums gradients over data- and
        # context-parallel ranks, finalize_model_grads divides by the global token count.
        chunk.config.calculate_per_token_loss = True
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk buckets: later virtual-pipeline chunks finish their backward first.
            disable_bucketing=index > 0,
        ))
    return wrapped


def build_optimizer(ddp_chunks: list, settings: OptimizerSection, bf16: bool = False):
    """megatron's optimizer (Adam) from a recipe's ``optimizer`` section."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=settings.distributed,
    )
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    attach_schedule_hooks(ddp_chunks, optimizer)
    return optimizer


def attach_schedule_hooks(ddp_chunks: list, optimizer) -> None:
    """Give megatron's schedules the hooks its training loop normally sets on the model config.

    Without ``finalize_model_grads_func`` the schedule never all-reduces gradients across data
    parallel ranks (nor embedding grads across pipeline stages).
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(ddp_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if ddp_chunks[0].ddp_config.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in ddp_chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
