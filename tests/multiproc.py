"""Run a test body in real processes under ``torchrun`` (gloo on CPU) and collect each rank's result.

    results = run_multiproc("tests.foundation.gpt_bodies:one_step", nproc=2, tp=2, init_ckpt=str(p))

The body is ``module:function``; it is called with the keyword arguments (JSON-serialisable) after
the platform layer is set up, and must initialise its own parallel state. Its return value (JSON)
comes back per rank. When any rank fails, the raised error shows every failing rank's traceback
instead of torchrun's generic "ChildFailedError".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_vlm.distributed import free_port
REPO_ROOT = Path(__file__).resolve().parent.parent


class MultiprocFailure(AssertionError):
    pass



def run_multiproc(target: str, nproc: int = 2, timeout: float = 600, env: dict | None = None,
                  **kwargs) -> list:
    with tempfile.TemporaryDirectory(prefix="multiproc-") as tmp:
        kwargs_file = Path(tmp) / "kwargs.json"
        kwargs_file.write_text(json.dumps(kwargs))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--nnodes=1", f"--master_port={free_port()}", "--master_addr=127.0.0.1",
               "-m", "tests._multiproc_entry", target, tmp]
        full_env = dict(os.environ)
        full_env.update({"PYTHONPATH": str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", ""),
                         "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise MultiprocFailure(f"{target} on {nproc} ranks timed out after {timeout}s\n"
                                   f"{(e.stdout or '')[-3000:]}\n{(e.stderr or '')[-3000:]}") from None
        errors = []
        for rank in range(nproc):
            err = Path(tmp) / f"rank{rank}.err"
            if err.exists():
                errors.append(f"--- rank {rank} failed:\n{err.read_text()}")
        if proc.returncode != 0 or errors:
            detail = "\n".join(errors) or f"(no traceback recorded)\n{proc.stderr[-4000:]}"
            raise MultiprocFailure(
                f"{target} failed on {nproc} ranks (exit {proc.returncode}):\n{detail}\n"
                f"--- stdout tail:\n{proc.stdout[-2000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nproc)]
