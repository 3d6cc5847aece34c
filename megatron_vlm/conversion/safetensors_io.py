"""Sharded safetensors written and read one tensor at a time (bounded memory).

The safetensors header holds every tensor's dtype, shape and byte range, so once the names and
shapes are known (``mapping.plan_shapes``) each shard's header is written up front and the tensors
are then written into their byte ranges in any order, as the mapping produces them: memory holds
one tensor, never a shard. Shards are ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json`` (``transformers``' layout), or one ``model.safetensors``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}
INDEX = "model.safetensors.index.json"


def nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty(0, dtype=dtype).element_size()


class ShardedSafetensorsWriter:
    """``write(name, tensor)`` for every planned tensor, then ``close()`` (checks completeness)."""

    def __init__(self, out: Path, plan: Sequence[Tuple[str, torch.Size, torch.dtype]],
                 max_shard_bytes: int, metadata: Optional[dict] = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in list(self.out.glob("model*.safetensors")) + list(self.out.glob(INDEX)):
            stale.unlink()
        shards: List[List[Tuple[str, torch.Size, torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            n = nbytes(shape, dtype)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype))
            size += n
        count = len(shards)
        self.files = (["model.safetensors"] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._where: Dict[str, Tuple[object, int, torch.Size, torch.dtype]] = {}
        self._handles = []
        meta = {k: str(v) for k, v in dict(metadata or {}, format="pt").items()}
        self.total_bytes = 0
        for fname, shard in zip(self.files, shards):
            header, offset = {"__metadata__": meta}, 0
            for name, shape, dtype in shard:
                n = nbytes(shape, dtype)
                header[name] = {"dtype": _DTYPES[dtype], "shape": [int(d) for d in shape],
                                "data_offsets": [offset, offset + n]}
                offset += n
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            f = open(self.out / fname, "wb")
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            start = 8 + len(blob)
            f.truncate(start + offset)
            self._handles.append(f)
            for name, shape, dtype in shard:
                self._where[name] = (f, start + header[name]["data_offsets"][0], shape, dtype, fname)
            self.total_bytes += offset
        self._written = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise KeyError(f"{name} was not planned for {self.out}")
        if name in self._written:
            raise ValueError(f"{name} written twice")
        f, pos, shape, dtype, _ = self._where[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: planned {tuple(shape)} {dtype}, got {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        f.seek(pos)
        f.write(memoryview(data))
        self._written.add(name)

    def close(self) -> List[str]:
        for f in self._handles:
            f.close()
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise ValueError(f"{self.out}: {len(missing)} planned tensors never written: {missing[:8]}")
        if len(self.files) == 1:
            return list(self.files)
        weight_map = {name: where[4] for name, where in self._where.items()}
        (self.out / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=1))
        return list(self.files) + [INDEX]


class SafetensorsDirReader:
    """Lazy reader of an HF directory's (sharded) safetensors: ``keys()``, ``shapes()``, ``read``.

    Tensors are read with plain file reads at their byte ranges, not through a memory map: a
    mapped file's pages stay in the process's resident memory once touched, so reading a whole
    model through ``safe_open`` would cost the model's size even though each tensor is dropped."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no such directory")
        index = self.directory / INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
        elif (self.directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{self.directory}: no model.safetensors or {INDEX}")
        self._where: Dict[str, Tuple[Path, int, int]] = {}
        self._shapes = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{index}: names {name}, which is missing")
            for key, (shape, dtype, start, end) in _read_header(path).items():
                self._where[key] = (path, start, end)
                self._shapes[key] = (torch.Size(shape), dtype)

    def keys(self) -> Iterable[str]:
        return list(self._where)

    def shapes(self):
        return dict(self._shapes)

    def read(self, key: str) -> torch.Tensor:
        path, start, end = self._where[key]
        shape, dtype = self._shapes[key]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(start)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path}: {key} is cut short (file truncated?)")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def read_all(self) -> Dict[str, torch.Tensor]:
        return {k: self.read(k) for k in self._where}


def _read_header(path: Path) -> Dict[str, tuple]:
    """name -> (shape, dtype, first byte, end byte) of a safetensors file (absolute offsets)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file (header: {e})") from None
    size = path.stat().st_size
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = (8 + n + int(o) for o in info["data_offsets"])
        dtype = _from_st_dtype(info["dtype"])
        if end > size or end - start != nbytes(info["shape"], dtype):
            raise ValueError(f"{path}: {key}'s byte range does not fit its shape or the file")
        out[key] = (info["shape"], dtype, start, end)
    return out


def _from_st_dtype(name: str) -> torch.dtype:
    for dtype, st in _DTYPES.items():
        if st == name:
            return dtype
    raise ValueError(f"unsupported safetensors dtype {name}")
