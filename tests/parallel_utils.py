"""Shared pieces of the parallel-layout tests: dist_checkpointing in and out of a model (run inside
torchrun bodies), the single-process reference run and the per-layout comparison with it.

The pattern: the single-process reference saves the initial weights (``init``) and, after one
training step, the updated ones (``after``); every other layout starts from ``init`` and compares
its updated weights with ``after``, so differences come from the layout alone.
"""

from __future__ import annotations

import os
from typing import Callable

from tests.multiproc import run_multiproc


def save_checkpoint(model, ckpt_dir: str) -> None:
    """The model's sharded state (any layout) as a megatron dist checkpoint in ``ckpt_dir``."""
    from megatron.core import dist_checkpointing

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)


def load_checkpoint(model, ckpt_dir: str) -> None:
    """Load a dist checkpoint written at any layout into ``model`` (resharding as needed)."""
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))


def save_or_load(model, ckpt_dir: str, save: bool) -> None:
    (save_checkpoint if save else load_checkpoint)(model, ckpt_dir)


def save_or_compare(model, ckpt_dir: str, save: bool, build_reference: Callable) -> dict:
    """Save the model's weights (``save``), else compare them with the checkpoint's, loaded into
    a fresh ``build_reference()``: ``{"max_param_diff", "worst_param"}`` over this rank's params."""
    if save:
        save_checkpoint(model, ckpt_dir)
        return {}
    reference = build_reference()
    load_checkpoint(reference, ckpt_dir)
    ref_params = dict(reference.named_parameters())
    diffs = {n: (p.detach() - ref_params[n].detach()).abs().max().item()
             for n, p in model.named_parameters()}
    return {"max_param_diff": max(diffs.values()), "worst_param": max(diffs, key=diffs.get)}


def single_process_reference(tmp_path_factory, body: str, name: str, **kwargs):
    """Run ``body`` on one process, writing the ``init`` and ``after`` checkpoints under a fresh
    folder ``name``; returns ``(result, init, after)`` for the layouts to start from and compare."""
    root = tmp_path_factory.mktemp(name)
    init, after = str(root / "init"), str(root / "after")
    (ref,) = run_multiproc(body, nproc=1, init_ckpt=init, save_init=True, after_ckpt=after,
                           save_after=True, **kwargs)
    return ref, init, after


def assert_step_matches(rank: int, res: dict, ref: dict, tol: float,
                        grad_norm_floor: float = 1.0) -> None:
    """One rank's training step against the reference: loss, gradient norm (tolerance relative to
    ``max(grad_norm_floor, reference norm)``) and the largest updated-parameter difference."""
    assert abs(res["loss"] - ref["loss"]) <= tol, (rank, res["loss"], ref["loss"])
    grad_tol = tol * max(grad_norm_floor, ref["grad_norm"])
    assert abs(res["grad_norm"] - ref["grad_norm"]) <= grad_tol, (
        rank, res["grad_norm"], ref["grad_norm"])
    assert res["max_param_diff"] <= tol, (rank, res["max_param_diff"], res["worst_param"])
