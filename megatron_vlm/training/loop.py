"""The training loop: one function from a validated recipe to a finished stage.

    recipe -> distributed init -> model chunks (frozen parts) -> DDP + optimizer + LR schedule
           -> resume (``checkpoint.dir``) or weights of the previous stage (``init_from``)
           -> steps through megatron's schedules -> periodic checkpoint / eval -> summary.json
"""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path

import torch

from megatron_vlm.distributed import initialize_distributed, read_launch_env
from megatron_vlm.known_warnings import ignore_known_noise
from megatron_vlm.platform import device
from megatron_vlm.data.loader import is_global_state
from megatron_vlm.training import checkpoint as ckpt
from megatron_vlm.training.optim import build_optimizer, wrap_with_ddp
from megatron_vlm.training.progress import Progress
from megatron_vlm.training.recipe import Recipe, RecipeError, check_against_world, check_paths
from megatron_vlm.training.step import train_step


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message names the step."""


class _StopFlag:
    """Set by SIGTERM (Slurm preemption) or the wall-time limit; agreed on by all ranks."""

    def __init__(self, max_wall_minutes):
        self.deadline = None if max_wall_minutes is None else time.monotonic() + 60 * max_wall_minutes
        self.signalled = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True

    def should_stop(self) -> str:
        local = self.signalled or (self.deadline is not None and time.monotonic() > self.deadline)
        flag = torch.tensor([1.0 if local else 0.0], device=device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return ""
        return "SIGTERM" if self.signalled else "wall-time limit"


def build_scheduler(optimizer, recipe: Recipe):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt, sched, steps = recipe.optimizer, recipe.schedule, recipe.train.steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if sched.warmup_steps else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=sched.warmup_steps, lr_decay_steps=steps, lr_decay_style=sched.decay,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=steps,
        wd_incr_style="constant",
        # On resume the recipe's schedule wins (e.g. more train.steps); the step count continues.
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)


def run(recipe: Recipe) -> dict:
    """Train one stage to ``train.steps`` (or until stopped); returns the stage summary."""
    from megatron.core import parallel_state

    from megatron_vlm.data.prefetch import PrefetchingLoader
    from megatron_vlm.training import run_report
    from megatron_vlm.training.batch_io import DATA_WAIT, distribute_step_batches, is_data_reader
    from megatron_vlm.training.data_setup import build_eval_batches, build_train_loader
    from megatron_vlm.training.evaluate import evaluate_losses
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.vlm_step import vlm_forward_step

    check_paths(recipe)
    check_against_world(recipe, read_launch_env().world_size)  # before any process group starts
    p = recipe.parallel
    layout = initialize_distributed(tp=p.tp, pp=p.pp, cp=p.cp, seed=recipe.train.seed)
    run_report.configure_logging(torch.distributed.get_rank())
    ignore_known_noise()  # in front of the logging's "once" per category again
    run_dir = Path(recipe.checkpoint.dir)

    model_chunks, tokenizer, model_cfg = build_model_chunks(recipe)
    ddp = wrap_with_ddp(model_chunks, distributed_optimizer=recipe.optimizer.distributed)
    optimizer = build_optimizer(ddp, recipe.optimizer, bf16=recipe.train.precision != "fp32")
    scheduler = build_scheduler(optimizer, recipe)

    dp_rank = parallel_state.get_data_parallel_rank()
    # One rank per model-parallel group reads, decodes and broadcasts (training/batch_io.py),
    # in a background thread that overlaps the step: up to one step's micro-batches ahead.
    reader = is_data_reader()
    loader = None
    per_step = recipe.train.global_batch_size // (recipe.train.micro_batch_size * layout.dp)
    if reader:
        loader = PrefetchingLoader(build_train_loader(recipe, tokenizer, model_cfg, dp_rank,
                                                      layout.dp), depth=min(max(2, per_step), 32))
    report = run_report.RunReport(recipe, model_chunks, layout, tokenizer.pad_id)
    report.write_banner(run_dir, model_cfg["vlm"]["language_model"])
    progress = Progress(recipe.name, recipe.train.steps, 0,
                        tokens_per_step=recipe.train.global_batch_size * recipe.data.seq_length,
                        tensorboard_dir=run_dir / "tensorboard" if recipe.logging.tensorboard else None,
                        interval=recipe.logging.interval, log_file=run_dir / "train_log.jsonl")

    start_step, resumed_first_eval = 0, None
    resumed = ckpt.resume(run_dir, ddp, optimizer, scheduler, say=progress.say)
    resume_from = resumed[0] if resumed else None
    if resume_from is not None:
        meta = resumed[1]
        saved_dp = re.search(r"dp=(\d+)", meta.get("layout", ""))
        if not is_global_state(meta["loader"]):  # saved by per-rank loaders (older checkpoints)
            if meta["loader"] is None or saved_dp is None or int(saved_dp.group(1)) != layout.dp:
                raise RecipeError(
                    f"{recipe.source}: cannot resume {resume_from} (written at "
                    f"{meta.get('layout')}) at {layout.describe()}: its data position is kept "
                    "per data-parallel rank, so resume at the same data-parallel size, or start a "
                    "new stage from it with checkpoint.init_from")
            if loader is not None:
                loader.close()
                loader = PrefetchingLoader(build_train_loader(
                    recipe, tokenizer, model_cfg, dp_rank, layout.dp, per_rank=True),
                    depth=min(max(2, per_step), 32))
        start_step = meta["step"]
        resumed_first_eval = meta.get("eval_loss_first")
        if loader is not None:
            loader.load_state_dict(meta["loader"])
        progress.say(f"resumed from {resume_from} at step {start_step}")
    elif recipe.checkpoint.init_from:
        source = ckpt.newest_verified(recipe.checkpoint.init_from, say=progress.say)
        if source is None or not ckpt.is_finished(recipe.checkpoint.init_from):
            raise RecipeError(
                f"{recipe.source}: checkpoint.init_from: {recipe.checkpoint.init_from} holds no "
                "finished stage (no summary.json); finish the previous stage first")
        ckpt.load_checkpoint(source, ddp, verify=False)  # weights only: fresh optimizer, schedule
        # Mixed precision keeps fp32 main weights made when the optimizer was built: refresh them
        # from the loaded weights, or the first step would write the random init back.
        optimizer.reload_model_params()
        progress.say(f"initialised weights from {source}")
    progress.start_step = start_step

    forward_step = vlm_forward_step
    dp_size = layout.dp
    num_micro = recipe.train.global_batch_size // (recipe.train.micro_batch_size * dp_size)
    eval_batches = build_eval_batches(recipe, tokenizer, model_cfg, dp_rank, dp_size,
                                      reader=reader)
    stop = _StopFlag(recipe.train.max_wall_minutes)

    def evaluate():
        placed = {name: distribute_step_batches(batches) for name, batches in eval_batches.items()}
        return evaluate_losses(ddp, placed, forward_step, recipe.data.seq_length,
                               recipe.train.micro_batch_size)

    if start_step == 0:
        first_eval = evaluate()
        progress.scalars(0, first_eval, "eval")
    else:
        first_eval = {"eval_loss": resumed_first_eval}
    history, step, last, reported_skips = [], start_step, {}, {}
    progress.restart_clock()  # throughput and ETA count training, not start-up and evaluation
    saved_step = start_step if resume_from is not None else None

    def save(at_step):
        nonlocal saved_step
        saved_step = at_step
        ckpt.save_checkpoint(run_dir, at_step, ddp, optimizer, scheduler,
                             loader_state=None if loader is None else loader.state_dict(),
                             meta={"recipe": recipe.name, "layout": layout.describe(),
                                   "eval_loss_first": first_eval.get("eval_loss"),
                                   "consumed_samples": at_step * recipe.train.global_batch_size},
                             keep=recipe.checkpoint.keep)

    while step < recipe.train.steps:
        step_start = time.perf_counter()
        fetched = [next(loader) if loader is not None else None for _ in range(num_micro)]
        batches = distribute_step_batches(fetched)  # header and text tensors to the group
        fetch_wait = time.perf_counter() - step_start
        DATA_WAIT.take()
        last = train_step(ddp, optimizer, iter(batches), num_microbatches=num_micro,
                          seq_length=recipe.data.seq_length,
                          micro_batch_size=recipe.train.micro_batch_size,
                          forward_step_func=forward_step)
        if not math.isfinite(last["loss"]):  # train_step made no update
            if not recipe.train.skip_nan_steps:
                raise TrainingStopped(f"{recipe.name}: loss is {last['loss']} at step {step + 1}; "
                                      "stopping (set train.skip_nan_steps=true to skip such steps)")
            progress.say(f"step {step + 1}: loss {last['loss']}, update skipped")
        if last["update_successful"]:  # as megatron: the schedule advances with real updates
            scheduler.step(1)
        step += 1
        lr = optimizer.param_groups[0]["lr"]
        history.append(last["loss"])
        metrics = report.step_metrics(step, fetched, time.perf_counter() - step_start,
                                      fetch_wait + DATA_WAIT.take(), loader)
        progress.train_step(step, last["loss"], lr, last["grad_norm"], metrics)
        if loader is not None:  # this rank reads data for its model-parallel group
            skips = {f"skipped/{k}": v for k, v in loader.counters["total"].items()
                     if v and k not in ("samples_read", "samples_used", "truncated_text")
                     and not k.startswith("video_dali") and k != "video_pyav"}
            if skips != reported_skips:  # damaged samples skipped, by reason (console + TensorBoard)
                progress.scalars(step, skips, "data")
                reported_skips = skips
        if recipe.checkpoint.interval and step % recipe.checkpoint.interval == 0:
            save(step)
        if recipe.eval.interval and step % recipe.eval.interval == 0 and step < recipe.train.steps:
            progress.scalars(step, evaluate(), "eval")
        reason = stop.should_stop()
        if reason:
            if saved_step != step:
                save(step)
            progress.say(f"{reason}: saved checkpoint at step {step}, exiting cleanly")
            if loader is not None:
                loader.close()
            progress.close()
            return {"stage": recipe.name, "steps": step, "stopped": reason}

    if saved_step != step:
        save(step)
    results = evaluate()
    progress.scalars(step, results, "eval")
    summary = {"stage": recipe.name, "steps": step,
               "train_loss": history[-1] if history else None,
               "train_loss_first": history[0] if history else None, **results}
    if first_eval.get("eval_loss") is not None:
        summary["eval_loss_first"] = first_eval["eval_loss"]
    if torch.distributed.get_rank() == 0:
        ckpt.mark_finished(run_dir, summary)
    if loader is not None:
        # loader statistics of this rank: samples used/skipped, video clips per decoding backend
        progress.say("data: " + ", ".join(f"{k}={v}" for k, v in loader.counters["total"].items() if v))
        loader.close()
    progress.close()
    return summary
