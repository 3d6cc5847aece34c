import torch

from megatron_vlm import platform
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


def test_no_op_when_cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MEGATRON_VLM_CPU", raising=False)
    if not platform.cpu_mode():
        assert platform.setup_platform() is False
        assert platform.cpu_mode() is False
        assert torch.zeros(1, device="meta").device.type == "meta"


def test_allocation_inside_backward():
    (grad,) = run_multiproc("tests.foundation.platform_bodies:backward_allocation", nproc=1)
    assert grad == [2.0, 2.0, 2.0]
