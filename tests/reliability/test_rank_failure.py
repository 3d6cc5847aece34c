"""An error on one rank stops the whole job promptly, with that rank's message printed once."""

import os
import subprocess
import sys
import time

from megatron_vlm.distributed import free_port
from tests.reliability.test_checkpoint_damage import TEXT_DATA
from tests.training.conftest import REPO


def test_one_rank_raising_stops_the_job_with_its_message_once(workdir):
    stamp = workdir / "failed_at"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(free_port()), "-m", "tests.reliability.fault_entry", "--recipe",
           "recipes/tiny/base.yaml", "train.steps=6", "schedule.warmup_steps=0",
           "checkpoint.dir=runs/fail", *TEXT_DATA]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               FAIL_RANK="1", FAIL_AT_STEP="2", FAIL_STAMP=str(stamp))
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert ended - float(stamp.read_text()) < 60, out[-3000:]
    assert out.count("ValueError: injected by the test: rank 1 at step 2") == 1, out[-3000:]
    assert "[rank 1] failed:" in proc.stderr
    assert "[rank 0] failed" not in out, out[-3000:]  # rank 0 stopped quietly
    for transport in ("Connection closed by peer", "Connection reset", "DistBackendError", "gloo"):
        assert transport not in out, (transport, out[-3000:])
