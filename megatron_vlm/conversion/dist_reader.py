"""Read a megatron ``dist_checkpointing`` (torch_dist) checkpoint tensor by tensor, without
building the model, whatever TP/PP layout wrote it.

The checkpoint's global tensors (PyTorch DCP metadata) already are the unsharded ones: a TP=2
checkpoint's shards are gathered by DCP when one asks for the whole tensor. Three naming
differences to our model's full (TP=1) ``state_dict`` keys are undone here:

* split factories: the Mamba mixer stores ``in_proj.weight`` as ``.z .x .B .C .dt`` row blocks and
  ``conv1d.{weight,bias}`` as ``.x .B .C`` (``models/mamba_mixer.py``); they are concatenated;
* stacked layers: megatron's ``TransformerBlock`` (the vision tower) stores
  ``decoder.layers.<param>`` as one [L, ...] tensor; layer i is row i (the last stacked tensor read
  is kept, so reading a parameter over all layers in a row loads it once);
* ``_extra_state`` (bytes) and optimizer entries are not model weights and are skipped.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, Tuple

import torch

MODEL_PREFIXES = ("language_model.", "vision_model.", "vision_projection.")
_SPLITS = {"in_proj.weight": ("z", "x", "B", "C", "dt"), "conv1d.weight": ("x", "B", "C"),
           "conv1d.bias": ("x", "B", "C")}
_STACKED = re.compile(r"^(.*\.layers)\.(\D.*)$")


class DistCheckpointReader:
    """``keys()`` / ``shape(key)`` / ``read(key)`` over our full state-dict names."""

    def __init__(self, path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise FileNotFoundError(f"{self.path}: not a torch_dist checkpoint (no .metadata)")
        self._reader = FileSystemReader(str(self.path))
        raw = self._reader.read_metadata().state_dict_metadata
        self._meta = {k: (v.size, v.properties.dtype) for k, v in raw.items()
                      if isinstance(v, TensorStorageMetadata) and k.startswith(MODEL_PREFIXES)}
        self._index: Dict[str, Tuple[str, object]] = {}  # our key -> (how, detail)
        self._shapes: Dict[str, Tuple[torch.Size, torch.dtype]] = {}
        for key, (size, dtype) in self._meta.items():
            split = next((s for s in _SPLITS if key.rsplit(".", 1)[0].endswith(s)
                          and key.rsplit(".", 1)[1] in _SPLITS[s]), None)
            stacked = _STACKED.match(key)
            if split is not None:
                ours = key.rsplit(".", 1)[0]
                if ours not in self._index:
                    parts = [f"{ours}.{p}" for p in _SPLITS[split]]
                    rows = sum(self._meta[p][0][0] for p in parts)
                    self._index[ours] = ("cat", parts)
                    self._shapes[ours] = (torch.Size([rows, *size[1:]]), dtype)
            elif stacked is not None:
                for i in range(size[0]):
                    ours = f"{stacked.group(1)}.{i}.{stacked.group(2)}"
                    self._index[ours] = ("row", (key, i))
                    self._shapes[ours] = (torch.Size(size[1:]), dtype)
            else:
                self._index[key] = ("whole", key)
                self._shapes[key] = (size, dtype)
        self._cached: Tuple[str, torch.Tensor] = ("", None)

    def keys(self):
        return list(self._index)

    def shapes(self) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
        return dict(self._shapes)

    def _load(self, key: str) -> torch.Tensor:
        from torch.distributed.checkpoint import load

        size, dtype = self._meta[key]
        t = torch.empty(size, dtype=dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single "
                                    "process")
            load({key: t}, storage_reader=self._reader, no_dist=True)
        return t

    def read(self, ours: str) -> torch.Tensor:
        if ours not in self._index:
            raise KeyError(f"{self.path}: no tensor {ours!r} in the checkpoint")
        how, detail = self._index[ours]
        if how == "whole":
            return self._load(detail)
        if how == "cat":
            return torch.cat([self._load(p) for p in detail], dim=0)
        key, i = detail
        if self._cached[0] != key:
            self._cached = ("", None)  # free the previous stacked tensor before loading the next
            self._cached = (key, self._load(key))
        return self._cached[1][i].clone()
