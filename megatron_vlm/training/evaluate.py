"""Held-out loss during training, through the same megatron schedule in forward-only mode."""

from __future__ import annotations

from megatron_vlm.training.step import eval_step


def evaluate_losses(model_chunks: list, eval_batches: dict, forward_step, seq_length: int,
                    micro_batch_size: int) -> dict:
    """Mean loss per eval dataset (``eval_loss/<name>``) and over all of them (``eval_loss``)."""
    for chunk in model_chunks:
        chunk.eval()
    results = {}
    for name, batches in eval_batches.items():
        results[f"eval_loss/{name}"] = eval_step(
            model_chunks, iter(batches), num_microbatches=len(batches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_step_func=forward_step)
    for chunk in model_chunks:
        chunk.train()
    if results:
        results["eval_loss"] = sum(results.values()) / len(results)
    return results
