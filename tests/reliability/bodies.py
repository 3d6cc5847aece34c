"""Bodies run under torchrun by the reliability tests (see tests/multiproc.py)."""

from __future__ import annotations

import os


def resume_choices(workdir: str, roots: list, overrides: list) -> dict:
    """For each checkpoint root: the checkpoint `checkpoint.resume` picks on every rank and what it
    said, or its CheckpointError message; plus the step-2 weights' checksum for comparison."""
    import torch
    from megatron.core import parallel_state

    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.training import checkpoint as ckpt
    from megatron_vlm.training.loop import build_scheduler
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.optim import build_optimizer, wrap_with_ddp
    from megatron_vlm.training.recipe import load_recipe

    os.chdir(workdir)
    recipe = load_recipe("recipes/tiny/base.yaml", overrides)
    initialize_distributed(seed=recipe.train.seed)
    chunks, _, _ = build_model_chunks(recipe)
    ddp = wrap_with_ddp(chunks, distributed_optimizer=recipe.optimizer.distributed)
    optimizer = build_optimizer(ddp, recipe.optimizer, bf16=False)
    scheduler = build_scheduler(optimizer, recipe)
    out = {}
    for root in roots:
        said = []
        try:
            found = ckpt.resume(root, ddp, optimizer, scheduler, say=said.append)
            weights = sum(p.detach().double().sum().item() for p in ddp[0].parameters())
            out[os.path.basename(root)] = {"chosen": found[0].name, "step": found[1]["step"],
                                           "said": said, "weights": weights,
                                           "loader": found[1]["loader"] is not None}
        except ckpt.CheckpointError as e:
            out[os.path.basename(root)] = {"error": str(e), "said": said}
    out["dp_rank"] = parallel_state.get_data_parallel_rank()
    torch.distributed.barrier()
    return out
