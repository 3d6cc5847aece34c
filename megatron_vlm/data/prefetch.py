"""Build batches in a background thread, a few ahead of the training loop.

    loader = PrefetchingLoader(PackedVLMLoader(...), depth=2)
    batch = next(loader)
    state = loader.state_dict()   # the position after the last batch *returned*, not produced

Shard reading, image decoding (Pillow), tokenization (HF tokenizers) and the collate's torch ops
release the GIL for most of their time, so the thread overlaps with the model's step. Each
produced batch travels with the loader state and counters taken right after it, so
``state_dict()`` and ``counters`` always describe what the caller has consumed and a resume is
exactly as with the plain loader.
"""

from __future__ import annotations

import queue
import threading

from .loader import PackedVLMLoader

_END = object()


class PrefetchingLoader:
    def __init__(self, loader: PackedVLMLoader, depth: int = 2):
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.loader, self.depth = loader, depth
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state = loader.state_dict()
        self._counters = loader.counters
        self._done = False

    # ---- worker -----------------------------------------------------------------------------
    def _work(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in self.loader:
                item = (batch, self.loader.state_dict(), self.loader.counters)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(_END)
        except BaseException as exc:  # hand any failure to the consumer
            out.put(exc)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop),
                                        name="vlm-data-prefetch", daemon=True)
        self._thread.start()

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)  # unblock a pending put
                except queue.Empty:
                    pass
            self._thread.join()
        self._thread = self._queue = None

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._done = True
            self._shutdown()
            raise StopIteration
        if isinstance(item, BaseException):
            self._shutdown()
            raise item
        batch, self._state, self._counters = item
        return batch

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self._state

    @property
    def counters(self) -> dict:
        return self._counters

    def load_state_dict(self, state: dict) -> None:
        """Drop prefetched batches and continue from `state`."""
        self._shutdown()
        self.loader.load_state_dict(state)
        self._state, self._counters = self.loader.state_dict(), self.loader.counters
        self._done = False

    def close(self) -> None:
        self._shutdown()
        self.loader.close()
