"""Packing encoded samples into fixed-length rows.

Policy (greedy, order-preserving, so a resumed stream packs identically):
- a sample goes into the current row if it fits in the space left; otherwise the row is closed
  (padded) and the sample starts the next row. A row exactly full is closed at once.
- a sample longer than the row length is made to fit first (``fit_to_length``):
  text-only samples are truncated to the row length; a sample with media is truncated only if
  the cut falls after its last ``</img>``; otherwise it is skipped (image tokens cannot be cut,
  or the vision embeddings would no longer match the ``<image>`` tokens). A truncation that
  leaves no target token (e.g. a long document whose question and answer come at the end) is
  skipped too: it would fill a row and contribute nothing to the loss.
- with ``pad_multiple`` > 1 (context parallelism: 2*cp) every sample occupies its length rounded
  up to that multiple; the row length must be a multiple of it too (recipe validation checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .prompt import EncodedSample


@dataclass
class FitResult:
    sample: EncodedSample | None  # None: skip it
    truncated: bool = False
    skip_reason: str | None = None  # "media_too_long" or "no_target_left" when skipped


def fit_to_length(sample: EncodedSample, seq_length: int) -> FitResult:
    if len(sample) <= seq_length:
        return FitResult(sample)
    if sample.last_media_token >= seq_length:
        return FitResult(None, skip_reason="media_too_long")
    if not sample.targets[1:seq_length].any():  # token 0 of a sample is never predicted
        return FitResult(None, skip_reason="no_target_left")
    cut = EncodedSample(
        tokens=sample.tokens[:seq_length],
        targets=sample.targets[:seq_length],
        tiles_per_media=sample.tiles_per_media,
        last_media_token=sample.last_media_token,
        media_tokens=sample.media_tokens,
    )
    return FitResult(cut, truncated=True)


@dataclass
class PackedItem:
    """A sample placed in a row, with what the batch needs besides tokens."""

    encoded: EncodedSample
    tiles: object  # uint8 [n, T, T, 3] numpy array of this sample's tiles
    key: str  # "<dataset>/<shard>/<sample key>", for tracing and tests


def padded_length(n: int, pad_multiple: int) -> int:
    """Tokens a sample of ``n`` tokens occupies in a row when samples are padded to a multiple
    (context parallelism cuts every sample into 2*cp equal chunks)."""
    return -(-n // pad_multiple) * pad_multiple


@dataclass
class RowPacker:
    seq_length: int
    pad_multiple: int = 1  # each sample occupies a multiple of this many tokens (2*cp with CP)
    rows: list[list[PackedItem]] = field(default_factory=list)  # closed rows
    current: list[PackedItem] = field(default_factory=list)
    used: int = 0

    def add(self, item: PackedItem) -> None:
        n = padded_length(len(item.encoded), self.pad_multiple)
        if n > self.seq_length:
            raise ValueError(f"sample of {n} tokens does not fit rows of {self.seq_length}; fit it first")
        if self.used + n > self.seq_length:
            self.close_row()
        self.current.append(item)
        self.used += n
        if self.used == self.seq_length:
            self.close_row()

    def close_row(self) -> None:
        if self.current:
            self.rows.append(self.current)
        self.current, self.used = [], 0

    def take_rows(self, count: int) -> list[list[PackedItem]]:
        rows, self.rows = self.rows[:count], self.rows[count:]
        return rows

    def reset(self) -> None:
        self.rows, self.current, self.used = [], [], 0
