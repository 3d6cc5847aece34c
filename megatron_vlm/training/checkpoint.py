"""Atomic, resharding checkpoints on megatron ``dist_checkpointing``.

Layout of a checkpoint root::

    latest                 # one line: the name of the newest complete checkpoint
    step_0000040/          # megatron dist_checkpointing directory (model + optimizer shards)
        meta.json          # step, consumed samples, layout, recipe name, scheduler state
        manifest.json      # every file above with its size and CRC-32, checked before loading
        ranks/rank00003.pt # per-rank RNG state (restored when resuming at the same layout)
        loader/dp00001.json# data-parallel rank 1's data-loader position (the same on every DP
                           # rank for the global-batch loader, so any DP size can resume)

A checkpoint is written to ``step_N.tmp`` and renamed only once every rank has finished, then
``latest`` is replaced atomically. A crash at any point leaves the previous checkpoint and
``latest`` untouched. Model and optimizer tensors are sharded by megatron, so a checkpoint saved
at one TP/PP layout loads at another.

Damage after the fact (a truncated or overwritten file, a missing one, a broken ``latest``) is
found by checking the manifest before loading: a resume takes the newest checkpoint that verifies
and loads on every rank, names what was wrong with each newer one, and fails with one message
when none is usable (see :func:`resume`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from megatron_vlm.training import checkpoint_meta

LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected; the message names each one and its damage."""


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def model_sharded_state_dict(model_chunks: list) -> dict:
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    if len(model_chunks) == 1:
        return {"model": unwrap_model(model_chunks[0]).sharded_state_dict()}

    state = {}
    for i, chunk in enumerate(model_chunks):
        parallel_state.set_virtual_pipeline_model_parallel_rank(i)
        state[f"model{i}"] = unwrap_model(chunk).sharded_state_dict()
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


def _complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def _world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "crc32": _crc32(path)}


def _write_manifest(directory: Path) -> None:
    """Collective: each rank checksums a share of the files; rank 0 writes the manifest."""
    rank, world = _world()
    names = [sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
             if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(names, src=0)
    mine = {n: _file_record(directory / n) for n in names[0][rank::world]}
    parts = [mine]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
    if rank == 0:
        files = {k: v for part in parts for k, v in part.items()}
        (directory / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=0))


def checkpoint_problem(path, share: tuple[int, int] = (0, 1)) -> Optional[str]:
    """What is wrong with the checkpoint directory ``path`` (None: nothing found).

    Checks meta.json and, against manifest.json, that every file exists, is readable and has its
    recorded size and CRC-32. ``share=(i, n)`` checks only every n-th file from the i-th (ranks
    split the reading). Checkpoints written before manifests existed only get the first checks.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            return "meta.json has no step"
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({e})"
    if not (path / "metadata.json").is_file():
        return "metadata.json (dist_checkpointing) is missing"
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return None  # written before manifests: nothing more to compare with
    try:
        files = json.loads(manifest_file.read_text())["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and {"size", "crc32"} <= v.keys() for v in files.values()):
            raise TypeError("no file list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    index, count = share
    for name in sorted(files)[index::count]:
        expected = files[name]
        try:
            if (path / name).stat().st_size != expected["size"]:
                return (f"{name} has {(path / name).stat().st_size} bytes, "
                        f"{expected['size']} were saved")
            if _crc32(path / name) != expected["crc32"]:
                return f"{name} does not match its saved checksum"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} is unreadable ({e.strerror or e})"
    return None


def _step_of(path: Path) -> int:
    return int(path.name.split(".")[0].split("_")[1])


def checkpoint_candidates(root: Path) -> list[Path]:
    """Checkpoint directories, newest first. ``step_N.old`` (the previous copy of a step being
    re-saved when a crash hit) comes right after ``step_N``."""
    found = [p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+(\.old)?", p.name)]
    return sorted(found, key=lambda p: (_step_of(p), p.suffix != ".old"), reverse=True)


def _latest_note(root: Path, chosen: Optional[Path]) -> Optional[str]:
    """A remark when ``latest`` is broken or names something other than what is used."""
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None if chosen is None else f"{LATEST} is missing"
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return f"{LATEST} is unreadable ({e})"
    if not re.fullmatch(r"step_\d+", name):
        return f"{LATEST} holds {name[:40]!r}, not a checkpoint name"
    if not (root / name).is_dir():
        return f"{LATEST} names {name}, which does not exist"
    return None


def latest_checkpoint(root, say: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest checkpoint under ``root`` that verifies (see :func:`checkpoint_problem`).

    Used by single-process readers (evaluation, conversion, tests). ``latest`` is not trusted: the
    step directories are checked newest first and each damaged one is named (``say``, default
    stderr). None when ``root`` holds no checkpoint at all; :class:`CheckpointError` when it holds
    some but none verifies (never a silent fresh start).
    """
    import sys

    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    root = Path(root)
    return _newest_good(root, checkpoint_candidates(root), checkpoint_problem, say)


def resolve_checkpoint(path) -> Path:
    """The checkpoint a user names (converter, evaluation): one ``step_*`` directory, verified
    against its manifest, or a checkpoint root, whose newest checkpoint that verifies is taken.
    :class:`CheckpointError` (one line starting with ``path``) when there is none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if (path / "meta.json").is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"{path}: damaged checkpoint: {problem}")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (no latest/meta.json)")
    return found


def newest_verified(root, say: Callable[[str], None]) -> Optional[Path]:
    """Collective :func:`latest_checkpoint`: the ranks split the reading and agree on the answer
    (for loading weights on every rank, e.g. ``checkpoint.init_from``)."""
    root = Path(root)
    rank, world = _world()
    return _newest_good(root, checkpoint_candidates(root) if root.is_dir() else [],
                        lambda path: _first_problem(checkpoint_problem(path, share=(rank, world))),
                        say)


def _newest_good(root: Path, candidates: list, problem_of: Callable[[Path], Optional[str]],
                 say: Callable[[str], None]) -> Optional[Path]:
    """The first candidate without a problem (naming the damaged ones passed over); None when
    there is no candidate, CheckpointError when every one is damaged."""
    problems = []
    for path in candidates:
        problem = problem_of(path)
        if problem is None:
            for name, why in problems:
                say(f"checkpoint {root / name} is damaged ({why}); using {path.name}")
            return path
        problems.append((path.name, problem))
    if problems:
        raise CheckpointError(f"{root}: no usable checkpoint: " +
                              "; ".join(f"{n}: {why}" for n, why in problems))
    return None


def resume(root, model_chunks: list, optimizer, scheduler,
           say: Callable[[str], None]) -> Optional[tuple[Path, dict]]:
    """Collective: load the newest checkpoint under ``root`` that verifies and loads on every rank.

    Ranks split the verification, then agree on each candidate; a damaged one is named once
    (``say``, rank 0's printer) and the previous one is tried. Returns (path, meta) or None when
    ``root`` holds no checkpoint; raises :class:`CheckpointError` when none is usable.
    """
    root = Path(root)
    rank, world = _world()
    candidates = checkpoint_candidates(root) if root.is_dir() else []
    note = _latest_note(root, candidates[0]) if candidates else None  # before anything moves
    problems = []
    for path in candidates:
        problem = _first_problem(checkpoint_problem(path, share=(rank, world)))
        meta = None
        if problem is None:
            try:
                meta = load_checkpoint(path, model_chunks, optimizer, scheduler, verify=False)
            except Exception as e:  # noqa: BLE001 - any damage the manifest missed; named below
                problem = f"loading failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            problem = _first_problem(problem)
        if problem is None:
            if problems or note:
                aside = " (moved to step_*.damaged)" if problems else ""
                say("; ".join([f"checkpoint {root / n} is unusable ({why})" for n, why in problems]
                              + ([note] if note else [])) + f"; resuming from {path.name}{aside}")
            if rank == 0:  # kept for inspection, but no longer a candidate (nor deleted by `keep`)
                for name, _ in problems:
                    damaged = root / f"{name.split('.')[0]}.damaged"
                    if not damaged.exists():
                        os.rename(root / name, damaged)
            _barrier()
            return path, meta
        problems.append((path.name, problem))
    if problems:
        raise CheckpointError(f"{root}: no usable checkpoint: " +
                              "; ".join(f"{n}: {why}" for n, why in problems))
    return None


def _first_problem(local: Optional[str]) -> Optional[str]:
    """The same answer on every rank: the first rank's problem with a candidate, if any."""
    rank, world = _world()
    if world == 1:
        return local
    parts = [None] * world
    torch.distributed.all_gather_object(parts, local)
    for r, p in enumerate(parts):
        if p is not None:
            return f"{p} (rank {r})"
    return None


SUMMARY = "summary.json"


def mark_finished(root, summary: dict) -> None:
    """A stage's directory gets summary.json only when its last step is saved and evaluated."""
    _write_atomic(Path(root) / SUMMARY, json.dumps(summary, indent=1))


def is_finished(root) -> bool:
    return (Path(root) / SUMMARY).is_file()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root, step: int, model_chunks: list, optimizer=None, scheduler=None,
                    loader_state: Optional[dict] = None, meta: Optional[dict] = None,
                    keep: int = 2, sharded_strategy=None) -> Path:
    """Save everything needed to resume at ``step``; every rank must call this.

    ``loader_state`` is this data-parallel rank's loader position (the same on its TP/PP peers).
    ``keep``: newest checkpoints kept (0 keeps all). ``sharded_strategy``: megatron's save
    strategy (default: its torch_dist one; the HF import streams with its own).
    """
    from megatron.core import dist_checkpointing, parallel_state

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
    dist_checkpointing.save(state, str(tmp), sharded_strategy)
    (tmp / "ranks").mkdir(exist_ok=True)
    torch.save({"rng": _rng_state()}, tmp / "ranks" / f"rank{_rank():05d}.pt")
    if loader_state is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_pipeline_model_parallel_rank() == 0:
        (tmp / "loader").mkdir(exist_ok=True)
        dp_rank = parallel_state.get_data_parallel_rank()
        (tmp / "loader" / f"dp{dp_rank:05d}.json").write_text(json.dumps(loader_state))
    _barrier()
    _write_manifest(tmp)  # what a complete copy holds; meta.json, written last, is not in it
    if _rank() == 0:
        record = dict(meta or {}, step=step)
        if scheduler is not None:
            record["scheduler"] = scheduler.state_dict()
        (tmp / "meta.json").write_text(json.dumps(record, indent=1))
        checkpoint_meta.write(tmp)  # recipe + model config: the checkpoint describes itself
        # Re-saving a step: move the old copy aside, so a complete one exists at every moment.
        aside = root / f"{name}.old"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
        _write_atomic(root / LATEST, name + "\n")
        shutil.rmtree(aside, ignore_errors=True)
        if keep > 0:
            others = sorted(p for p in root.glob("step_*")
                            if p.is_dir() and not p.suffix and p != final)
            for stale in others[:max(0, len(others) - (keep - 1))]:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path, model_chunks: list, optimizer=None, scheduler=None,
                    strict: bool = True, verify: bool = True) -> dict:
    """Load model (and optimizer, scheduler, RNG when given) from one checkpoint directory.

    Returns its meta record plus ``loader`` (this rank's data-loader state, if saved).
    ``verify`` checks the directory first (:class:`CheckpointError` naming the damage).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.utils import unwrap_model

    path = Path(path)
    if verify:
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path}: not a usable checkpoint: {problem}")
    state = model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        state["optimizer"] = _optimizer_state_to_load_into(optimizer, state)
    strict_mode = StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.IGNORE_ALL
    loaded = dist_checkpointing.load(state, str(path), strict=strict_mode)
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        unwrap_model(chunk).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        with _keep_adam_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    meta = json.loads((path / "meta.json").read_text())
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    meta["loader"] = None
    if optimizer is not None:  # a resume, not a weights-only start
        from megatron.core import parallel_state

        loader_file = path / "loader" / f"dp{parallel_state.get_data_parallel_rank():05d}.json"
        if not loader_file.is_file():  # fewer DP ranks saved: a DP-independent state is in dp0's
            loader_file = path / "loader" / f"dp{0:05d}.json"
        if loader_file.is_file():
            meta["loader"] = json.loads(loader_file.read_text())
        rank_file = path / "ranks" / f"rank{_rank():05d}.pt"
        if rank_file.is_file() and meta.get("layout") == current_layout():
            _restore_rng(torch.load(rank_file, weights_only=False)["rng"])
    return meta


def current_layout() -> str:
    from megatron.core import parallel_state as ps

    return (f"tp={ps.get_tensor_model_parallel_world_size()} "
            f"pp={ps.get_pipeline_model_parallel_world_size()} "
            f"cp={ps.get_context_parallel_world_size()} dp={ps.get_data_parallel_world_size()}")
