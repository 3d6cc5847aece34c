"""Golden-loss cases: the tiny recipes for a few steps at a fixed seed, as Megatron-LM's functional
tests do. ``tests/golden/<case>.json`` holds the losses and grad norms of the reference build;
``python -m tests.golden.update`` (``make golden``) regenerates them after an intended change.

Runs use one process and one thread so that they are bit-reproducible: on the reference build
(the torch version, CPU architecture and Python recorded in the file) values must match exactly,
elsewhere within ``TOLERANCE`` (relative), as BLAS kernels and reduction orders may differ.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent
REPO = GOLDEN_DIR.parents[1]
TOLERANCE = 1e-4  # relative, off the reference build
DEMO_SCALE = "0.05"  # the demo corpus the values were made with (megatron_vlm.data_prep.make_demo_data)

COMMON = ["train.steps=3", "schedule.warmup_steps=1", "checkpoint.interval=0",
          "logging.interval=1", "logging.tensorboard=false", "eval.batches=1", "parallel.tp=1"]
CASES = {
    # The LLM pretraining recipe: text and code, vision frozen.
    "tiny_base": ("base", ["train.global_batch_size=4"]),
    # A VLM stage from scratch (no init_from): images through RADIO, the connector and the LLM.
    "tiny_stage1": ("stage1", ["checkpoint.init_from=null", "train.global_batch_size=4"]),
}


def build_info() -> dict:
    import torch

    return {"torch": torch.__version__, "machine": platform.machine(),
            "python": platform.python_version()}


def run_case(case: str, workdir: Path, extra: tuple = ()) -> list[dict]:
    """Train ``case`` in ``workdir`` (recipes/ and demo_data/ resolve there); per-step records."""
    recipe, overrides = CASES[case]
    run_dir = workdir / "runs" / "golden" / case
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "megatron_vlm.train", "--recipe", f"recipes/tiny/{recipe}.yaml",
           *COMMON, *overrides, f"checkpoint.dir={run_dir}", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"golden case {case} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records[rec["step"]] = {"step": rec["step"], "loss": rec["loss"],
                                "grad_norm": rec["grad_norm"]}
    return [records[s] for s in sorted(records)]


def load_golden(case: str) -> dict:
    return json.loads((GOLDEN_DIR / f"{case}.json").read_text())


def mismatches(golden: dict, measured: list[dict]) -> list[str]:
    """Differences between stored and measured values (empty: they agree)."""
    exact = golden.get("build") == build_info()
    rtol = 0.0 if exact else TOLERANCE
    expected = golden["steps"]
    if [r["step"] for r in measured] != [r["step"] for r in expected]:
        return [f"steps {[r['step'] for r in measured]} != {[r['step'] for r in expected]}"]
    out = []
    for want, got in zip(expected, measured):
        for key in ("loss", "grad_norm"):
            a, b = want[key], got[key]
            if not (a == b or (math.isfinite(a) and math.isfinite(b)
                               and abs(a - b) <= rtol * max(abs(a), abs(b)))):
                out.append(f"step {want['step']} {key}: golden {a!r}, measured {b!r}"
                           f" ({'exact' if exact else f'rtol {rtol}'})")
    return out
