"""Context parallelism: peak memory per rank and step time at CP=1 vs CP=2 (2 processes).

The tiny hybrid LLM trains on one packed row of ``--length`` tokens (3 samples of uneven lengths).
CP=1 runs it on both processes as two data-parallel ranks (each holds the whole row), CP=2 splits
the row over the two (each holds half) -- the same cores doing half the CP=1 work. Each layout is
a fresh ``torchrun``, so the peak resident memory (``ru_maxrss``) is that layout's own; "growth"
is the peak minus the memory after the model and optimizer were built, i.e. mostly activations.

    python -m bench.bench_cp --out results.md [--length 8192] [--steps 3]
"""

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(cp: int, length: int, steps: int) -> dict:
    """Body run under torchrun: train ``steps`` steps, return time and memory of this rank."""
    import torch

    from megatron_vlm.distributed import initialize_distributed
    from megatron_vlm.models.llm import build_hybrid_llm
    from megatron_vlm.training.optim import build_optimizer, wrap_with_ddp
    from megatron_vlm.training.recipe import OptimizerSection
    from megatron_vlm.training.step import packed_lm_forward_step, train_step
    from tests.cp.bodies import packed_text_batch

    initialize_distributed(cp=cp, seed=1234)
    model = build_hybrid_llm("nemotron_h_tiny", impl="local", params_dtype=torch.float32,
                             use_cpu_initialization=True)
    ddp = wrap_with_ddp([model], distributed_optimizer=False)
    optimizer = build_optimizer(ddp, OptimizerSection(lr=1e-4, distributed=False))
    unit = 2 * cp
    first, second = (length * 5 // 8) // unit * unit, (length // 4) // unit * unit
    batch = packed_text_batch([first, second, length - first - second])
    base = _rss_mib()
    times, losses = [], []
    for _ in range(steps + 1):  # the first step (allocator, first-use costs) is not timed
        t0 = time.perf_counter()
        out = train_step(ddp, optimizer, iter([batch]), num_microbatches=1, seq_length=length,
                         micro_batch_size=1, forward_step_func=packed_lm_forward_step)
        times.append(time.perf_counter() - t0)
        losses.append(out["loss"])
    peak = _rss_mib()
    return {"step_s": statistics.median(times[1:]), "peak_mib": peak, "growth_mib": peak - base,
            "first_loss": losses[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from tests.multiproc import run_multiproc

    rows = []
    for cp in (1, 2):
        res = run_multiproc("bench.bench_cp:measure", nproc=2, timeout=3600, cp=cp,
                            length=args.length, steps=args.steps)
        rows.append((cp, max(r["peak_mib"] for r in res), max(r["growth_mib"] for r in res),
                     max(r["step_s"] for r in res), res[0]["first_loss"]))
        print(f"cp={cp}: peak {rows[-1][1]:.0f} MiB/rank, growth {rows[-1][2]:.0f} MiB, "
              f"step {rows[-1][3]:.2f} s, first loss {rows[-1][4]:.5f}", flush=True)
    lines = [f"## Context parallelism (tiny hybrid LLM, one packed row of {args.length} tokens, "
             "2 processes)\n",
             "| layout | tokens per rank | peak RSS per rank (MiB) | growth during steps (MiB) "
             "| step time (s) | first loss |",
             "|---|---|---|---|---|---|"]
    for cp, peak, growth, step, loss in rows:
        layout = "CP=1 (DP=2)" if cp == 1 else "CP=2"
        lines.append(f"| {layout} | {args.length // cp} | {peak:.0f} | {growth:.0f} | {step:.2f} "
                     f"| {loss:.5f} |")
    lines.append("\nSame row, same weights: the first losses agree (per-token loss); growth is "
                 "the activation memory a rank needs, which CP divides. At CP=1 both processes "
                 "compute the whole row (as two data-parallel ranks) on the same cores, so its "
                 "step time is that of twice the work; CP=2 shares one row.")
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
