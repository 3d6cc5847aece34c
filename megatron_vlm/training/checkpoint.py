"""Atomic, resharding checkpoints on megatron ``dist_checkpointing``.

Layout of a checkpoint root::

    latest                 # one line: the name of the newest complete checkpoint
    step_0000040/          # megatron dist_checkpointing directory (model + optimizer shards)
        meta.json          # step, consumed samples, layout, recipe name, scheduler state
        ranks/rank00003.pt # per-rank RNG state and data-loader position

A checkpoint is written to ``step_N.tmp`` and renamed only once every rank has finished, then
``latest`` is replaced atomically. A crash at any point leaves the previous checkpoint and
``latest`` untouched. Model and optimizer tensors are sharded by megatron, so a checkpoint saved
at one TP/PP layout loads at another.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

LATEST = "latest"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def model_sharded_state_dict(model_chunks: list) -> dict:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    from megatron.core import parallel_state

    state = {}
    for i, chunk in enumerate(model_chunks):
        parallel_state.set_virtual_pipeline_model_parallel_rank(i)
        state[f"model{i}"] = _unwrap(chunk).sharded_state_dict()
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return state


def _optimizer_metadata() -> dict:
    # Fully reshardable: the distributed optimizer's state loads at another TP/PP/DP layout.
    return {"distrib_optim_sharding_type": "fully_reshardable"}


@contextlib.contextmanager
def _keep_adam_step(optimizer):
    """Work around two bugs of megatron-core 0.16's fully-reshardable load with torch's Adam
    (the optimizer used without TE/Apex).

    ``load_state_dict`` puts the checkpoint's ``step`` into every parameter's state, then copies
    each state key from the loaded shards, which carry no ``step``: a KeyError. The step already
    in place is the right one, so it is passed through as its own source.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            state = opt.optimizer.state[main_param]
            if "step" in state and "step" not in tensors:
                tensors = dict(tensors, step=state["step"])
            return original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    # The same load gives every parameter one shared `step` tensor, which torch's Adam then
    # increments once per parameter per step (wrong bias correction): give each its own.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _optimizer_state_to_load_into(optimizer, model_state: dict) -> dict:
    """The optimizer's sharded state dict for loading, built from a fresh optimizer.

    Without TE/Apex, megatron wraps torch's Adam, whose state (incl. ``step``) exists only after a
    first step, yet building the state dict reads ``step``. Placeholder state is created for that
    and removed again: megatron's ``load_state_dict`` allocates the real state itself.
    """
    primed = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}
                    primed.append((inner, p))
    try:
        return optimizer.sharded_state_dict(model_state, is_loading=True,
                                            metadata=_optimizer_metadata())
    finally:
        for inner, p in primed:
            del inner.state[p]


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def latest_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root, step: int, model_chunks: list, optimizer=None, scheduler=None,
                    loader_state: Optional[dict] = None, meta: Optional[dict] = None,
                    keep: int = 2) -> Path:
    """Save everything needed to resume at ``step``; every rank must call this."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    name = f"step_{step:07d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crashed save
        tmp.mkdir(parents=True)
    _barrier()
    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_optimizer_metadata())
    dist_checkpointing.save(state, str(tmp))
    (tmp / "ranks").mkdir(exist_ok=True)
    torch.save({"rng": _rng_state(), "loader": loader_state},
               tmp / "ranks" / f"rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        record = dict(meta or {}, step=step)
        if scheduler is not None:
            record["scheduler"] = scheduler.state_dict()
        (tmp / "meta.json").write_text(json.dumps(record, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(root / LATEST, name + "\n")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.suffix)
        for stale in old[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path, model_chunks: list, optimizer=None, scheduler=None,
                    strict: bool = True) -> dict:
    """Load model (and optimizer, scheduler, RNG when given) from one checkpoint directory.

    Returns its meta record plus ``loader`` (this rank's data-loader state, if saved).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = _optimizer_state_to_load_into(optimizer, state)
    strict_mode = StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.IGNORE_ALL
    loaded = dist_checkpointing.load(state, str(path), strict=strict_mode)
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        with _keep_adam_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    meta = json.loads((path / "meta.json").read_text())
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    rank_file = path / "ranks" / f"rank{_rank():05d}.pt"
    meta["loader"] = None
    if optimizer is not None and rank_file.is_file():
        per_rank = torch.load(rank_file, weights_only=False)
        _restore_rng(per_rank["rng"])
        meta["loader"] = per_rank["loader"]
    return meta
