"""Packed multimodal training loader: shards -> samples -> blend -> packed batches.

    loader = PackedVLMLoader(
        [DatasetSpec("ocr", "demo/shards/ocr/train", weight=2.0),
         DatasetSpec("text", "demo/shards/text/train/text-{00000..00003}.tar", weight=1.0)],
        tokenizer, seq_length=1024, micro_batch_size=4, dp_rank=rank, dp_size=world,
        seed=1234, tile_size=64, patch_size=16)
    batch = next(loader)            # see batch.py for the contract
    state = loader.state_dict()     # JSON-serialisable; save it with the checkpoint
    loader.load_state_dict(state)   # the next batches are the ones the saved loader would give

Per rank: each dataset is a DatasetStream (DP shard split, seeded shuffle; see
dataset_stream.py); each next sample's dataset is a WeightedBlend choice (blend.py); samples are
decoded (sample_decoder.py), rendered and tokenized (prompt.py), fitted to the sequence length
and packed greedily (packing.py), and collated (batch.py).

Exact resume: the state after a batch is the stream positions, the blend draw counter and the
counters *before the first sample not in any emitted batch was drawn*. After every batch the
loader itself rewinds to that state (the one carried-over sample is decoded again), so a live
loader and one restored from ``state_dict()`` are in the same state by construction.

Damaged data never stops the loader: truncated tar members, damaged headers, samples without
JSON, undecodable tiles, bad metadata and samples whose image tokens do not fit the sequence
length are logged (logger ``megatron_vlm.data``, naming dataset, shard and member), counted in
``loader.counters`` and skipped. Text-only samples that are too long are truncated (counted).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

from .batch import collate_rows
from .blend import WeightedBlend
from .dataset_stream import DatasetStream, NoUsableSamples, StreamPosition
from .packing import PackedItem, RowPacker, fit_to_length
from .prompt import PromptEncoder
from .sample_checks import check_raw_sample
from .sample_decoder import SampleError, decode_sample
from .schema import MANIFEST_NAME, MANIFEST_SCHEMA
from .shard_reader import expand_urls
from .tiling import tokens_per_tile
from .tokenizer import VLMTokenizer
from .video import VideoOptions, set_evs_rates

logger = logging.getLogger("megatron_vlm.data")

COUNTER_NAMES = (
    "samples_read",  # raw samples taken from the shards (error records included)
    "samples_used",  # samples placed in batches
    "truncated_member",  # tar member cut short (truncated shard); the shard ends there
    "damaged_header",  # unreadable tar header; the shard ends there
    "missing_json",  # sample without its .json member
    "open_failed",  # shard could not be opened
    "decode_error",  # metadata JSON or a tile that does not decode
    "schema_error",  # metadata that breaks the schema (or the wrong tile size)
    "skipped_too_long",  # image tokens do not fit the sequence length
    "skipped_no_target",  # too long, and truncating it would leave no target token
    "truncated_text",  # longer than the sequence length, cut (no image tokens lost)
    "video_error",  # encoded clip that cannot be used (truncated, empty, no video stream, bad clip)
    "video_dali_gpu",  # encoded clips decoded by each backend (video_decode.py)
    "video_dali_cpu",
    "video_pyav",
)
_READER_ERROR_COUNTER = {
    "truncated": "truncated_member",
    "damaged_header": "damaged_header",
    "missing_json": "missing_json",
    "open_failed": "open_failed",
}


@dataclass
class DatasetSpec:
    """name: unique label. shards: a manifest (``index.json`` or the directory holding it), a
    brace glob / ``::``-joined list of tar urls, or a list of urls. weight: blend weight."""

    name: str
    shards: str | list[str]
    weight: float = 1.0


def resolve_shards(shards: str | list[str]) -> tuple[list[str], dict | None]:
    """Shard urls of a dataset spec, and its manifest if it has one."""
    if isinstance(shards, str):
        manifest_path = None
        if shards.endswith(".json"):
            manifest_path = shards
        elif "://" not in shards and os.path.isdir(shards):
            manifest_path = os.path.join(shards, MANIFEST_NAME)
            if not os.path.exists(manifest_path):  # a folder of tars without a manifest
                tars = sorted(n for n in os.listdir(shards) if n.endswith((".tar", ".tar.gz", ".tgz")))
                if not tars:
                    raise FileNotFoundError(f"no {MANIFEST_NAME} and no tar files in {shards}")
                return [os.path.join(shards, n) for n in tars], None
        if manifest_path is not None:
            manifest = load_manifest(manifest_path)
            base = os.path.dirname(manifest_path)
            urls = [s["url"] if ("://" in s["url"] or os.path.isabs(s["url"])) else os.path.join(base, s["url"])
                    for s in manifest["shards"]]
            return urls, manifest
    return expand_urls(shards), None


def load_manifest(path: str) -> dict:
    if "://" in path:
        import webdataset

        with webdataset.gopen(path, "rb") as f:
            manifest = json.loads(f.read())
    else:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise ValueError(f"{path}: schema {manifest.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
    return manifest


def tile_size_problem(manifest: dict | None, tile_size: int, where: str) -> str | None:
    """The one check that shards were cut at the tile size a run reads (loader, evaluation and
    recipe validation): a one-line message naming ``where``, or None when they agree or the
    shards carry no manifest."""
    if manifest is None or manifest["tiling"]["tile_size"] == tile_size:
        return None
    return (f"{where}: shards hold {manifest['tiling']['tile_size']} px tiles, the recipe's "
            f"data.tile_size is {tile_size} (rebuild them with build_shards --tile-size "
            f"{tile_size}, or set data.tile_size)")


class PackedVLMLoader:
    def __init__(
        self,
        datasets: list[DatasetSpec],
        tokenizer: VLMTokenizer,
        seq_length: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        tile_size: int = 512,
        patch_size: int = 16,
        pixel_shuffle_ratio: float = 0.5,
        shuffle: bool = True,
        shuffle_window: int = 256,
        num_epochs: int | None = None,
        max_consecutive_errors: int = 10_000,
        pad_multiple: int = 1,
        video: VideoOptions | None = None,
    ):
        if not datasets:
            raise ValueError("no datasets")
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique: {names}")
        if num_epochs is not None and len(datasets) != 1:
            raise ValueError("num_epochs (a finite pass) needs exactly one dataset")
        self.tokenizer = tokenizer
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.tile_size = tile_size
        self.tokens_per_tile = tokens_per_tile(tile_size, patch_size, pixel_shuffle_ratio)
        self.num_epochs, self.max_consecutive_errors = num_epochs, max_consecutive_errors
        self.encoder = PromptEncoder(tokenizer, self.tokens_per_tile)
        self.video = video or VideoOptions()
        self.specs = list(datasets)
        self.streams: list[DatasetStream] = []
        self.manifests: list[dict | None] = []
        for i, spec in enumerate(self.specs):
            urls, manifest = resolve_shards(spec.shards)
            problem = tile_size_problem(manifest, tile_size, f"dataset {spec.name}")
            if problem:
                raise ValueError(problem)
            # Each dataset gets its own seed so equal shard lists are not read in lockstep.
            self.streams.append(DatasetStream(urls, dp_rank, dp_size, seed=seed * 1000003 + i,
                                              shuffle_window=shuffle_window, shuffle=shuffle))
            self.manifests.append(manifest)
        self.blend = WeightedBlend([d.weight for d in self.specs], seed)
        self._draws = 0
        self._batches = 0
        self._counters = {n: dict.fromkeys(COUNTER_NAMES, 0) for n in names}
        self._consecutive_errors = [0] * len(self.specs)
        self._logged: OrderedDict = OrderedDict()  # recently logged (dataset, position): no repeats
        if seq_length % pad_multiple:
            raise ValueError(f"seq_length={seq_length} is not a multiple of pad_multiple={pad_multiple}")
        self.pad_multiple = pad_multiple  # samples padded to it (2*cp with context parallelism)
        self._packer = RowPacker(seq_length, pad_multiple)
        self._exhausted = False

    # ---- counters ---------------------------------------------------------------------------
    @property
    def counters(self) -> dict:
        """{"total": {counter: n}, "per_dataset": {name: {counter: n}}} (copies)."""
        total = dict.fromkeys(COUNTER_NAMES, 0)
        for c in self._counters.values():
            for k, v in c.items():
                total[k] += v
        return {"total": total, "per_dataset": copy.deepcopy(self._counters)}

    def _skip(self, k: int, position: StreamPosition, counter: str, message: str) -> None:
        name = self.specs[k].name
        self._counters[name][counter] += 1
        self._consecutive_errors[k] += 1
        tag = (k, position)
        if tag not in self._logged:
            self._logged[tag] = None
            if len(self._logged) > 4096:
                self._logged.popitem(last=False)
            logger.warning("dataset %s: %s; skipped (%s)", name, message, counter)
        manifest = self.manifests[k]
        # A whole pass over a dataset of known size without a usable sample: none will come.
        limit = min(self.max_consecutive_errors,
                    manifest["num_samples"] if manifest and manifest.get("num_samples") else
                    self.max_consecutive_errors)
        if self._consecutive_errors[k] > limit:
            raise NoUsableSamples(f"dataset {name} ({self.specs[k].shards}): no usable sample in "
                                  f"{self._consecutive_errors[k]} in a row (last: {message}; "
                                  f"skips so far: {self._skip_summary(name)})")

    def _skip_summary(self, name: str) -> str:
        return ", ".join(f"{c}={n}" for c, n in self._counters[name].items()
                         if n and c not in ("samples_read", "samples_used")) or "none"

    # ---- state ------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        return {
            "draws": self._draws,
            "positions": [s.position for s in self.streams],
            "counters": {n: dict(c) for n, c in self._counters.items()},
            "consecutive_errors": list(self._consecutive_errors),
        }

    def _restore(self, snap: dict) -> None:
        self._draws = snap["draws"]
        for stream, pos in zip(self.streams, snap["positions"]):
            stream.seek(pos)
        self._counters = {n: dict(c) for n, c in snap["counters"].items()}
        self._consecutive_errors = list(snap["consecutive_errors"])
        self._packer.reset()

    def state_dict(self) -> dict:
        """Position after the last batch returned, JSON-serialisable."""
        return {
            "version": 1,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seq_length": self.seq_length,
            "micro_batch_size": self.micro_batch_size,
            "datasets": [s.name for s in self.specs],
            "batches": self._batches,
            "draws": self._draws,
            "positions": {s.name: st.position.to_list() for s, st in zip(self.specs, self.streams)},
            "counters": copy.deepcopy(self._counters),
            "exhausted": self._exhausted,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown loader state version {state.get('version')}")
        for field in ("seed", "dp_rank", "dp_size", "seq_length", "micro_batch_size"):
            if state[field] != getattr(self, field):
                raise ValueError(f"loader state has {field}={state[field]}, this loader {getattr(self, field)}")
        if state["datasets"] != [s.name for s in self.specs]:
            raise ValueError(f"loader state is for datasets {state['datasets']}")
        self._restore({
            "draws": state["draws"],
            "positions": [StreamPosition.from_list(state["positions"][s.name]) for s in self.specs],
            "counters": {n: {**dict.fromkeys(COUNTER_NAMES, 0), **c} for n, c in state["counters"].items()},
            "consecutive_errors": [0] * len(self.specs),
        })
        self._batches = state["batches"]
        self._exhausted = state.get("exhausted", False)

    # ---- samples ----------------------------------------------------------------------------
    def _draw(self) -> PackedItem | None:
        """The next usable sample of the blend (None when a finite pass is over)."""
        k = self.blend.choose(self._draws)
        name, stream = self.specs[k].name, self.streams[k]
        counters = self._counters[name]
        while True:
            try:
                position, raw = stream.next(stop_epoch=self.num_epochs)
            except NoUsableSamples as exc:
                raise NoUsableSamples(f"dataset {name} ({self.specs[k].shards}): {exc}") from None
            if raw is None:  # the finite pass is over
                return None
            counters["samples_read"] += 1
            if raw.error is not None:
                self._skip(k, position, _READER_ERROR_COUNTER[raw.error_kind], f"shard {raw.shard} {raw.error}")
                continue
            try:
                check_raw_sample(raw)  # field types first: what follows may rely on them
                decoded = decode_sample(raw, self.tile_size, self.video)
                set_evs_rates(decoded.meta, self.video, self.seed, raw.key)
                encoded = self.encoder.encode(decoded.meta)
            except SampleError as exc:  # only our data errors: anything else is a bug to see
                self._skip(k, position, exc.kind, f"shard {raw.shard} member {exc.member}: {exc.reason}")
                continue
            fit = fit_to_length(encoded, self.seq_length)
            if fit.skip_reason == "media_too_long":
                self._skip(k, position, "skipped_too_long",
                           f"shard {raw.shard} sample {raw.key}: {len(encoded)} tokens, image tokens end at "
                           f"{encoded.last_media_token + 1} > seq_length {self.seq_length}")
                continue
            if fit.skip_reason == "no_target_left":
                self._skip(k, position, "skipped_no_target",
                           f"shard {raw.shard} sample {raw.key}: {len(encoded)} tokens, no target token "
                           f"within seq_length {self.seq_length}")
                continue
            if fit.truncated:
                counters["truncated_text"] += 1
            counters["samples_used"] += 1
            for backend in decoded.video_backends:
                counters[f"video_{backend}"] += 1
            self._consecutive_errors[k] = 0
            self._draws += 1
            return PackedItem(fit.sample, decoded.tiles, key=f"{name}/{raw.shard}/{raw.key}")

    # ---- batches ----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._exhausted:
            raise StopIteration
        packer, B = self._packer, self.micro_batch_size
        snap = None
        while len(packer.rows) < B:
            snap = self._snapshot()  # before drawing `item`
            item = self._draw()
            if item is None:  # finite pass over: flush what is left
                packer.close_row()
                self._exhausted = True
                break
            packer.add(item)
        rows = packer.take_rows(B)
        if not rows:
            raise StopIteration
        # Only the last drawn item can be left over (it overflowed row B and opened row B+1):
        # then the resume point is just before its draw, else right after it.
        leftover = bool(packer.rows or packer.current)
        self._restore(snap if leftover else self._snapshot())
        while len(rows) < B:  # only at the end of a finite pass
            rows.append([])
        self._batches += 1
        return collate_rows(rows, self.seq_length, self.tokenizer.pad_id, self.tile_size,
                            self.pad_multiple)

    def close(self) -> None:
        for s in self.streams:
            s.close()


class GlobalBatchLoader:
    """The data-parallel group's loader, of which each rank keeps its share of every global batch.

    Every rank runs the same :class:`PackedVLMLoader` (streams read as if the DP size were 1) and
    builds the same global batch of ``micro_batches_per_rank x dp_size`` micro-batches; rank ``r``
    keeps micro-batches ``[r * n, (r + 1) * n)``. The global batches, and the loader state after
    each, therefore do not depend on the DP size: a checkpoint resumes at any DP (and TP/PP) size
    with exactly the samples the uninterrupted run would have used, none twice.

    The price: every rank reads and decodes the samples of the whole global batch (cheap for the
    pre-cut tiles of our shards next to a training step; per-rank streams would avoid it).
    """

    STATE_VERSION = 2

    def __init__(self, inner: PackedVLMLoader, dp_rank: int, dp_size: int,
                 micro_batches_per_rank: int):
        if inner.dp_size != 1:
            raise ValueError("GlobalBatchLoader needs the whole group's loader (dp_size=1)")
        if not 0 <= dp_rank < dp_size or micro_batches_per_rank < 1:
            raise ValueError(f"dp_rank {dp_rank} of {dp_size}, {micro_batches_per_rank} micro-batches")
        self.inner, self.dp_rank, self.dp_size = inner, dp_rank, dp_size
        self.micro_batches_per_rank = micro_batches_per_rank
        self._mine: list[dict] = []

    @property
    def counters(self) -> dict:
        return self.inner.counters

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._mine:
            n = self.micro_batches_per_rank
            group = [next(self.inner) for _ in range(n * self.dp_size)]
            self._mine = group[self.dp_rank * n:(self.dp_rank + 1) * n]
        return self._mine.pop(0)

    def state_dict(self) -> dict | None:
        """The group's position after the last global batch (the same on every rank); None in the
        middle of a global batch (a prefetcher asks after every micro-batch; checkpoints are only
        written between steps, where the state is defined)."""
        if self._mine:
            return None
        return {"version": self.STATE_VERSION, "global_batches": True, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not is_global_state(state):
            raise ValueError("loader state is per data-parallel rank (an older checkpoint): it "
                             "resumes only with per-rank loaders at its own data-parallel size")
        self.inner.load_state_dict(state["inner"])
        self._mine = []

    def close(self) -> None:
        self.inner.close()


def is_global_state(state) -> bool:
    """Whether a saved loader state is DP-size independent (GlobalBatchLoader's)."""
    return isinstance(state, dict) and state.get("version") == GlobalBatchLoader.STATE_VERSION \
        and state.get("global_batches") is True
