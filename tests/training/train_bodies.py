"""Bodies run under torchrun by the training tests (see tests/multiproc.py)."""

from __future__ import annotations

import os
import pathlib

import torch


def _recipe(workdir: str, name: str, overrides: list):
    from megatron_vlm.training.recipe import load_recipe

    os.chdir(workdir)
    return load_recipe(f"recipes/tiny/{name}.yaml", overrides)


def checkpoint_eval_loss(workdir: str, checkpoint: str, tp: int, overrides: list) -> float:
    """Loss of the first eval batch from ``checkpoint``'s weights at tensor parallel size ``tp``."""
    from megatron.core import parallel_state

    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.training.vlm_step import vlm_forward_step
    from megatron_vlm.training.checkpoint import latest_checkpoint, load_checkpoint
    from megatron_vlm.training.data_setup import build_eval_batches
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.step import eval_step

    recipe = _recipe(workdir, "base", overrides + [f"parallel.tp={tp}", "eval.batches=1"])
    initialize_distributed(tp=tp)
    chunks, tokenizer, model_cfg = build_model_chunks(recipe)
    load_checkpoint(latest_checkpoint(checkpoint), chunks)
    batches = build_eval_batches(recipe, tokenizer, model_cfg,
                                 parallel_state.get_data_parallel_rank(),
                                 parallel_state.get_data_parallel_world_size())
    first = next(iter(batches.values()))
    chunks[0].eval()
    return eval_step(chunks, iter(first), num_microbatches=1, seq_length=recipe.data.seq_length,
                     micro_batch_size=1, forward_step_func=vlm_forward_step)


def changed_parts(workdir: str, before: str, after: str, overrides: list) -> dict:
    """Max abs change of each model part (vision, connector, llm) between two checkpoints."""
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.training.checkpoint import latest_checkpoint, load_checkpoint
    from megatron_vlm.training.model_setup import build_model_chunks

    recipe = _recipe(workdir, "stage0", overrides)
    initialize_distributed()
    params = []
    for ckpt in (before, after):
        chunks, _, _ = build_model_chunks(recipe)
        load_checkpoint(latest_checkpoint(ckpt), chunks)
        params.append({n: p.detach().clone() for n, p in chunks[0].named_parameters()})
    prefix = {"vision_model.": "vision", "vision_projection.": "connector",
              "language_model.": "llm"}
    out = {part: 0.0 for part in prefix.values()}
    for name, value in params[0].items():
        part = next(v for k, v in prefix.items() if name.startswith(k))
        out[part] = max(out[part], (params[1][name] - value).abs().max().item())
    return out


def crash_during_save(root: str) -> dict:
    """Save step 1, crash inside the save of step 2, then load what `latest` points to."""
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.training import checkpoint as ckpt
    from tests.foundation.gpt_bodies import build_gpt

    initialize_distributed()
    model = build_gpt(1, 1)
    ckpt.save_checkpoint(root, 1, [model], meta={"note": "good"})
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # step 2 would hold different weights

    real_save = torch.save

    def crashing_save(*args, **kwargs):  # the first torch.save inside the save of step 2
        raise RuntimeError("injected crash during checkpoint save")

    torch.save = crashing_save
    try:
        ckpt.save_checkpoint(root, 2, [model])
        crashed = False
    except RuntimeError:
        crashed = True
    finally:
        torch.save = real_save
    latest = ckpt.latest_checkpoint(root)
    fresh = build_gpt(1, 1)
    meta = ckpt.load_checkpoint(latest, [fresh])
    diff = max((p.detach() - saved[n]).abs().max().item() for n, p in fresh.named_parameters())
    leftovers = sorted(p.name for p in pathlib.Path(root).iterdir())
    # A later save at the same step succeeds over the debris.
    ckpt.save_checkpoint(root, 2, [model])
    retry = ckpt.latest_checkpoint(root).name
    # `latest` naming a directory that is gone: the newest complete checkpoint is used.
    (pathlib.Path(root) / "latest").write_text("step_0000009\n")
    fallback = ckpt.latest_checkpoint(root).name
    return {"crashed": crashed, "latest": latest.name, "note": meta.get("note"),
            "max_diff": diff, "entries_after_crash": leftovers,
            "latest_after_retry": retry, "fallback": fallback}


def packed_vs_alone(workdir: str, overrides: list) -> dict:
    """Per-sample loss of a packed loader batch vs each sample run alone (tiny VLM, fp32)."""
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.models.packing import make_packed_seq_params
    from megatron_vlm.training.data_setup import build_train_loader
    from megatron_vlm.training.model_setup import build_model_chunks

    recipe = _recipe(workdir, "stage1", overrides + ["parallel.tp=1"])
    initialize_distributed()
    (model,), tokenizer, model_cfg = build_model_chunks(recipe)
    model.eval()
    loader = build_train_loader(recipe, tokenizer, model_cfg, 0, 1)
    batch = next(b for b in loader if len(b["cu_seqlens"]) >= 4 and b["tiles"].shape[0] > 0)
    per_tile = model.tokens_per_tile(batch["tiles"])
    with torch.no_grad():
        packed = model(batch["tokens"], tiles=batch["tiles"], labels=batch["labels"],
                       packed_seq_params=make_packed_seq_params(batch["cu_seqlens"]))
        bounds = batch["cu_seqlens"].tolist()
        tile_cursor, diffs, samples, image_samples = 0, [], 0, 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            mask = batch["loss_mask"][0, start:end]
            tokens = batch["tokens"][:, start:end]
            n_tiles = int((tokens == tokenizer.image_id).sum()) // per_tile
            tiles = batch["tiles"][tile_cursor:tile_cursor + n_tiles]
            tile_cursor += n_tiles
            if mask.sum() == 0:
                continue  # trailing padding
            alone = model(tokens, tiles=tiles, labels=batch["labels"][:, start:end])
            loss_alone = (alone[0] * mask).sum() / mask.sum()
            loss_packed = (packed[0, start:end] * mask).sum() / mask.sum()
            diffs.append(abs(loss_alone - loss_packed).item())
            samples += 1
            image_samples += int(n_tiles > 0)
    return {"max_diff": max(diffs), "samples": samples, "image_samples": image_samples,
            "loss": loss_packed.item()}


def micro_batch_sizes_agree(workdir: str, overrides: list) -> dict:
    """The same 4 packed rows as 4 micro batches of 1 row and as 1 micro batch of 4 rows
    (megatron's THD layout: one row of 4 x seq tokens): loss and gradients through the schedule."""
    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.training.data_setup import build_train_loader
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.optim import wrap_with_ddp
    from megatron_vlm.training.step import _scheduled_mean_loss
    from megatron_vlm.training.vlm_step import schedule_shape, vlm_forward_step

    initialize_distributed()
    results, ddp = {}, None
    for mbs in (1, 4):
        recipe = _recipe(workdir, "stage1", overrides + ["parallel.tp=1", f"train.micro_batch_size={mbs}",
                                                         "train.global_batch_size=4"])
        if ddp is None:
            chunks, tokenizer, model_cfg = build_model_chunks(recipe)
            ddp = wrap_with_ddp(chunks, distributed_optimizer=False)
            ddp[0].config.finalize_model_grads_func = None  # raw summed gradients, compared below
        ddp[0].zero_grad_buffer()
        loader = build_train_loader(recipe, tokenizer, model_cfg, 0, 1)
        batches = [next(loader) for _ in range(4 // mbs)]
        seq, micro = schedule_shape(recipe.data.seq_length, mbs)
        loss = _scheduled_mean_loss(ddp, iter(batches), len(batches), seq, micro, vlm_forward_step,
                                    forward_only=False)
        grads = torch.cat([p.main_grad.reshape(-1) for p in ddp[0].parameters() if p.requires_grad])
        results[mbs] = {"loss": loss, "grad_norm": grads.norm().item(), "grads": grads.clone(),
                        "rows": [k for b in batches for k in b["sample_keys"]],
                        "tiles": sum(int(b["tiles"].shape[0]) for b in batches)}
    diff = (results[1].pop("grads") - results[4].pop("grads")).abs().max().item()
    return {**results, "max_grad_diff": diff}
