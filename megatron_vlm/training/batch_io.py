"""Batches from the loader to the model's device: read once per model-parallel group, broadcast.

    batch = get_batch(data_iterator)        # in a forward step; every rank of the group calls it

One rank per model-parallel group (TP x PP) reads and decodes: tensor-parallel rank 0 of the first
pipeline stage, ``is_data_reader()``. Its loader is the only one of the group; the other ranks'
iterators yield None. As megatron's ``broadcast_data``, the reader moves the batch to the device
(pinned + non-blocking on CUDA) and broadcasts it; the others allocate and receive. What each
rank receives is what its stage uses:

* every stage: ``cu_seqlens`` (packed samples reach every mixer) and the header values;
* first stage: ``tokens`` and ``tiles`` (with any other vision-side tensor; only its
  tensor-parallel group takes part in their broadcast, so later stages never hold image data);
* last stage: ``labels`` and ``loss_mask``.

``tokens``/``labels``/``loss_mask``/``position_ids`` are small and go to the whole group in one
broadcast each. All of it is the one place where batches change device.
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


def _stage_needs() -> tuple[bool, bool]:
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_first_stage(ignore_virtual=True),
            ps.is_pipeline_last_stage(ignore_virtual=True))


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


def broadcast_batch(batch: Optional[dict]) -> dict:
    """The reader's ``batch`` on every rank of its model-parallel group, on the device.

    ``batch`` is read on the reader only (None elsewhere). Stages get the keys they use (module
    docstring): the text tensors (``TEXT_KEYS``) travel over the model-parallel group; every other
    tensor (``tiles``, ``tiles_per_media``, ...: the vision side) only to the first stage's
    tensor-parallel group; non-tensor values (``max_seqlen``, ``sample_keys``) in the header.
    """
    from megatron.core import parallel_state as ps

    state = _mp_state()
    dev = device()
    if batch is not None:
        batch = _with_max_seqlen(batch)
    if state is None:
        return to_device(batch, dev)
    group, src, _ = state
    reader = torch.distributed.get_rank() == src
    header = [None]
    if reader:
        batch = to_device(batch, dev)
        header[0] = {
            "tensors": {k: (tuple(v.shape), v.dtype) for k, v in batch.items()
                        if isinstance(v, torch.Tensor)},
            "values": {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)},
        }
    # A pickled dict of shapes and small values, once per micro-batch.
    torch.distributed.broadcast_object_list(header, src=src, group=group,
                                            device=dev if dev.type == "cuda" else None)
    header = header[0]
    first, last = _stage_needs()
    out = dict(header["values"])
    for key in TEXT_KEYS:
        if key in header["tensors"]:
            t = _broadcast(batch[key] if reader else None, *header["tensors"][key], dev, src, group)
            if (key in EVERY_STAGE_KEYS or (first and key in ("tokens", "position_ids"))
                    or (last and key in ("labels", "loss_mask"))):
                out[key] = t
    if first:  # the reader is on the first stage: only its tensor-parallel peers take part
        tp_group, tp_src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
        for key, (shape, dtype) in header["tensors"].items():
            if key in TEXT_KEYS:
                continue
            if ps.get_tensor_model_parallel_world_size() > 1:
                out[key] = _broadcast(batch[key] if reader else None, shape, dtype, dev, tp_src,
                                      tp_group)
            else:
                out[key] = batch[key]
    return out


def get_batch(data_iterator: Optional[Iterator]) -> dict:
    """Next micro-batch for this rank's forward step, on the device (see the module docstring)."""
    t0 = time.perf_counter()
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None and _mp_state() is None:
        raise RuntimeError("this rank reads no data but is alone in its model-parallel group")
    out = broadcast_batch(batch)
    DATA_WAIT.seconds += time.perf_counter() - t0
    return out
