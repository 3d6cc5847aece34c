"""Bodies run under torchrun by the context-parallel tests (2 processes, gloo, fp32).

Context parallelism does not shard parameters, so one process pair runs both layouts from the
same weights: first CP=1 (two data-parallel ranks on the same batch, which the per-token
reduction averages back to that batch's loss), then CP=2 with the CP=1 weights loaded -- through a
dist checkpoint written at the other CP size, which also checks that checkpoints move between CP
sizes. Losses and every parameter's reduced gradient (``main_grad`` after megatron's
``finalize_model_grads``) are compared.
"""

from __future__ import annotations

import torch

from megatron_vlm.distributed import initialize_distributed

VOCAB = 4096
IMAGE_TOKEN_ID = 4000
TILE = 64  # radio_tiny: 64 px -> 4x4 patches -> 4 image tokens per tile


def packed_text_batch(lengths, seed: int = 0) -> dict:
    """One packed row of samples with the loader's layout (labels within a sample, mask 0 on a
    sample's last token, random other masked-out tokens)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    tokens = torch.randint(0, IMAGE_TOKEN_ID, (1, total), generator=g)
    labels = torch.zeros_like(tokens)
    loss_mask = (torch.rand(1, total, generator=g) > 0.3).float()
    start = 0
    for n in lengths:
        labels[0, start:start + n - 1] = tokens[0, start + 1:start + n]
        loss_mask[0, start + n - 1] = 0.0
        start += n
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "cu_seqlens": cu}


def vlm_batch() -> dict:
    """Packed row of 3 samples with 3 tiles whose image tokens straddle CP chunk boundaries
    (cp=2: 4 chunks per sample; sample 0 has chunks of 24 tokens, sample 1 of 22)."""
    batch = packed_text_batch([96, 88, 72], seed=3)
    tokens, labels = batch["tokens"], batch["labels"]
    for start in (22, 46, 116):  # 22..25 spans chunk 0|1 (rank 0|1), 116..119 likewise
        tokens[0, start:start + 4] = IMAGE_TOKEN_ID
        labels[0, start - 1:start + 3] = IMAGE_TOKEN_ID
        batch["loss_mask"][0, start - 1:start + 3] = 0.0  # image tokens are never targets
    g = torch.Generator().manual_seed(5)
    batch["tiles"] = torch.randn(3, 3, TILE, TILE, generator=g)
    return batch


def two_row_vlm_batch() -> dict:
    """A micro batch of two packed rows: ``vlm_batch`` and a text-only row; ``cu_seqlens`` over
    the flattened 2 x 256 tokens (the model sees one THD row, training/vlm_step.py)."""
    first, second = vlm_batch(), packed_text_batch([100, 156], seed=7)
    batch = {k: torch.cat([first[k], second[k]]) for k in ("tokens", "labels", "loss_mask")}
    batch["cu_seqlens"] = torch.cat([first["cu_seqlens"], second["cu_seqlens"][1:] + 256])
    batch["tiles"] = first["tiles"]
    return batch


def _grads(model) -> dict:
    return {n: p.main_grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad}


def _loss_and_grads(model, batches, forward_step) -> tuple:
    from megatron_vlm.training.optim import build_optimizer, wrap_with_ddp
    from megatron_vlm.training.recipe import OptimizerSection
    from megatron_vlm.training.step import _scheduled_mean_loss
    from megatron_vlm.training.vlm_step import schedule_shape

    ddp = wrap_with_ddp([model], distributed_optimizer=False)
    build_optimizer(ddp, OptimizerSection(lr=1e-3, distributed=False))  # finalize_model_grads
    ddp[0].zero_grad_buffer()
    rows, seq = batches[0]["tokens"].shape
    loss = _scheduled_mean_loss(ddp, iter(batches), len(batches), *schedule_shape(seq, rows),
                                forward_step, forward_only=False)
    return loss, _grads(model)


def _build(kind: str, sequence_parallel: bool = False):
    extra = {"sequence_parallel": True} if sequence_parallel else {}
    if kind == "llm":
        from megatron_vlm.models.llm import build_hybrid_llm

        return build_hybrid_llm("nemotron_h_tiny", impl="local", params_dtype=torch.float32,
                                use_cpu_initialization=True, **extra)
    from megatron_vlm.models.vlm import build_vlm

    return build_vlm("vlm_tiny", impl="local", image_token_id=IMAGE_TOKEN_ID,
                     use_cpu_initialization=True, **extra)


def _forward_step(kind: str):
    if kind == "llm":
        from megatron_vlm.training.step import packed_lm_forward_step

        return packed_lm_forward_step
    from megatron_vlm.training.vlm_step import vlm_forward_step

    return vlm_forward_step


def cp_matches_single(kind: str, ckpt_dir: str, lengths=None, first_cp: int = 1, tp: int = 1,
                      pp: int = 1, sequence_parallel: bool = False) -> dict:
    """Loss and gradients at CP=1 and CP=2 from the same weights (passed through a checkpoint
    written at ``first_cp`` and loaded at the other size), both at the given TP/PP sizes."""
    from tests.parallel_utils import load_checkpoint, save_checkpoint

    batches = [packed_text_batch(lengths)] if kind == "llm" else [two_row_vlm_batch()]
    results = {}
    for phase, cp in enumerate((first_cp, 3 - first_cp)):
        initialize_distributed(cp=cp, tp=tp, pp=pp, seed=1234)
        model = _build(kind, sequence_parallel)
        model.eval()  # no dropout; gradients are as in training
        if phase == 0:
            save_checkpoint(model, ckpt_dir)
        else:
            load_checkpoint(model, ckpt_dir)
        results[cp] = _loss_and_grads(model, batches, _forward_step(kind))
    (loss1, grads1), (loss2, grads2) = results[1], results[2]
    diffs = {n: (grads1[n] - grads2[n]).abs().max().item() for n in grads1}
    worst = max(diffs, key=diffs.get)
    mask = batches[0]["loss_mask"]
    return {"loss_cp1": loss1, "loss_cp2": loss2, "max_grad_diff": diffs[worst],
            "worst_grad": worst, "max_grad": max(g.abs().max().item() for g in grads1.values()),
            "num_grads": len(diffs), "tokens": int(batches[0]["tokens"].numel()),
            "targets": int(mask.sum())}


def long_and_short_rows(seq: int = 256) -> list:
    """Two packed rows (microbatches): one long sample, and one short sample then padding."""
    long_row = packed_text_batch([seq - 8, 8], seed=11)
    short_row = packed_text_batch([40, seq - 40], seed=12)
    short_row["loss_mask"][0, 40:] = 0.0  # the rest of the row is padding
    return [long_row, short_row]


def token_mean_across_layouts(ckpt_dir: str) -> dict:
    """The reported loss of megatron's schedule at DP=2, TP=2, PP=2 and CP=2 from the same
    weights, and the hand computation (total masked loss / total target count) at DP=2."""
    from megatron.core import parallel_state

    from megatron_vlm.models.packing import make_packed_seq_params
    from megatron_vlm.training.step import _scheduled_mean_loss, packed_lm_forward_step
    from tests.parallel_utils import load_checkpoint, save_checkpoint

    rows = long_and_short_rows()
    out = {}
    for name, sizes in (("dp", {}), ("tp", {"tp": 2}), ("pp", {"pp": 2}), ("cp", {"cp": 2})):
        initialize_distributed(seed=1234, **sizes)
        model = _build("llm")
        model.eval()
        if name == "dp":
            save_checkpoint(model, ckpt_dir)
            with torch.no_grad():  # the hand computation, from plain per-token losses
                sums, counts = [], []
                for row in rows:
                    packed = make_packed_seq_params(row["cu_seqlens"])
                    per_token = model(row["tokens"], None, None, labels=row["labels"],
                                      packed_seq_params=packed)
                    sums.append(float((per_token * row["loss_mask"]).sum()))
                    counts.append(float(row["loss_mask"].sum()))
            out["hand_token_mean"] = sum(sums) / sum(counts)
            out["mean_of_row_means"] = sum(s / c for s, c in zip(sums, counts)) / len(rows)
            out["targets"] = counts
            mine = [rows[parallel_state.get_data_parallel_rank()]]  # one row per DP rank
        else:
            load_checkpoint(model, ckpt_dir)
            mine = rows
        out[name] = _scheduled_mean_loss([model], iter(mine), len(mine), rows[0]["tokens"].shape[1],
                                         1, packed_lm_forward_step, forward_only=True)
    return out
