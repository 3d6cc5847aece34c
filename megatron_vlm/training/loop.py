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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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


@dataclass
class _Stage:
    """What the steps of one stage share (built by :func:`_set_up`)."""
    recipe: Recipe
    layout: object                   # distributed.ParallelLayout
    run_dir: Path
    ddp: list                        # the model chunks wrapped in megatron's DDP
    optimizer: object
    scheduler: object
    tokenizer: object
    model_cfg: dict
    loader: Optional[object]         # PrefetchingLoader on the data-reading rank, else None
    report: object                   # run_report.RunReport
    progress: Progress
    num_micro: int                   # micro-batches per step on each data-parallel rank
    eval_batches: dict = field(default_factory=dict)
    first_eval: dict = field(default_factory=dict)
    history: list = field(default_factory=list)   # training loss of each step
    saved_step: Optional[int] = None
    reported_skips: dict = field(default_factory=dict)


def _set_up(recipe: Recipe) -> _Stage:
    """Distributed init, model chunks, DDP + optimizer + schedule, data loader, reporting."""
    from megatron.core import parallel_state

    from megatron_vlm.data.prefetch import PrefetchingLoader
    from megatron_vlm.training import run_report
    from megatron_vlm.training.batch_io import is_data_reader
    from megatron_vlm.training.data_setup import build_train_loader
    from megatron_vlm.training.model_setup import build_model_chunks

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

    # One rank per model-parallel group reads, decodes and broadcasts (training/batch_io.py),
    # in a background thread that overlaps the step: up to one step's micro-batches ahead.
    per_step = recipe.train.global_batch_size // (recipe.train.micro_batch_size * layout.dp)
    loader = None
    if is_data_reader():
        loader = PrefetchingLoader(build_train_loader(
            recipe, tokenizer, model_cfg, parallel_state.get_data_parallel_rank(), layout.dp),
            depth=min(max(2, per_step), 32))
    report = run_report.RunReport(recipe, model_chunks, layout, tokenizer.pad_id)
    report.write_banner(run_dir, model_cfg["vlm"]["language_model"])
    progress = Progress(recipe.name, recipe.train.steps, 0,
                        tokens_per_step=recipe.train.global_batch_size * recipe.data.seq_length,
                        tensorboard_dir=run_dir / "tensorboard" if recipe.logging.tensorboard else None,
                        interval=recipe.logging.interval, log_file=run_dir / "train_log.jsonl")
    return _Stage(recipe, layout, run_dir, ddp, optimizer, scheduler, tokenizer, model_cfg,
                  loader, report, progress, num_micro=per_step)


def _restore(stage: _Stage) -> tuple:
    """Resume from ``checkpoint.dir`` or take the weights of ``checkpoint.init_from``; returns
    (start step, the first evaluation's loss saved by the resumed checkpoint or None)."""
    recipe, progress = stage.recipe, stage.progress
    resumed = ckpt.resume(stage.run_dir, stage.ddp, stage.optimizer, stage.scheduler,
                          say=progress.say)
    if resumed is not None:
        resume_from, meta = resumed[0], resumed[1]
        _reopen_loader_for(stage, resume_from, meta)
        if stage.loader is not None:
            stage.loader.load_state_dict(meta["loader"])
        progress.say(f"resumed from {resume_from} at step {meta['step']}")
        stage.saved_step = meta["step"]
        return meta["step"], meta.get("eval_loss_first")
    if recipe.checkpoint.init_from:
        source = ckpt.newest_verified(recipe.checkpoint.init_from, say=progress.say)
        if source is None or not ckpt.is_finished(recipe.checkpoint.init_from):
            raise RecipeError(
                f"{recipe.source}: checkpoint.init_from: {recipe.checkpoint.init_from} holds no "
                "finished stage (no summary.json); finish the previous stage first")
        ckpt.load_checkpoint(source, stage.ddp, verify=False)  # weights only: fresh optimizer
        # Mixed precision keeps fp32 main weights made when the optimizer was built: refresh them
        # from the loaded weights, or the first step would write the random init back.
        stage.optimizer.reload_model_params()
        progress.say(f"initialised weights from {source}")
    return 0, None


def _reopen_loader_for(stage: _Stage, resume_from, meta: dict) -> None:
    """A checkpoint of per-rank loaders (older ones) resumes only at its data-parallel size,
    with per-rank loaders again; the global-batch loader's state resumes at any size."""
    from megatron.core import parallel_state

    from megatron_vlm.data.prefetch import PrefetchingLoader
    from megatron_vlm.training.data_setup import build_train_loader

    if is_global_state(meta["loader"]):
        return
    recipe, layout = stage.recipe, stage.layout
    saved_dp = re.search(r"dp=(\d+)", meta.get("layout", ""))
    if meta["loader"] is None or saved_dp is None or int(saved_dp.group(1)) != layout.dp:
        raise RecipeError(
            f"{recipe.source}: cannot resume {resume_from} (written at "
            f"{meta.get('layout')}) at {layout.describe()}: its data position is kept "
            "per data-parallel rank, so resume at the same data-parallel size, or start a "
            "new stage from it with checkpoint.init_from")
    if stage.loader is not None:
        stage.loader.close()
        stage.loader = PrefetchingLoader(build_train_loader(
            recipe, stage.tokenizer, stage.model_cfg, parallel_state.get_data_parallel_rank(),
            layout.dp, per_rank=True), depth=min(max(2, stage.num_micro), 32))


def _evaluate(stage: _Stage) -> dict:
    from megatron_vlm.training.batch_io import distribute_step_batches
    from megatron_vlm.training.evaluate import evaluate_losses
    from megatron_vlm.training.vlm_step import schedule_shape, vlm_forward_step

    placed = {name: distribute_step_batches(batches)
              for name, batches in stage.eval_batches.items()}
    return evaluate_losses(stage.ddp, placed, vlm_forward_step,
                           *schedule_shape(stage.recipe.data.seq_length, stage.recipe.train.micro_batch_size))


def _save(stage: _Stage, step: int) -> None:
    recipe = stage.recipe
    stage.saved_step = step
    ckpt.save_checkpoint(stage.run_dir, step, stage.ddp, stage.optimizer, stage.scheduler,
                         loader_state=None if stage.loader is None else stage.loader.state_dict(),
                         meta={"recipe": recipe.name, "layout": stage.layout.describe(),
                               "eval_loss_first": stage.first_eval.get("eval_loss"),
                               "consumed_samples": step * recipe.train.global_batch_size},
                         keep=recipe.checkpoint.keep)


def _train_step(stage: _Stage, step: int) -> None:
    """Step ``step`` (1-based): fetch, forward/backward/update, schedule, logging."""
    from megatron_vlm.training.batch_io import DATA_WAIT, distribute_step_batches
    from megatron_vlm.training.vlm_step import schedule_shape, vlm_forward_step

    recipe, loader = stage.recipe, stage.loader
    step_start = time.perf_counter()
    fetched = [next(loader) if loader is not None else None for _ in range(stage.num_micro)]
    batches = distribute_step_batches(fetched)  # header and text tensors to the group
    fetch_wait = time.perf_counter() - step_start
    DATA_WAIT.take()
    seq_length, micro_batch_size = schedule_shape(recipe.data.seq_length, recipe.train.micro_batch_size)
    last = train_step(stage.ddp, stage.optimizer, iter(batches), num_microbatches=stage.num_micro,
                      seq_length=seq_length, micro_batch_size=micro_batch_size,
                      forward_step_func=vlm_forward_step)
    if not math.isfinite(last["loss"]):  # train_step made no update
        if not recipe.train.skip_nan_steps:
            raise TrainingStopped(f"{recipe.name}: loss is {last['loss']} at step {step}; "
                                  "stopping (set train.skip_nan_steps=true to skip such steps)")
        stage.progress.say(f"step {step}: loss {last['loss']}, update skipped")
    if last["update_successful"]:  # as megatron: the schedule advances with real updates
        stage.scheduler.step(1)
    lr = stage.optimizer.param_groups[0]["lr"]
    stage.history.append(last["loss"])
    metrics = stage.report.step_metrics(step, fetched, time.perf_counter() - step_start,
                                        fetch_wait + DATA_WAIT.take(), loader)
    stage.progress.train_step(step, last["loss"], lr, last["grad_norm"], metrics)
    if loader is not None:  # this rank reads data for its model-parallel group
        _report_skips(stage, step)


def _report_skips(stage: _Stage, step: int) -> None:
    """Damaged samples skipped so far, by reason (console + TensorBoard), when they change."""
    skips = {f"skipped/{k}": v for k, v in stage.loader.counters["total"].items()
             if v and k not in ("samples_read", "samples_used", "truncated_text")
             and not k.startswith("video_dali") and k != "video_pyav"}
    if skips != stage.reported_skips:
        stage.progress.scalars(step, skips, "data")
        stage.reported_skips = skips


def _close(stage: _Stage) -> None:
    if stage.loader is not None:
        stage.loader.close()
    stage.progress.close()


def _finish(stage: _Stage, step: int) -> dict:
    """Final checkpoint and evaluation, summary.json (the stage is finished)."""
    if stage.saved_step != step:
        _save(stage, step)
    results = _evaluate(stage)
    stage.progress.scalars(step, results, "eval")
    history = stage.history
    summary = {"stage": stage.recipe.name, "steps": step,
               "train_loss": history[-1] if history else None,
               "train_loss_first": history[0] if history else None, **results}
    if stage.first_eval.get("eval_loss") is not None:
        summary["eval_loss_first"] = stage.first_eval["eval_loss"]
    if torch.distributed.get_rank() == 0:
        ckpt.mark_finished(stage.run_dir, summary)
    if stage.loader is not None:
        # loader statistics of this rank: samples used/skipped, video clips per decoding backend
        stage.progress.say("data: " + ", ".join(
            f"{k}={v}" for k, v in stage.loader.counters["total"].items() if v))
    _close(stage)
    return summary


def run(recipe: Recipe) -> dict:
    """Train one stage to ``train.steps`` (or until stopped); returns the stage summary."""
    from megatron.core import parallel_state

    from megatron_vlm.training.data_setup import build_eval_batches

    stage = _set_up(recipe)
    start_step, resumed_first_eval = _restore(stage)
    stage.progress.start_step = start_step
    stage.eval_batches = build_eval_batches(recipe, stage.tokenizer, stage.model_cfg,
                                            parallel_state.get_data_parallel_rank(),
                                            stage.layout.dp, reader=stage.loader is not None)
    stop = _StopFlag(recipe.train.max_wall_minutes)
    if start_step == 0:
        stage.first_eval = _evaluate(stage)
        stage.progress.scalars(0, stage.first_eval, "eval")
    else:
        stage.first_eval = {"eval_loss": resumed_first_eval}
    stage.progress.restart_clock()  # throughput and ETA count training, not start-up and eval

    step = start_step
    while step < recipe.train.steps:
        step += 1
        _train_step(stage, step)
        if recipe.checkpoint.interval and step % recipe.checkpoint.interval == 0:
            _save(stage, step)
        if recipe.eval.interval and step % recipe.eval.interval == 0 and step < recipe.train.steps:
            stage.progress.scalars(step, _evaluate(stage), "eval")
        reason = stop.should_stop()
        if reason:
            if stage.saved_step != step:
                _save(stage, step)
            stage.progress.say(f"{reason}: saved checkpoint at step {step}, exiting cleanly")
            _close(stage)
            return {"stage": recipe.name, "steps": step, "stopped": reason}
    return _finish(stage, step)
