"""What a run says about itself: logging set-up, the start-up banner, per-interval metrics.

    configure_logging(rank)                     # once per process, before anything logs
    report = RunReport(recipe, model_chunks, layout, pad_id)
    report.write_banner(run_dir)                # console (rank 0) + run_dir/resolved_recipe.yaml
    metrics = report.step_metrics(step, batches, step_seconds, data_wait_seconds, loader)

Parameter counts are global: tensor-parallel shards are summed over the tensor-parallel group,
replicated parameters counted once, pipeline stages summed. The memory estimate is deliberately
simple (weights, gradients, Adam state, a per-layer activation term); megatron_vlm/cli/plan.py is the planner.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml

from megatron_vlm.platform import device

log = logging.getLogger("megatron_vlm")

_CONFIGURED = False

# Peak dense bf16 throughput per GPU (FLOP/s) for the MFU estimate; override with
# MEGATRON_VLM_PEAK_TFLOPS (e.g. on CPU, where there is no meaningful default).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12,
                   "B200": 2250e12, "GB200": 2500e12, "L40S": 362e12}


def configure_logging(rank: int, level: int = logging.INFO) -> None:
    """One handler with a ``[rank N]`` prefix. Our loggers (``megatron_vlm.*``) log INFO on rank
    0; everything else, and every other rank, WARNING and up.

    Python warnings go through logging (``py.warnings``): user-facing categories (UserWarning,
    FutureWarning) once per distinct message per process, and only rank 0 shows them, so N ranks
    do not repeat one warning N times. Nothing is silenced wholesale (Python's default filters
    for DeprecationWarning and the like stay as they are).
    """
    global _CONFIGURED
    if _CONFIGURED:
        return
    _CONFIGURED = True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("megatron_vlm").setLevel(level if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)
    for category in (UserWarning, FutureWarning):
        warnings.filterwarnings("once", category=category)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def parameter_counts(model_chunks: list) -> dict:
    """{part: {"total": n, "trainable": n}} over the whole model (all ranks of a model replica)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    from megatron_vlm.models.vlm import PART_ATTRIBUTES

    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    parts = list(PART_ATTRIBUTES)
    counts = torch.zeros(len(parts), 2, dtype=torch.float64)
    for chunk in model_chunks:
        model = unwrap_model(chunk)
        for i, part in enumerate(parts):
            module = getattr(model, PART_ATTRIBUTES[part], None)
            if module is None:
                continue
            for p in module.parameters():
                # Replicated over TP (norms, biases of row-parallel layers): count on TP rank 0.
                if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
                    continue
                counts[i, 0] += p.numel()
                if p.requires_grad:
                    counts[i, 1] += p.numel()
    if torch.distributed.is_initialized() and ps.model_parallel_is_initialized():
        counts = counts.to(device())
        torch.distributed.all_reduce(counts, group=ps.get_model_parallel_group())
        counts = counts.cpu()
    return {part: {"total": int(counts[i, 0]), "trainable": int(counts[i, 1])}
            for i, part in enumerate(parts)}


def estimate_memory_gib(recipe, counts: dict, llm_cfg: dict, layout) -> dict:
    """Rough per-rank memory (GiB): weights, gradients, optimizer state, activations.

    Assumes an even split of the parameters over TP x PP; Adam keeps fp32 main weights (mixed
    precision) and two fp32 moments, sharded over data parallelism with the distributed optimizer;
    activations per layer ~(34 + 5 a s / h) bytes x seq x micro-batch x hidden / TP
    (Korthikanti et al.; the attention-score term only for no recompute), one layer input with
    full recompute. An upper bound for Mamba layers, which keep no s x s scores.
    """
    mp = layout.tp * layout.pp
    total = sum(c["total"] for c in counts.values()) / mp
    trainable = sum(c["trainable"] for c in counts.values()) / mp
    width = 4 if recipe.train.precision == "fp32" else 2
    weights = total * width
    grads = trainable * 4  # megatron's DDP keeps fp32 main grads
    adam = trainable * (8 + (4 if width == 2 else 0))
    if recipe.optimizer.distributed:
        adam /= layout.dp
    layers = (len(llm_cfg.get("hybrid_override_pattern") or "") or llm_cfg.get("num_layers", 0)) \
        / layout.pp
    per_layer = recipe.data.seq_length * recipe.train.micro_batch_size * llm_cfg.get("hidden_size", 0)
    mode = getattr(getattr(recipe, "recompute", None), "mode", "none")
    heads = llm_cfg.get("num_attention_heads", 1) or 1
    hidden = max(llm_cfg.get("hidden_size", 1), 1)
    act_bytes = {"full": float(width), "selective": 34.0}.get(
        mode, 34.0 + 5.0 * heads * recipe.data.seq_length / hidden)
    # 1F1B keeps up to PP micro-batches in flight on the first stage
    activations = layers * per_layer * act_bytes / layout.tp * layout.pp
    gib = 1024 ** 3
    out = {"weights": weights / gib, "grads": grads / gib, "optimizer": adam / gib,
           "activations": activations / gib}
    out["total"] = sum(out.values())
    return out


def _peak_flops() -> Optional[float]:
    env = os.environ.get("MEGATRON_VLM_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device().type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def peak_memory_gib() -> float:
    """CUDA max allocated on a GPU, else the process's peak resident set size."""
    if device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024 ** 3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


class RunReport:
    def __init__(self, recipe, model_chunks: list, layout, pad_id: int):
        self.recipe, self.layout, self.pad_id = recipe, layout, pad_id
        self.counts = parameter_counts(model_chunks)
        self.total_params = sum(c["total"] for c in self.counts.values())
        self.peak_flops = _peak_flops()
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self._interval = {"seconds": 0.0, "wait": 0.0, "tokens": 0, "steps": 0}

    # ---- banner -----------------------------------------------------------------------------
    def banner_lines(self, llm_cfg: dict) -> list:
        lines = [f"run {self.recipe.name}: world {self.world} ranks, layout "
                 f"{self.layout.describe()}, precision {self.recipe.train.precision}"]
        for part, c in self.counts.items():
            lines.append(f"  {part:<10} {c['total']:>15,} parameters, {c['trainable']:>15,} "
                         "trainable")
        trainable = sum(c["trainable"] for c in self.counts.values())
        lines.append(f"  {'total':<10} {self.total_params:>15,} parameters, {trainable:>15,} "
                     "trainable")
        mem = estimate_memory_gib(self.recipe, self.counts, llm_cfg, self.layout)
        lines.append("  estimated memory per rank: " + ", ".join(
            f"{k} {v:.2f} GiB" for k, v in mem.items()))
        return lines

    def write_banner(self, run_dir: Path, llm_cfg: Optional[dict] = None) -> None:
        """Banner on the console (rank 0) and ``run_dir/resolved_recipe.yaml``."""
        if llm_cfg is None:
            from megatron_vlm.models.vlm import load_vlm_config

            llm_cfg = load_vlm_config(self.recipe.model.config)["language_model"]
        if not _is_rank0():
            return
        resolved = dataclasses.asdict(self.recipe)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "resolved_recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        text = "\n".join(self.banner_lines(llm_cfg))
        text += "\n  resolved recipe (also in resolved_recipe.yaml):\n    " + \
            yaml.safe_dump(resolved, sort_keys=False).rstrip().replace("\n", "\n    ")
        print(text, flush=True)

    # ---- per step / interval ----------------------------------------------------------------
    def real_tokens(self, batches: list) -> int:
        """Non-padding tokens of the micro-batches this rank read (0 on non-reader ranks)."""
        return sum(int((b["tokens"] != self.pad_id).sum()) for b in batches if b is not None)

    def step_metrics(self, step: int, batches: list, step_seconds: float, wait_seconds: float,
                     loader) -> dict:
        """Accumulates every step; at a logging interval (and the last step) returns the
        interval's metrics, summed over the world where they are per-rank, else {}."""
        acc = self._interval
        acc["seconds"] += step_seconds
        acc["wait"] += wait_seconds
        acc["tokens"] += self.real_tokens(batches)
        acc["steps"] += 1
        if step % self.recipe.logging.interval and step != self.recipe.train.steps:
            return {}
        from megatron_vlm.data.loader import COUNTER_NAMES

        counters = (loader.counters["total"] if loader is not None
                    else dict.fromkeys(COUNTER_NAMES, 0))
        values = torch.tensor([acc["tokens"], *[counters[k] for k in COUNTER_NAMES]],
                              dtype=torch.float64, device=device())
        wait = torch.tensor([acc["wait"]], dtype=torch.float64, device=device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)  # readers hold the counts, the others zeros
            torch.distributed.all_reduce(wait, op=torch.distributed.ReduceOp.MAX)
        values = values.cpu().tolist()
        steps, seconds = acc["steps"], max(acc["seconds"], 1e-9)
        tokens_per_s = values[0] / seconds
        out = {"step_time_s": seconds / steps, "data_wait_s": float(wait.item()) / steps,
               "tokens_per_s": tokens_per_s, "peak_memory_gib": peak_memory_gib()}
        if self.peak_flops:
            # ~6 FLOPs per parameter per token (forward + backward), over every GPU of the world
            out["mfu"] = 6.0 * self.total_params * tokens_per_s / (self.peak_flops * self.world)
        out["loader"] = {k: int(v) for k, v in zip(COUNTER_NAMES, values[1:])}
        self._interval = {"seconds": 0.0, "wait": 0.0, "tokens": 0, "steps": 0}
        return out
