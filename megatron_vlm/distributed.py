"""Distributed start-up shared by training, tools and tests.

Reads the launcher's environment (torchrun, or Slurm's ``srun`` with one task per GPU), picks the
backend (nccl with CUDA, gloo without), initialises ``torch.distributed`` and megatron's
``parallel_state`` for the requested tensor/pipeline/context sizes, and seeds megatron's
model-parallel RNG.  Parallel sizes are checked against the world size before anything is built so
that a wrong layout fails at start-up with one readable message.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_vlm.platform import setup_platform


class ParallelConfigError(ValueError):
    """The requested parallel layout does not fit the world size or the model."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: Optional[int] = None
    dp: int = 1

    def describe(self) -> str:
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        return f"tp={self.tp} pp={self.pp} cp={self.cp} dp={self.dp}{vpp}"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``node[003-005,9],gpu1`` -> ``node003``."""
    m = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ=None, single_process: bool = False) -> LaunchEnv:
    """Rank and rendezvous from torchrun's variables, else Slurm's, else a single process.

    ``single_process`` ignores the launcher (a one-process tool run inside an sbatch allocation
    must not wait for the allocation's other tasks).
    """
    env = os.environ if environ is None else environ
    if single_process:
        env = {k: v for k, v in env.items() if k == "MASTER_PORT"}
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        # A port derived from the job id lets several jobs share a node without clashing.
        default_port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
        )
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_parallel_sizes(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1,
                         vpp: Optional[int] = None) -> ParallelLayout:
    """Validate the layout and derive the data-parallel size, or raise ParallelConfigError."""
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp)):
        if not isinstance(value, int) or value < 1:
            raise ParallelConfigError(f"{name} must be a positive integer, got {value!r}")
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ParallelConfigError(
            f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2 "
            f"(got {pp})")
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ParallelConfigError(
            f"parallel sizes tp={tp} x pp={pp} x cp={cp} = {model_parallel} do not divide the "
            f"world size {world_size}")
    return ParallelLayout(tp=tp, pp=pp, cp=cp, vpp=vpp, dp=world_size // model_parallel)


def initialize_distributed(tp: int = 1, pp: int = 1, cp: int = 1, vpp: Optional[int] = None,
                           seed: int = 1234, backend: Optional[str] = None,
                           timeout_minutes: int = 30,
                           single_process: bool = False) -> ParallelLayout:
    """Start torch.distributed and megatron's parallel state; returns the layout with its DP size."""
    from megatron.core import parallel_state, tensor_parallel

    cpu = setup_platform()
    launch = read_launch_env(single_process=single_process)
    layout = check_parallel_sizes(launch.world_size, tp, pp, cp, vpp)
    backend = backend or ("gloo" if cpu else "nccl")
    if not cpu:
        torch.cuda.set_device(launch.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- one rank's error stops the whole job -------------------------------------------------------
# A rank that fails records it in the rendezvous store (torchrun's agent store, else rank 0's),
# prints its message if it is the first to fail, and exits at once. Every other rank watches that
# key from a thread and exits quietly: the job stops within about a second, with one message,
# instead of the other ranks hanging in a collective or dying later on "Connection closed by peer".
_FAILED_KEY = "megatron_vlm/failed_rank"
_FAILURES_KEY = "megatron_vlm/failures"
_EXITED_KEY = "megatron_vlm/exited_after_failure"


def _store_client(launch: LaunchEnv, timeout_s: float):
    try:
        return torch.distributed.TCPStore(launch.master_addr, launch.master_port, is_master=False,
                                          timeout=datetime.timedelta(seconds=timeout_s),
                                          wait_for_workers=False)
    except (RuntimeError, OSError):  # no store server (yet, or any more)
        return None


def _store_in_agent() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def watch_for_failures(launch: LaunchEnv, poll_s: float = 0.5):
    """Start a thread that ends this process quietly once another rank has failed.

    Returns a function that stops the thread; call it before a normal exit (a thread left inside
    a store call while the interpreter shuts down can abort the process).
    """
    import threading

    if launch.world_size == 1:
        return lambda: None
    stopped = threading.Event()

    def watch():
        store = None
        while not stopped.wait(poll_s):
            if store is None:
                store = _store_client(launch, timeout_s=2)
                continue
            try:
                failed = store.check([_FAILED_KEY])
            except (RuntimeError, OSError):
                store = None  # the store's host went away: reconnect (or the job is ending)
                continue
            if failed and not stopped.is_set():
                with contextlib.suppress(RuntimeError, OSError):
                    store.add(_EXITED_KEY, 1)
                os._exit(1)  # the failed rank prints why; nothing to add here

    thread = threading.Thread(target=watch, name="failure-watch", daemon=True)
    thread.start()

    def stop():
        stopped.set()
        thread.join(timeout=10)

    return stop


def fail_job(message: str, exit_code: int, launch: LaunchEnv) -> None:
    """Print ``message`` (only if this is the job's first failing rank), stop every rank, exit."""
    import sys
    import time

    first = True
    store = None
    if launch.world_size > 1:
        hosted_here = launch.rank == 0 and not _store_in_agent()
        if _store_in_agent() or torch.distributed.is_initialized():
            store = _store_client(launch, timeout_s=5)
        if store is not None:
            try:
                first = store.add(_FAILURES_KEY, 1) == 1
                store.set(_FAILED_KEY, str(launch.rank))
            except (RuntimeError, OSError):
                pass
        else:
            first = launch.rank == 0  # no store to agree on: the same error on every rank
    if first:
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if store is not None and hosted_here:
        # This process serves the store: keep it up until the others have seen the failure.
        deadline = time.monotonic() + 10
        with contextlib.suppress(RuntimeError, OSError):
            while store.add(_EXITED_KEY, 0) < launch.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
    os._exit(exit_code)  # no teardown: collectives with the other ranks would hang or fail
