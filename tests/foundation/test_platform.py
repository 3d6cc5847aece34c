import os
import subprocess
import sys

from tests.multiproc import run_multiproc


def test_cuda_calls_map_to_cpu():
    (res,) = run_multiproc("tests.foundation.platform_bodies:device_mapping", nproc=1)
    assert res["active"] is True
    assert res["devices"] == ["cpu"] * 5
    assert res["type_name"] == "torch.cuda.FloatTensor"  # what megatron's grad-clip asserts expect
    assert res["cast"] == "torch.float32"
    assert res["idempotent"] is True


def test_rng_tracker_forks_cpu_generator():
    (res,) = run_multiproc("tests.foundation.platform_bodies:rng_tracker", nproc=1)
    assert res == {"restored": True, "a_equals_b": False, "a_equals_c": True,
                   "default_differs": True}


NO_OP_PROBE = """
import torch
torch.cuda.is_available = lambda: True  # pretend a GPU machine
from megatron_vlm import platform
assert platform.setup_platform() is False and platform.cpu_mode() is False
try:
    torch.zeros(1, device="cuda")  # no mapping: a real CUDA call, which fails on this machine
except (RuntimeError, AssertionError):
    print("untouched")
"""


def test_no_op_when_cuda_present():
    proc = subprocess.run([sys.executable, "-c", NO_OP_PROBE], capture_output=True, text=True,
                          env={**os.environ, "MEGATRON_VLM_CPU": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "untouched"


def test_allocation_inside_backward():
    (grad,) = run_multiproc("tests.foundation.platform_bodies:backward_allocation", nproc=1)
    assert grad == [2.0, 2.0, 2.0]


def test_cross_entropy_row_maximum_with_amax_is_bit_identical():
    (res,) = run_multiproc("tests.foundation.platform_bodies:cross_entropy_amax", nproc=1)
    assert res == {"installed": True, "loss_equal": True, "grad_equal": True}
