"""megatron_vlm.data_prep.inspect on built shards: per-sample tile and placeholder counts, stats, CLI."""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from pathlib import Path

from megatron_vlm.data_prep import inspect as shard_inspect

from .conftest import PATCH

TOKENS_PER_TILE = 4  # 32 px tiles, patch 8, pixel shuffle 0.5


def _tile_members(shard_dir: str) -> Counter:
    """Tile members per sample key, counted straight from the tar files."""
    counts: Counter = Counter()
    for tar in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(tar) as f:
            for name in f.getnames():
                key, _, suffix = name.partition(".")
                counts[key] += 0
                if re.fullmatch(r"m\d\d\.(t\d\d|f\d\d\d)\.(png|jpg)", suffix):
                    counts[key] += 1
    return counts


def test_each_sample_shows_its_tiles_and_placeholders(dataset_a, tokenizer):
    inspector = shard_inspect.Inspector(dataset_a, tokenizer, patch_size=PATCH)
    expected = _tile_members(dataset_a)
    views = [v for v in inspector.samples() if not isinstance(v, tuple)]
    assert len(views) == len(expected) == 48
    for view in views:
        assert view.num_tiles == expected[view.key] == sum(m["tiles"] for m in view.media)
        assert view.placeholder_tokens == TOKENS_PER_TILE * view.num_tiles
        text = shard_inspect.format_sample(view, tokenizer)
        runs = [int(n) for n in re.findall(r"<image>x(\d+)", text)]
        assert runs == [TOKENS_PER_TILE * m["tiles"] for m in view.media], text
        for item in view.media:  # grid tiles + thumbnail add up
            cols, rows = item["grid"]
            assert item["tiles"] == cols * rows + int(item["thumbnail"])


def test_stats_and_cli(dataset_a, tokenizer_dir, tmp_path, capsys):
    assert shard_inspect.main([dataset_a, "--tokenizer", tokenizer_dir, "--patch-size", str(PATCH)]) == 0
    out = capsys.readouterr().out
    expected = _tile_members(dataset_a)
    assert "samples: 48" in out
    histogram = Counter(expected.values())
    for tiles, count in histogram.items():
        assert re.search(rf"^\s+{tiles} \| #+ {count}$", out, re.M), (tiles, count, out)
    key = next(k for k, n in expected.items() if n > 0)
    page = tmp_path / "s.html"
    assert shard_inspect.main([dataset_a, "--tokenizer", tokenizer_dir, "--patch-size", str(PATCH),
                               "--sample", key, "--html", str(page)]) == 0
    assert page.read_text().count('class="tile"') == expected[key]
    assert shard_inspect.main([dataset_a, "--sample", "no-such-key"]) == 2
    assert "no readable sample with key 'no-such-key'" in capsys.readouterr().err
