"""One dataset as an endless, seekable stream of raw samples for one data-parallel rank.

Order of samples (all of it a function of seed, epoch, dp_rank, dp_size):

1. Epoch ``e`` permutes the dataset's shard list with ``rng(seed, e)``; rank ``r`` of ``dp_size``
   reads the shards at permuted positions ``r, r + dp_size, ...``. Within an epoch the ranks'
   shard sets are disjoint and cover every shard: no sample is seen by two ranks, and each rank
   sees exactly the samples of its shards (so ranks may get different counts per epoch; the
   stream is endless, ranks never wait for each other).
   A dataset with fewer shards than ranks (small eval sets) is split by sample instead: every
   rank reads every shard and keeps sample ``i`` of the shard at permuted position ``k`` when
   ``(i + k) % dp_size == r`` (disjoint and complete too; costs dp_size-fold reading).
2. A shard is read in windows of ``shuffle_window`` consecutive samples; each window is emitted
   in the order of a permutation drawn from ``rng(seed, e, shard, window)``.
3. After the rank's last shard, epoch ``e + 1`` starts with a new shard permutation.

Position = (epoch, slot, consumed): the rank's ``slot``-th shard of the epoch, of which
``consumed`` samples (error records included) have been emitted. ``seek(position)`` re-reads only
the current window, so a restored stream emits exactly what the original would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .shard_reader import RawSample, read_shard


@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    slot: int = 0
    consumed: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.slot, self.consumed]

    @classmethod
    def from_list(cls, values) -> "StreamPosition":
        epoch, slot, consumed = (int(v) for v in values)
        return cls(epoch, slot, consumed)


class NoUsableSamples(ValueError):
    """A dataset that gives no usable sample at all; the message names it."""


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) & 0xFFFFFFFF for w in words])


class DatasetStream:
    def __init__(self, urls: list[str], dp_rank: int, dp_size: int, seed: int, shuffle_window: int = 256,
                 shuffle: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if not urls:
            raise ValueError("a dataset needs at least one shard")
        if shuffle_window < 1:
            raise ValueError("shuffle_window must be >= 1")
        self.urls = list(urls)
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle_window, self.shuffle = shuffle_window, shuffle
        self.split_by = "shard" if len(urls) >= dp_size else "sample"
        self._position = StreamPosition()
        self._window: list[RawSample] | None = None  # the loaded window of the current shard
        self._window_order: np.ndarray | None = None
        self._window_start = -1
        self._reader: Iterator[RawSample] | None = None  # open shard, positioned after the window
        self._reader_at = -1  # index in the shard of the next sample the reader yields
        self._epoch_shards: tuple[int, list[int]] = (-1, [])  # cache of shards_of_epoch

    # ---- order ------------------------------------------------------------------------------
    def shards_of_epoch(self, epoch: int) -> list[int]:
        """Indices (into urls) of this rank's shards in `epoch`, in reading order."""
        if self._epoch_shards[0] != epoch:
            self._epoch_shards = (epoch, self._compute_shards_of_epoch(epoch))
        return self._epoch_shards[1]

    def _compute_shards_of_epoch(self, epoch: int) -> list[int]:
        order = _rng(self.seed, 0x5EA7, epoch).permutation(len(self.urls)) if self.shuffle else np.arange(len(self.urls))
        if self.split_by == "sample":
            return [int(i) for i in order]
        return [int(i) for i in order[self.dp_rank :: self.dp_size]]

    def _keep(self, slot: int):
        """Which samples of the shard at `slot` this rank reads (None: all)."""
        if self.split_by == "shard":
            return None
        rank, size = self.dp_rank, self.dp_size
        return lambda index: (index + slot) % size == rank

    @property
    def position(self) -> StreamPosition:
        return self._position

    def seek(self, position: StreamPosition) -> None:
        if position != self._position:
            same_shard = (position.epoch, position.slot) == (self._position.epoch, self._position.slot)
            self._position = position
            if not (same_shard and self._window is not None
                    and self._window_start == position.consumed // self.shuffle_window * self.shuffle_window):
                self._drop_window(close_reader=True)

    # ---- reading ----------------------------------------------------------------------------
    def _drop_window(self, close_reader: bool) -> None:
        self._window = self._window_order = None
        self._window_start = -1
        if close_reader and self._reader is not None:
            self._reader.close()
            self._reader, self._reader_at = None, -1

    def _load_window(self) -> None:
        pos = self._position
        shard = self.shards_of_epoch(pos.epoch)[pos.slot]
        start = pos.consumed // self.shuffle_window * self.shuffle_window
        if self._reader is None or self._reader_at != start:
            if self._reader is not None:
                self._reader.close()
            self._reader = read_shard(self.urls[shard], skip_samples=start, keep=self._keep(pos.slot))
            self._reader_at = start
        window: list[RawSample] = []
        for raw in self._reader:
            window.append(raw)
            if len(window) == self.shuffle_window:
                break
        self._reader_at = start + len(window)
        if len(window) < self.shuffle_window:  # the shard is exhausted
            self._reader.close()
            self._reader, self._reader_at = None, -1
        self._window, self._window_start = window, start
        if self.shuffle:
            self._window_order = _rng(self.seed, 0x3A11, pos.epoch, shard, start).permutation(len(window))
        else:
            self._window_order = np.arange(len(window))

    def next(self, stop_epoch: int | None = None) -> tuple[StreamPosition, RawSample | None]:
        """The next raw sample (possibly an error record) and the position it was read at.

        With stop_epoch, reaching that epoch returns (position, None) instead of reading on.
        """
        empty_slots = 0
        while True:
            pos = self._position
            if stop_epoch is not None and pos.epoch >= stop_epoch:
                return pos, None
            if self._window is None:
                self._load_window()
            offset = pos.consumed - self._window_start
            if offset < len(self._window):
                raw = self._window[int(self._window_order[offset])]
                self._position = StreamPosition(pos.epoch, pos.slot, pos.consumed + 1)
                return pos, raw
            # Window used up: next window of this shard, or the next shard / epoch.
            shard_done = len(self._window) < self.shuffle_window
            self._drop_window(close_reader=shard_done)
            if shard_done:
                empty_slots = empty_slots + 1 if pos.consumed == 0 else 0
                if empty_slots > 2 * len(self.urls):
                    raise NoUsableSamples(f"no readable samples in any of its {len(self.urls)} "
                                          f"shards ({self.urls[0]}, ...)")
                slot = pos.slot + 1
                if slot >= len(self.shards_of_epoch(pos.epoch)):
                    self._position = StreamPosition(pos.epoch + 1, 0, 0)
                else:
                    self._position = StreamPosition(pos.epoch, slot, 0)

    def close(self) -> None:
        self._drop_window(close_reader=True)
