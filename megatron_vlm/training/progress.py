"""Console progress (step, loss, LR, grad norm, tokens/s, ETA) and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Optional

import torch


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


class Progress:
    def __init__(self, name: str, total_steps: int, start_step: int, tokens_per_step: int,
                 tensorboard_dir: Optional[Path] = None, interval: int = 1,
                 log_file: Optional[Path] = None):
        self.name, self.total, self.interval = name, total_steps, interval
        self.tokens_per_step = tokens_per_step
        self.start_step, self.t0 = start_step, time.monotonic()
        self.writer = None
        self.log_file = None
        if log_file is not None and _is_rank0():
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(log_file, "a")
        if tensorboard_dir is not None and _is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def restart_clock(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        if _is_rank0():
            print(f"[{self.name}] {text}", flush=True)

    def train_step(self, step: int, loss: float, lr: float, grad_norm: float,
                   metrics: Optional[dict] = None) -> None:
        """``step`` counts finished steps (1-based). ``metrics``: the logging interval's
        measurements (run_report.RunReport.step_metrics), given at interval ends."""
        metrics = metrics or {}
        done = step - self.start_step
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        tokens_per_s = metrics.get("tokens_per_s", done * self.tokens_per_step / elapsed)
        if self.log_file is not None:  # machine-readable history (appended across resumes)
            self.log_file.write(json.dumps({"step": step, "loss": loss, "lr": lr,
                                            "grad_norm": grad_norm, **metrics}) + "\n")
            self.log_file.flush()
        if self.writer is not None:
            scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                       "train/tokens_per_s": tokens_per_s}
            for key, value in metrics.items():
                if isinstance(value, dict):
                    scalars.update({f"loader/{k}": v for k, v in value.items()})
                elif key != "tokens_per_s":
                    scalars[f"perf/{key}"] = value
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if step % self.interval == 0 or step == self.total:
            eta = datetime.timedelta(seconds=int(elapsed / max(done, 1) * (self.total - step)))
            line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | "
                    f"grad {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | ETA {eta}")
            if metrics:
                line += (f" | step {metrics['step_time_s']:.2f}s, data wait "
                         f"{metrics['data_wait_s']:.3f}s | peak mem "
                         f"{metrics['peak_memory_gib']:.2f} GiB")
                if "mfu" in metrics:
                    line += f" | MFU {100 * metrics['mfu']:.1f}%"
                counts = metrics.get("loader", {})
                skipped = {k: v for k, v in counts.items()
                           if v and k not in ("samples_read", "samples_used")}
                line += (f" | samples read {counts.get('samples_read', 0)}, used "
                         f"{counts.get('samples_used', 0)}"
                         + ("".join(f", {k} {v}" for k, v in skipped.items())))
            self.say(line)

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        if values:
            self.say(f"{prefix} @ step {step}: " +
                     ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
