"""Look inside shards as a person would check them: statistics, and one sample rendered.

    python -m megatron_vlm.data_prep.inspect SHARDS [--tokenizer DIR] [--sample KEY] [--html OUT]

SHARDS is what a recipe's ``data.blend[].path`` accepts: a shard directory with ``index.json``, a
manifest file, a brace glob (``train-{00000..00009}.tar``) or ``a.tar::b.tar``. Without
``--sample`` it prints dataset statistics: samples, kinds, media kinds, tiles per sample
(histogram), skipped samples (at build time, from the manifest, and unreadable now) and, given a
tokenizer, tokens per sample and the share of tokens that carry loss. With ``--sample KEY`` it
prints that sample: its media (grid, tiles, video frame times), the prompt exactly as the model
reads it with each run of ``<image>`` placeholders collapsed to ``<image>xN``, and the tokens
that carry loss between ``[[`` and ``]]``. ``--html OUT`` writes the same as a page with the
tiles laid out in their grid order followed by the thumbnail.

Tokens per tile follow from ``--tile-size`` (default: the manifest's), ``--patch-size`` and
``--pixel-shuffle-ratio`` exactly as the loader computes them (the defaults are the Nano V2 VL
tower's: patch 16, ratio 0.5 -> 256 tokens per 512 px tile).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megatron_vlm.data.loader import resolve_shards
from megatron_vlm.data.sample_decoder import SampleError, decode_sample
from megatron_vlm.data.schema import media_tile_names
from megatron_vlm.data.shard_reader import read_shard
from megatron_vlm.data.tiling import tokens_per_tile


@dataclass
class SampleView:
    """What one sample holds, as the loader would see it."""

    key: str
    shard: str
    kind: str
    media: list[dict]                          # per media item: type, tiles, grid, thumbnail, times
    tiles: np.ndarray                          # uint8 [N, T, T, 3] in token order
    placeholder_tokens: int = 0                # <image> tokens in the encoded prompt
    tokens: list[int] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])


@dataclass
class ShardStats:
    samples: int = 0
    kinds: Counter = field(default_factory=Counter)
    media_kinds: Counter = field(default_factory=Counter)
    tiles_per_sample: Counter = field(default_factory=Counter)
    tokens_per_sample: list = field(default_factory=list)
    target_tokens: int = 0
    unreadable: Counter = field(default_factory=Counter)     # by reason, found now
    skipped_at_build: dict = field(default_factory=dict)     # from the manifest


class Inspector:
    """Reads shards of one dataset; encodes prompts when given a tokenizer."""

    def __init__(self, shards: str, tokenizer=None, tile_size: int | None = None,
                 patch_size: int = 16, pixel_shuffle_ratio: float = 0.5):
        self.urls, self.manifest = resolve_shards(shards)
        tiling = (self.manifest or {}).get("tiling", {})
        self.tile_size = tile_size or int(tiling.get("tile_size", 512))
        self.tokenizer = tokenizer
        self.encoder = None
        if tokenizer is not None:
            from megatron_vlm.data.prompt import PromptEncoder

            self.encoder = PromptEncoder(
                tokenizer, tokens_per_tile(self.tile_size, patch_size, pixel_shuffle_ratio))

    def samples(self):
        """Every sample as a SampleView, or an (error kind, message) pair for unreadable ones."""
        for url in self.urls:
            for raw in read_shard(url):
                if raw.error is not None:
                    yield (raw.error_kind or "unreadable", f"{url}: {raw.error}")
                    continue
                try:
                    decoded = decode_sample(raw, self.tile_size)
                except SampleError as exc:
                    yield (exc.kind, f"{url}: {exc}")
                    continue
                yield self._view(decoded)

    def _view(self, decoded) -> SampleView:
        media = []
        for item in decoded.meta.get("media", []):
            entry = {"type": item["type"], "tiles": len(media_tile_names(item))}
            if item["type"] == "image":
                entry.update(grid=list(item["grid"]), thumbnail=bool(item.get("thumbnail")))
            else:
                entry["times"] = [float(f["t"]) for f in item.get("frames", [])]
            media.append(entry)
        view = SampleView(decoded.key, decoded.shard, decoded.meta["kind"], media, decoded.tiles)
        if self.encoder is not None:
            encoded = self.encoder.encode(decoded.meta)
            view.tokens = encoded.tokens.tolist()
            view.targets = encoded.targets.tolist()
            view.placeholder_tokens = int(np.sum(encoded.tokens == self.tokenizer.image_id))
        return view

    def stats(self) -> ShardStats:
        stats = ShardStats(skipped_at_build=dict((self.manifest or {}).get("skipped", {})))
        for view in self.samples():
            if isinstance(view, tuple):
                stats.unreadable[view[0]] += 1
                continue
            stats.samples += 1
            stats.kinds[view.kind] += 1
            stats.media_kinds.update(m["type"] for m in view.media)
            stats.tiles_per_sample[view.num_tiles] += 1
            if view.tokens:
                stats.tokens_per_sample.append(len(view.tokens))
                stats.target_tokens += sum(view.targets)
        return stats

    def find(self, key: str) -> SampleView:
        for view in self.samples():
            if not isinstance(view, tuple) and view.key.rsplit("/", 1)[-1] == key:
                return view
        raise KeyError(f"no readable sample with key {key!r} in {len(self.urls)} shard(s)")


# ---- text rendering ---------------------------------------------------------------------------
def format_stats(stats: ShardStats, n_shards: int) -> str:
    lines = [f"shards: {n_shards}   samples: {stats.samples}",
             "kinds: " + _counts(stats.kinds),
             "media: " + (_counts(stats.media_kinds) or "none"),
             "tiles per sample:"]
    width = max(stats.tiles_per_sample.values(), default=1)
    for tiles in sorted(stats.tiles_per_sample):
        count = stats.tiles_per_sample[tiles]
        lines.append(f"  {tiles:4d} | {'#' * max(1, round(40 * count / width))} {count}")
    if stats.tokens_per_sample:
        t = np.asarray(stats.tokens_per_sample)
        lines.append(f"tokens per sample: min {t.min()}  median {int(np.median(t))}  max {t.max()}  "
                     f"total {t.sum()}  with loss {stats.target_tokens} "
                     f"({100.0 * stats.target_tokens / max(1, t.sum()):.1f}%)")
    lines.append("skipped at build: " + (_counts(stats.skipped_at_build) or "none"))
    lines.append("unreadable now: " + (_counts(stats.unreadable) or "none"))
    return "\n".join(lines)


def _counts(counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items()) if v)


def prompt_segments(view: SampleView, tokenizer) -> list[tuple[str, bool]]:
    """The prompt as (text, carries loss) pieces, each run of <image> tokens collapsed."""
    segments: list[tuple[str, bool]] = []
    i, n = 0, len(view.tokens)
    while i < n:
        j = i
        if view.tokens[i] == tokenizer.image_id:
            while j < n and view.tokens[j] == tokenizer.image_id:
                j += 1
            segments.append((f"<image>x{j - i}", bool(view.targets[i])))
        else:
            while j < n and view.tokens[j] != tokenizer.image_id and view.targets[j] == view.targets[i]:
                j += 1
            segments.append((tokenizer.decode(view.tokens[i:j]), bool(view.targets[i])))
        i = j
    return segments


def format_sample(view: SampleView, tokenizer=None) -> str:
    lines = [f"sample {view.key}  ({view.kind}, shard {view.shard})", f"tiles: {view.num_tiles}"]
    for k, item in enumerate(view.media):
        if item["type"] == "image":
            cols, rows = item["grid"]
            lines.append(f"  media {k}: image, grid {cols}x{rows}"
                         f"{' + thumbnail' if item['thumbnail'] else ''} = {item['tiles']} tiles")
        else:
            times = ", ".join(f"{t:.2f}" for t in item["times"])
            lines.append(f"  media {k}: video, {item['tiles']} frames at [{times}] s")
    if tokenizer is not None and view.tokens:
        lines.append(f"tokens: {len(view.tokens)} ({view.placeholder_tokens} image placeholders, "
                     f"{sum(view.targets)} with loss; loss marked [[...]])")
        lines.append("".join(f"[[{text}]]" if loss else text for text, loss in prompt_segments(view, tokenizer)))
    return "\n".join(lines)


# ---- HTML rendering ---------------------------------------------------------------------------
def _png_data_url(tile: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(view: SampleView, tokenizer=None) -> str:
    parts = [f"<h2>sample {html.escape(view.key)}</h2>",
             f"<p>{html.escape(view.kind)}, shard {html.escape(view.shard)}, {view.num_tiles} tiles</p>"]
    cursor = 0
    for k, item in enumerate(view.media):
        tiles = view.tiles[cursor: cursor + item["tiles"]]
        cursor += item["tiles"]
        if item["type"] == "image":
            cols, rows = item["grid"]
            grid = tiles[: cols * rows]
            cells = "".join(f'<img class="tile" src="{_png_data_url(t)}">' for t in grid)
            parts.append(f"<h3>media {k}: image {cols}x{rows}</h3>"
                         f'<div class="grid" style="grid-template-columns: repeat({cols}, auto)">{cells}</div>')
            if item["thumbnail"]:
                parts.append(f'<p>thumbnail</p><img class="tile" src="{_png_data_url(tiles[-1])}">')
        else:
            cells = "".join(f'<figure><img class="tile" src="{_png_data_url(t)}"><figcaption>{s:.2f} s'
                            f"</figcaption></figure>" for t, s in zip(tiles, item["times"]))
            parts.append(f'<h3>media {k}: video, {item["tiles"]} frames</h3><div class="frames">{cells}</div>')
    if tokenizer is not None and view.tokens:
        body = "".join(f'<span class="loss">{html.escape(t)}</span>' if loss else html.escape(t)
                       for t, loss in prompt_segments(view, tokenizer))
        parts.append(f"<h3>prompt ({len(view.tokens)} tokens; loss highlighted)</h3><pre>{body}</pre>")
    style = (".grid{display:grid;gap:2px} .frames{display:flex;flex-wrap:wrap;gap:4px} "
             ".tile{width:128px;image-rendering:pixelated;border:1px solid #888} "
             ".loss{background:#ffe08a} pre{white-space:pre-wrap}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_vlm.data_prep.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="shard directory, manifest, brace glob or a::b list")
    parser.add_argument("--tokenizer", help="tokenizer directory: adds token counts and the prompt")
    parser.add_argument("--sample", help="render the sample with this key instead of statistics")
    parser.add_argument("--html", help="with --sample: also write the rendering to this HTML file")
    parser.add_argument("--tile-size", type=int, help="tile size in px (default: the manifest's)")
    parser.add_argument("--patch-size", type=int, default=16, help="vision patch size (default 16)")
    parser.add_argument("--pixel-shuffle-ratio", type=float, default=0.5,
                        help="pixel shuffle ratio (default 0.5)")
    args = parser.parse_args(argv)
    try:
        tokenizer = None
        if args.tokenizer:
            from megatron_vlm.data.tokenizer import VLMTokenizer

            tokenizer = VLMTokenizer.from_pretrained(args.tokenizer)
        inspector = Inspector(args.shards, tokenizer, args.tile_size, args.patch_size,
                              args.pixel_shuffle_ratio)
        if args.sample:
            view = inspector.find(args.sample)
            print(format_sample(view, tokenizer))
            if args.html:
                with open(args.html, "w", encoding="utf-8") as f:
                    f.write(render_html(view, tokenizer))
                print(f"wrote {args.html}")
        else:
            print(format_stats(inspector.stats(), len(inspector.urls)))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"inspect: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
