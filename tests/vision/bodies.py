"""Bodies run under torchrun by test_vlm_parallel.py: the tiny VLM at TP=1/PP=1, TP=2 and PP=2.

Every layout starts from one dist_checkpointing checkpoint written by the single-process run, so
differences come from the layout alone. Microbatches are the three samples of
``tests.vision.test_vlm.mixed_batch`` (text only, one tile, seven tiles), one per microbatch.
"""

from __future__ import annotations

import torch

from megatron_vlm.distributed import initialize_distributed
from megatron_vlm.training.optim import build_optimizer, wrap_with_ddp
from megatron_vlm.training.recipe import OptimizerSection
from megatron_vlm.training.step import train_step
from tests.parallel_utils import save_or_compare, save_or_load
from tests.vision.reference import IMAGE_TOKEN_ID

SEQ, TILE, TOKENS_PER_TILE, NUM_MICROBATCHES = 48, 64, 4, 3


def microbatches() -> list:
    from tests.vision.test_vlm import mixed_batch

    batch = mixed_batch(seed=2)
    tiles_per_row = [0, 1, 7]
    out, start = [], 0
    for row, count in enumerate(tiles_per_row):
        out.append({
            "tokens": batch["tokens"][row:row + 1],
            "labels": batch["labels"][row:row + 1],
            "loss_mask": torch.ones(1, SEQ),
            "tiles": batch["tiles"][start:start + count] if count else None,
        })
        start += count
    return out


def build(freeze=None, sequence_parallel=False):
    from megatron_vlm.models.vlm import build_vlm

    extra = {"sequence_parallel": True} if sequence_parallel else {}
    return build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID,
                     use_cpu_initialization=True, freeze=freeze, **extra)


def per_token_losses(model) -> list:
    """Forward-only pass through megatron's schedule; the last stage returns every token's loss."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model_):
        batch = next(data_iterator)
        output = model_(batch["tokens"], tiles=batch["tiles"], labels=batch["labels"])
        return output, lambda out: (out.sum(), {"per_token": out.detach().flatten()})

    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches()), model=[model],
            num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=1,
            forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return []
    return torch.cat([d["per_token"] for d in stored]).tolist()


def part_grad_norms(ddp_model, model) -> dict:
    """Gradient norm of each part (vision / connector / llm) over the whole model-parallel group,
    after one forward-backward of all microbatches (not clipped: read before any optimizer step).
    Tensor-parallel duplicates count once, as in megatron's own norm."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from megatron_vlm.training.vlm_step import vlm_forward_step

    ddp_model.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=vlm_forward_step, data_iterator=iter(microbatches()), model=[ddp_model],
        num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=1, forward_only=False)
    parts = {"vision": model.vision_model, "connector": model.vision_projection,
             "llm": model.language_model}
    squares = torch.zeros(len(parts), dtype=torch.float64)
    for i, module in enumerate(parts.values()):
        for p in ([] if module is None else module.parameters()):
            if p.requires_grad and param_is_not_tensor_parallel_duplicate(p):
                squares[i] += p.main_grad.double().pow(2).sum()
    torch.distributed.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    ddp_model.zero_grad_buffer()
    return dict(zip(parts, squares.sqrt().tolist()))


def run_layout(tp: int = 1, pp: int = 1, init_ckpt: str = "", save_init: bool = False,
               after_ckpt: str = "", save_after: bool = False, freeze=None,
               sequence_parallel: bool = False) -> dict:
    """Per-token losses, then one training step; save or compare the updated weights."""
    from megatron.core import parallel_state

    from megatron_vlm.training.vlm_step import vlm_forward_step

    initialize_distributed(tp=tp, pp=pp)
    model = build(freeze, sequence_parallel)
    save_or_load(model, init_ckpt, save_init)
    model.eval()  # deterministic CPE, no dropout; gradients are the same as in train mode
    result = {"per_token": per_token_losses(model),
              "stage": parallel_state.get_pipeline_model_parallel_rank(),
              "has_vision": model.vision_model is not None}

    # see tests/foundation/gpt_bodies.py on eps
    settings = OptimizerSection(lr=1e-3, adam_eps=1e-6, distributed=False)
    ddp = wrap_with_ddp([model], distributed_optimizer=False)
    optimizer = build_optimizer(ddp, settings)
    result["part_grad_norms"] = part_grad_norms(ddp[0], model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result.update(train_step(ddp, optimizer, iter(microbatches()), num_microbatches=NUM_MICROBATCHES,
                             seq_length=SEQ, micro_batch_size=1, forward_step_func=vlm_forward_step))
    # Largest update per part on this rank (None: part not on this stage).
    result["part_updates"] = {}
    for part in ("vision_model", "vision_projection", "language_model"):
        changes = [(p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()
                   if n.startswith(part + ".")]
        result["part_updates"][part] = max(changes) if changes else None
    result.update(save_or_compare(model, after_ckpt, save_after,
                                  lambda: build(freeze, sequence_parallel)))
    return result
