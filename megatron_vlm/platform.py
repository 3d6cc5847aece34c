"""Platform layer: lets the real megatron-core run on a machine without CUDA.

megatron-core hard-codes CUDA in many places (``torch.cuda.current_device()``, ``device="cuda"``
literals in the schedules and optimizer, ``'torch.cuda.FloatTensor'`` assertions in grad clipping,
the CUDA RNG tracker).  Instead of forking megatron, :func:`setup_platform` installs, once and only
when CUDA is absent:

* a global :class:`torch.overrides.TorchFunctionMode` that rewrites every ``device`` argument that
  names CUDA (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")`` or a bare integer) to the CPU, makes
  ``Tensor.cuda()`` a no-op, and answers a bare ``Tensor.type()`` with the ``torch.cuda.`` spelling
  that megatron's assertions expect;
* shims for the few ``torch.cuda`` functions megatron calls that fail without a driver
  (``current_device``, ``synchronize``, ``manual_seed``, streams/events, memory queries);
* eager execution of the functions megatron wraps in ``torch.compile``;
* a CPU RNG tracker in place of megatron's ``CudaRNGStatesTracker`` so that
  ``model_parallel_cuda_manual_seed`` and the dropout forks of tensor-parallel layers work;
* the cross entropy's row maximum taken with ``amax`` (see :func:`_install_cpu_fast_paths`).

With CUDA present this module does nothing: the GPU path is megatron's own.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_LOCK = threading.Lock()


def cpu_mode() -> bool:
    """True when the platform layer is active (no usable CUDA, or forced by MEGATRON_VLM_CPU=1)."""
    return _INSTALLED


def _to_cpu_device(device):
    """Map a device spec that names CUDA (or a bare CUDA ordinal) to ``cpu``; leave others alone."""
    if device is None:
        return None
    if isinstance(device, bool):
        return device
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    return device


def _cuda_type_name(tensor: torch.Tensor) -> str:
    name = torch.Tensor.type(tensor)  # e.g. "torch.FloatTensor"
    return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                return _cuda_type_name(args[0])
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], args[1].replace("torch.cuda.", "torch.", 1)) + tuple(args[2:])
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, int, torch.device)):
            if not isinstance(args[1], bool):
                args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous, so every call is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _install_cuda_shims():
    cuda = torch.cuda
    cuda.is_available = lambda: False
    # A string, not 0: torch function modes are not active inside autograd's backward, where
    # megatron's sequence-parallel layers allocate with device=torch.cuda.current_device().
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    # torch.manual_seed itself calls cuda.manual_seed_all, so these must not call back into it.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.current_stream = lambda *a, **k: _CpuStream()
    cuda.default_stream = lambda *a, **k: _CpuStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None


def _install_rng_tracker():
    """Replace megatron's CUDA RNG tracker with one that forks the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Same bookkeeping as megatron's tracker; the states are CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Megatron's own state helpers go through torch.cuda; route them to the CPU generator.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _disable_compilation():
    """megatron wraps small fused functions in torch.compile; on CPU compiling them costs ~30 s
    per process and gains nothing for models this size, so they run eagerly."""
    import torch._dynamo
    from megatron.core import jit

    jit.disable_jit_fuser()  # for megatron modules imported from now on
    torch._dynamo.config.disable = True  # for functions already wrapped


def _logits_max_amax(vocab_parallel_logits: torch.Tensor):
    """megatron's ``VocabParallelCrossEntropy.calculate_logits_max`` with ``amax``: the same
    values (the maximum has one value however many entries tie), without the argmax indices
    ``torch.max(dim)`` also computes and megatron discards."""
    vocab_parallel_logits = vocab_parallel_logits.float()
    return vocab_parallel_logits, torch.amax(vocab_parallel_logits, dim=-1)


def _install_cpu_fast_paths():
    """On CPU ``torch.max(dim)`` with indices costs ~8x ``amax`` (20 vs 2.5 ms for 4K x 4K
    logits, ~2% of the tiny model's 4K training step); the loss is bit for bit the same."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    VocabParallelCrossEntropy.calculate_logits_max = staticmethod(_logits_max_amax)


def setup_platform() -> bool:
    """Make megatron-core usable on this machine. Idempotent; returns True if the CPU layer is on.

    Must run before any megatron model is built. ``MEGATRON_VLM_CPU=1`` forces the CPU layer even
    where CUDA exists (useful to reproduce CI on a GPU box).
    """
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return True
        force = os.environ.get("MEGATRON_VLM_CPU", "0") == "1"
        if torch.cuda.is_available() and not force:
            return False
        _install_cuda_shims()
        _install_rng_tracker()
        _disable_compilation()
        _install_cpu_fast_paths()
        _CudaToCpuMode().__enter__()  # stays active for the life of the process
        _INSTALLED = True
        return True


def device() -> torch.device:
    """The device models and batches should live on."""
    if _INSTALLED or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
