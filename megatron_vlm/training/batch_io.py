"""Batches from the loader to the model's device: read once per model-parallel group, broadcast.

    batches = distribute_step_batches(fetched)   # in the loop, before megatron's schedule
    batch = get_batch(data_iterator)             # in a forward step

One rank per model-parallel group (TP x PP) reads and decodes: tensor-parallel rank 0 of the first
pipeline stage, ``is_data_reader()``. Its loader is the only one of the group; the other ranks
fetch None. As megatron's ``broadcast_data``, the reader moves tensors to the device (pinned +
non-blocking on CUDA) and broadcasts them; the others allocate and receive. Two phases, so that no
collective spans pipeline stages while the schedule runs (a stage waiting in a pipeline receive
would never join it):

1. ``distribute_step_batches``, with every rank at the same point before the schedule: a small
   header (shapes, ``max_seqlen``, sample keys) and the text tensors over the model-parallel
   group. Each stage keeps what it uses: ``cu_seqlens`` (and an ``attention_mask``) everywhere,
   ``tokens``/``position_ids`` on the first stage, ``labels``/``loss_mask`` on the last.
2. ``get_batch``, inside the forward step: the vision tensors (``tiles``, ``tiles_per_media`` and
   any other non-text tensor) go from the reader to its tensor-parallel peers on the first stage
   only, so later stages never decode or hold image data; one micro-batch of tiles at a time is
   on the device.

``get_batch`` also takes a plain loader batch (tests, tools, a lone rank): it is moved as is. It
is the one place where batches change device.
"""

from __future__ import annotations

import os
import time
from typing import Iterator, Optional

import torch

from megatron_vlm.platform import device

# Tensors and where they are used.
TEXT_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "attention_mask")
EVERY_STAGE_KEYS = ("cu_seqlens", "attention_mask")


class DataWaitClock:
    """Seconds the training thread spent waiting for data (loader reads and broadcasts)."""

    def __init__(self):
        self.seconds = 0.0

    def take(self) -> float:
        value, self.seconds = self.seconds, 0.0
        return value


DATA_WAIT = DataWaitClock()

# Every rank reads its own copy and nothing is broadcast: the behaviour before this module, kept
# to check that broadcasting changes nothing (tests/cluster) and to rule it out when debugging.
READ_ON_EVERY_RANK_ENV = "MEGATRON_VLM_DATA_ON_EVERY_RANK"


def _read_on_every_rank() -> bool:
    return os.environ.get(READ_ON_EVERY_RANK_ENV, "0") == "1"


def _mp_state():
    """(group, src global rank, group size) of the model-parallel group; None when not initialised."""
    from megatron.core import parallel_state as ps

    if _read_on_every_rank() or not (torch.distributed.is_initialized()
                                      and ps.model_parallel_is_initialized()):
        return None
    group = ps.get_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return None
    return group, torch.distributed.get_global_rank(group, 0), torch.distributed.get_world_size(group)


def is_data_reader() -> bool:
    """True on the rank that reads this model-parallel group's data (TP rank 0, first stage)."""
    from megatron.core import parallel_state as ps

    if _read_on_every_rank() or not ps.model_parallel_is_initialized():
        return True
    return (ps.get_tensor_model_parallel_rank() == 0
            and ps.get_pipeline_model_parallel_rank() == 0)


def to_device(batch: dict, dev: Optional[torch.device] = None) -> dict:
    """Every tensor of ``batch`` on ``dev`` (default: the platform device); other values as they are.

    On CUDA the host tensors are pinned first so the copy is asynchronous (the stream orders it
    before the first kernel that reads it).
    """
    dev = device() if dev is None else dev
    cuda = dev.type == "cuda"
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device != dev:
            if cuda and value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(dev, non_blocking=cuda)
        out[key] = value
    return out


def _with_max_seqlen(batch: dict) -> dict:
    """The longest packed segment, computed on the host when the batch does not carry it."""
    cu = batch.get("cu_seqlens")
    if cu is None or "max_seqlen" in batch:
        return batch
    lengths = (cu[1:] - cu[:-1]) if cu.numel() > 1 else cu.new_zeros(1)
    return {**batch, "max_seqlen": int(lengths.max())}


def _broadcast(t: Optional[torch.Tensor], shape, dtype, dev, src: int, group) -> torch.Tensor:
    wire = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool broadcast
    t = t.to(wire) if t is not None else torch.empty(shape, dtype=wire, device=dev)
    torch.distributed.broadcast(t, src=src, group=group)
    return t.to(dtype)


_PREPARED = "_distributed"  # marks a batch made by distribute_step_batches
_VISION = "_vision_tensors"  # {key: (shape, dtype)} of the tensors get_batch broadcasts


def _distribute(batch: Optional[dict]) -> dict:
    from megatron.core import parallel_state as ps

    if batch is not None:
        batch = _with_max_seqlen(batch)
    state = _mp_state()
    if state is None:  # alone in the group: get_batch moves everything
        if batch is None:
            raise RuntimeError("this rank reads no data but is alone in its model-parallel group")
        return {**batch, _PREPARED: True}
    group, src, _ = state
    dev = device()
    reader = torch.distributed.get_rank() == src
    header = [None]
    if reader:
        header[0] = {
            "tensors": {k: (tuple(v.shape), v.dtype) for k, v in batch.items()
                        if isinstance(v, torch.Tensor)},
            "values": {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)},
        }
    # A pickled dict of shapes and small values, once per micro-batch.
    torch.distributed.broadcast_object_list(header, src=src, group=group,
                                            device=dev if dev.type == "cuda" else None)
    header = header[0]
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    out = {**header["values"], _PREPARED: True, _VISION: {}}
    for key, (shape, dtype) in header["tensors"].items():
        if key not in TEXT_KEYS:
            if first:  # sent inside the forward step, within the tensor-parallel group
                out[_VISION][key] = (shape, dtype)
                if reader:
                    out[key] = batch[key]
            continue
        t = _broadcast(to_device({key: batch[key]}, dev)[key] if reader else None, shape, dtype,
                       dev, src, group)
        if (key in EVERY_STAGE_KEYS or (first and key in ("tokens", "position_ids"))
                or (last and key in ("labels", "loss_mask"))):
            out[key] = t
    return out


def distribute_step_batches(batches: list) -> list:
    """Phase 1 (module docstring) for one step's micro-batches: the reader passes the loader's
    batches, the other ranks as many Nones. Every rank of the world calls it at the same point."""
    return [_distribute(b) for b in batches]


def get_batch(data_iterator: Optional[Iterator]) -> dict:
    """Next micro-batch for this rank's forward step, on the device (see the module docstring)."""
    from megatron.core import parallel_state as ps

    t0 = time.perf_counter()
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:
        raise RuntimeError("get_batch got no batch: the loop passes distribute_step_batches' "
                           "output to the schedule")
    batch = dict(batch)
    prepared, vision = batch.pop(_PREPARED, False), batch.pop(_VISION, {})
    if not prepared:
        batch = _with_max_seqlen(batch)
    dev = device()
    if vision and ps.get_tensor_model_parallel_world_size() > 1:
        src, group = ps.get_tensor_model_parallel_src_rank(), ps.get_tensor_model_parallel_group()
        reader = torch.distributed.get_rank() == src
        for key, (shape, dtype) in vision.items():
            local = to_device({key: batch[key]}, dev)[key] if reader else None
            batch[key] = _broadcast(local, shape, dtype, dev, src, group)
    out = to_device(batch, dev)
    DATA_WAIT.seconds += time.perf_counter() - t0
    return out
