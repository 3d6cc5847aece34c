"""Bodies run under torchrun by test_parallel_layouts.py: a small megatron-core GPT trained one step.

Every layout starts from one checkpoint written by the single-process reference, so differences in
loss or updated parameters come from the parallel layout alone.
"""

from __future__ import annotations

import torch

from megatron_vlm.distributed import initialize_distributed
from megatron_vlm.training.optim import build_optimizer, wrap_with_ddp
from megatron_vlm.training.recipe import OptimizerSection
from megatron_vlm.training.step import train_step
from tests.parallel_utils import save_or_compare, save_or_load

VOCAB, SEQ, GLOBAL_BATCH = 128, 32, 4


def build_gpt(tp: int, pp: int):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, use_cpu_initialization=True)
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False)


def global_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.2).float()
    position_ids = torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
            "position_ids": position_ids, "attention_mask": mask.expand(GLOBAL_BATCH, 1, SEQ, SEQ)}


def microbatches(micro_batch_size: int) -> tuple[list, int]:
    """This data-parallel rank's share of the global batch, cut into microbatches."""
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batch = global_batch()
    per_rank = GLOBAL_BATCH // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    mine = {k: v[rows] for k, v in batch.items()}
    count = per_rank // micro_batch_size
    return [{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in mine.items()}
            for i in range(count)], count


def one_step(tp: int = 1, pp: int = 1, micro_batch_size: int = 1,
             distributed_optimizer: bool = False, init_ckpt: str = "", save_init: bool = False,
             after_ckpt: str = "", save_after: bool = False) -> dict:
    """Train one step from ``init_ckpt``; save or compare the updated weights at ``after_ckpt``."""
    initialize_distributed(tp=tp, pp=pp)
    model = build_gpt(tp, pp)
    save_or_load(model, init_ckpt, save_init)
    model.eval()  # no dropout anywhere; the grads are the same as in train mode
    # Adam's first update is lr*g/(|g|+eps): for gradient elements near eps, float32 summation-order
    # noise (~1e-9 absolute, which differs by layout) is amplified into the update; eps=1e-6 keeps
    # the comparison about the layout, not about rounding of near-zero gradients.
    settings = OptimizerSection(lr=1e-3, adam_eps=1e-6, distributed=distributed_optimizer)
    ddp = wrap_with_ddp([model], distributed_optimizer=distributed_optimizer)
    optimizer = build_optimizer(ddp, settings)
    batches, count = microbatches(micro_batch_size)
    result = train_step(ddp, optimizer, iter(batches), num_microbatches=count, seq_length=SEQ,
                        micro_batch_size=micro_batch_size)
    result.update(save_or_compare(model, after_ckpt, save_after, lambda: build_gpt(tp, pp)))
    return result


def bad_layout(tp: int, pp: int) -> None:
    initialize_distributed(tp=tp, pp=pp)
