"""Build pre-tiled WebDataset shards from a JSONL of conversations.

    python -m megatron_vlm.data_prep.build_shards --input data/train.jsonl --out shards/train \\
        --samples-per-shard 256 --workers 2 --tile-size 512 --max-tiles 12

Input records: see megatron_vlm/data_prep/records.py (``--help`` prints the format). Output: ``OUT/PREFIX-00000.tar ...`` in the layout of
megatron_vlm/data/schema.py and the manifest ``OUT/index.json`` (per-shard sample counts and
bytes, tiling parameters, skip counts).

Records are tiled in parallel (``--workers`` processes) but written in input order, so the
shards do not depend on the worker count, and re-running on the same input gives byte-identical
shards (fixed tar metadata, canonical JSON). Records with a missing or corrupt image, or that do
not parse, are reported with the file and line, counted and skipped; a summary ends the run.
Long builds report progress (records done, records/s, ETA) on stderr every ``--progress-every``
seconds.

The tile size (with the rest of the tiling) is written to ``index.json``; the loader, the
evaluation and recipe validation (``training/recipe.py: check_paths``) refuse shards whose tile
size differs from the recipe's ``data.tile_size``, so build with the tile size of the recipe that
will read the shards (64 for the tiny recipes, 512 for Nano V2 VL).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import time

from megatron_vlm.data.schema import MANIFEST_NAME, MANIFEST_SCHEMA
from megatron_vlm.data.shard_writer import ShardWriter
from megatron_vlm.data.tiling import TilingConfig

from .record_checks import record_type_problem
from .records import JSONL_FORMAT, BuildOptions, RecordError, build_sample, sample_members

SKIP_KINDS = ("missing_image", "corrupt_image", "bad_record")  # + missing_video, bad_video when met

_worker_state: dict = {}


def _init_worker(base_dir: str, options: BuildOptions) -> None:
    _worker_state["base_dir"], _worker_state["options"] = base_dir, options


def _process_line(item: tuple[int, str]):
    line_no, text = item
    try:
        if isinstance(text, bytes):  # not UTF-8 (see _read_lines)
            raise RecordError("bad_record", f"line is not UTF-8 text: {text[:40]!r}")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError("bad_record", f"invalid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise RecordError("bad_record", "line is not a JSON object")
        if (problem := record_type_problem(record)) is not None:
            raise RecordError("bad_record", problem)
        meta, tiles = build_sample(record, line_no, _worker_state["base_dir"], _worker_state["options"])
        return line_no, "ok", sample_members(meta, tiles), len(tiles)
    except RecordError as exc:
        return line_no, exc.kind, str(exc), 0


def _read_lines(path: str):
    """(line number, text) per non-empty line; the raw bytes where a line is not UTF-8."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, raw
                continue
            if line.strip():
                yield line_no, line


def count_records(path: str) -> int:
    """Non-empty lines of the JSONL (one fast pass, for the progress ETA)."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


class Progress:
    """``done/total records (x%), r records/s, ETA h:mm:ss`` at most every ``interval`` seconds."""

    def __init__(self, total: int, log, interval: float = 10.0, clock=time.monotonic, label: str = ""):
        self.total, self.log, self.interval, self.clock, self.label = total, log, interval, clock, label
        self.start = self.last = clock()

    def update(self, done: int) -> None:
        now = self.clock()
        if self.interval <= 0 or now - self.last < self.interval or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = int(round((self.total - done) / rate)) if rate > 0 else 0
        self.log(f"{self.label}{done}/{self.total} records ({100 * done / max(self.total, 1):.0f}%), "
                 f"{rate:.1f} records/s, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


def build_shards(input_path: str, out_dir: str, *, tiling: TilingConfig = TilingConfig(),
                 samples_per_shard: int = 256, max_shard_bytes: int | None = None, workers: int = 1,
                 image_format: str = "png", jpeg_quality: int = 95, image_root: str | None = None,
                 prefix: str = "shard", log=None, transcode: str | None = None,
                 progress_every: float = 10.0, clock=time.monotonic) -> dict:
    """Write the shards and the manifest; returns the manifest (which holds the summary).

    ``progress_every``: seconds between progress lines on ``log`` (0: none)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix {prefix!r} must match [A-Za-z0-9_-]+")
    os.makedirs(out_dir, exist_ok=True)
    source_name = os.path.basename(input_path)
    options = BuildOptions(tiling=tiling, image_format=image_format, jpeg_quality=jpeg_quality,
                           image_root=image_root, source_name=source_name, transcode=transcode)
    base_dir = os.path.dirname(os.path.abspath(input_path))
    skipped = dict.fromkeys(SKIP_KINDS, 0)
    shards: list[dict] = []
    total_tiles = 0
    writer: ShardWriter | None = None
    start = time.perf_counter()
    progress = Progress(count_records(input_path) if progress_every > 0 else 0, log, progress_every,
                        clock, label=f"build_shards {source_name}: ")

    def close_writer():
        nonlocal writer
        if writer is not None and writer.num_samples:
            size = writer.close()
            shards.append({"url": os.path.basename(writer.path), "num_samples": writer.num_samples,
                           "num_bytes": size})
        elif writer is not None:
            writer.abort()
        writer = None

    if workers > 1:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker,
                                                        initargs=(base_dir, options))
        results = pool.imap(_process_line, _read_lines(input_path), chunksize=8)
    else:
        pool = None
        _init_worker(base_dir, options)
        results = map(_process_line, _read_lines(input_path))
    try:
        for done, (line_no, status, payload, n_tiles) in enumerate(results, start=1):
            progress.update(done)
            if status != "ok":
                skipped[status] = skipped.get(status, 0) + 1
                log(f"skip {source_name}:{line_no}: {payload}")
                continue
            if writer is None:
                writer = ShardWriter(os.path.join(out_dir, f"{prefix}-{len(shards):05d}.tar"))
            writer.add(f"s{line_no:09d}", payload)
            total_tiles += n_tiles
            if writer.num_samples >= samples_per_shard or (max_shard_bytes and writer.num_bytes >= max_shard_bytes):
                close_writer()
        close_writer()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if writer is not None:
            writer.abort()

    written = {s["url"] for s in shards}
    for name in os.listdir(out_dir):  # shards left over from an earlier, larger run
        if re.fullmatch(re.escape(prefix) + r"-\d{5}\.tar", name) and name not in written:
            os.remove(os.path.join(out_dir, name))
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "source": source_name,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_tiles": total_tiles,
        "image_format": options.ext,
        "tiling": tiling.to_dict(),
        "shards": shards,
        "skipped": skipped,
    }
    with open(os.path.join(out_dir, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    elapsed = time.perf_counter() - start
    total_bytes = sum(s["num_bytes"] for s in shards)
    log(f"build_shards {source_name}: {manifest['num_samples']} samples, {total_tiles} tiles in {len(shards)} "
        f"shards ({total_bytes / 1e6:.1f} MB) -> {out_dir} in {elapsed:.1f}s; skipped "
        + ", ".join(f"{k}={v}" for k, v in skipped.items()) + f" (total {sum(skipped.values())})")
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_vlm.data_prep.build_shards", description=__doc__,
        epilog=JSONL_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="JSONL of records, one per line (format below); media paths are relative to it")
    p.add_argument("--out", required=True, help="output directory for the shards and index.json")
    p.add_argument("--prefix", default="shard",
                   help="shard file name prefix: OUT/PREFIX-00000.tar ... (default: %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=256,
                   help="samples per shard file (default: %(default)s)")
    p.add_argument("--max-shard-bytes", type=int, default=None,
                   help="also close a shard once it holds this many bytes (default: no size limit)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes tiling records in parallel; the output does not depend on it "
                        "(default: %(default)s)")
    p.add_argument("--tile-size", type=int, default=512,
                   help="tile side in pixels; must equal the data.tile_size of the recipes that "
                        "read the shards: 64 for recipes/tiny, 512 for recipes/nano_v2_vl "
                        "(default: %(default)s)")
    p.add_argument("--min-tiles", type=int, default=1,
                   help="fewest tiles an image is cut into, thumbnail not counted (default: %(default)s)")
    p.add_argument("--max-tiles", type=int, default=12,
                   help="most tiles an image is cut into, thumbnail not counted (default: %(default)s)")
    p.add_argument("--no-thumbnail", action="store_true",
                   help="no whole-image thumbnail tile after the grid (default: one is added when "
                        "an image has more than one tile)")
    p.add_argument("--image-format", choices=("png", "jpeg"), default="png",
                   help="encoding of the stored tiles (default: %(default)s, lossless)")
    p.add_argument("--jpeg-quality", type=int, default=95,
                   help="quality with --image-format jpeg (default: %(default)s)")
    p.add_argument("--image-root", default=None,
                   help="base folder of relative media paths (default: the JSONL's folder)")
    p.add_argument("--transcode", choices=("vp9",), default=None,
                   help="re-encode videos, e.g. for DALI's CPU decoder, which has no H.264 "
                        "(default: store the files' bytes as they are)")
    p.add_argument("--progress-every", type=float, default=10.0,
                   help="seconds between progress lines (records done, records/s, ETA) on stderr; "
                        "0: none (default: %(default)s)")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    tiling = TilingConfig(args.tile_size, args.min_tiles, args.max_tiles, not args.no_thumbnail)
    manifest = build_shards(args.input, args.out, tiling=tiling, samples_per_shard=args.samples_per_shard,
                            max_shard_bytes=args.max_shard_bytes, workers=args.workers,
                            image_format=args.image_format, jpeg_quality=args.jpeg_quality,
                            image_root=args.image_root, prefix=args.prefix, transcode=args.transcode,
                            progress_every=args.progress_every)
    print(json.dumps({"num_samples": manifest["num_samples"], "num_shards": len(manifest["shards"]),
                      "skipped": manifest["skipped"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
