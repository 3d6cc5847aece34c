"""Write samples into reproducible tar shards (see schema.py for the layout).

Reproducible = the same samples give byte-identical files: members are written in the order
given, with mtime 0, uid/gid 0, empty user/group names, mode 0644, ustar format (no pax
headers carrying times). A shard is written to ``NAME.tmp`` and renamed when complete, so a
crash never leaves a half-written shard under the final name.
"""

from __future__ import annotations

import io
import os
import tarfile

from .schema import KEY_PATTERN


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardWriter:
    """Writes one shard; `add(key, members)` appends a sample, members = [(suffix, bytes)]."""

    def __init__(self, path: str):
        self.path = path
        self._tmp = path + ".tmp"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0
        self._keys: set[str] = set()

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"sample key {key!r} must match {KEY_PATTERN.pattern}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path}")
        self._keys.add(key)
        for suffix, data in members:
            self._tar.addfile(_tarinfo(f"{key}.{suffix}", len(data)), io.BytesIO(data))
        self.num_samples += 1

    @property
    def num_bytes(self) -> int:
        return self._file.tell()

    def close(self) -> int:
        """Finish the shard; returns its size in bytes."""
        self._tar.close()
        self._file.close()
        os.replace(self._tmp, self.path)
        return os.path.getsize(self.path)

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        os.remove(self._tmp)
