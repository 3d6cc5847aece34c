"""PNG plots of the scaling curves in ``results.md``, written beside it (``make bench`` ends here).

Read back from the markdown tables (so a plot always shows the numbers of the table beside it):

* ``scaling_llm.png``: tokens/s against sequence length for each column of the Hybrid LLM table
  (SSD scan, Mamba2 layer, attention layer, training steps);
* ``scaling_vs_hf.png``: training-step tokens/s against sequence length, ours and
  ``transformers`` (the bench_vs_hf table; the VLM rows too when present).

Drawn with Pillow (matplotlib is not a dependency): log-log axes, one colour per curve.

    python -m bench.plots [--results bench/results.md]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from PIL import Image, ImageDraw, ImageFont

Series = Dict[str, List[Tuple[float, float]]]
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _number(cell: str) -> float:
    return float(cell.replace(",", "").replace("x", "").strip())


def _length(text: str) -> int:
    m = re.search(r"(\d+)K\b", text)
    return int(m.group(1)) * 1024 if m else int(re.search(r"\d+", text).group(0))


def _table(markdown: str, heading: str) -> List[List[str]]:
    """The rows (cells) of the first table under the ``## heading...`` section."""
    start = markdown.find(f"## {heading}")
    if start < 0:
        return []
    rows = []
    for line in markdown[start:].splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows


def llm_series(markdown: str) -> Series:
    rows = _table(markdown, "Hybrid LLM")
    if len(rows) < 2:
        return {}
    head, body = rows[0], rows[1:]
    series: Series = {}
    for j, name in enumerate(head[1:], start=1):
        if "/" in name:  # a ratio column
            continue
        series[name.replace("`", "")] = [(_length(r[0]), _number(r[j])) for r in body]
    return series


def vs_hf_series(markdown: str) -> Series:
    series: Series = {}
    for r in _table(markdown, "Ours vs transformers")[1:]:
        m = re.match(r"training step (\S+)(?: (VLM))?", r[0])
        if not m:
            continue
        what = "VLM" if m.group(2) or "VLM" in r[0] else "LLM"
        series.setdefault(f"ours {what}", []).append((_length(m.group(1)), _number(r[1])))
        series.setdefault(f"transformers {what}", []).append((_length(m.group(1)), _number(r[2])))
    return series


def plot(series: Series, title: str, out: Path, size=(900, 560)) -> None:
    """Log-log line plot of ``series`` (name -> [(x, y)]), legend at the right."""
    w, h = size
    left, right, top, bottom = 80, 260, 40, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts if y > 0]
    lx0, lx1 = math.log2(min(xs)), math.log2(max(xs))
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    lx1 = lx1 if lx1 > lx0 else lx0 + 1
    ly1 = ly1 if ly1 > ly0 else ly0 + 1

    def at(x, y):
        px = left + (math.log2(x) - lx0) / (lx1 - lx0) * (w - left - right)
        py = h - bottom - (math.log10(y) - ly0) / (ly1 - ly0) * (h - top - bottom)
        return px, py

    d.rectangle((left, top, w - right, h - bottom), outline="black")
    for e in range(ly0, ly1 + 1):  # decades, with 2x and 5x grid lines
        for m in (1, 2, 5):
            y = m * 10 ** e
            if ly0 <= math.log10(y) <= ly1:
                py = at(min(xs), y)[1]
                d.line((left, py, w - right, py), fill=(225, 225, 225) if m > 1 else (190, 190, 190))
                if m == 1 or ly1 - ly0 <= 2:
                    d.text((5, py - 6), f"{y:,.0f}", fill="black", font=font)
    for x in sorted(set(xs)):
        px = at(x, 10 ** ly0)[0]
        d.line((px, top, px, h - bottom), fill=(225, 225, 225))
        d.text((px - 10, h - bottom + 6), f"{x // 1024}K" if x % 1024 == 0 else str(x),
               fill="black", font=font)
    d.text((left, 12), title, fill="black", font=font)
    d.text(((w - right + left) // 2 - 40, h - 25), "sequence length (tokens)", fill="black", font=font)
    d.text((5, top - 22), "tokens/s", fill="black", font=font)
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        dots = [at(x, y) for x, y in sorted(pts) if y > 0]
        if len(dots) > 1:
            d.line(dots, fill=color, width=3)
        for px, py in dots:
            d.ellipse((px - 4, py - 4, px + 4, py + 4), fill=color)
        ly = top + 10 + 20 * i
        d.line((w - right + 15, ly + 6, w - right + 45, ly + 6), fill=color, width=3)
        d.text((w - right + 52, ly), name[:30], fill="black", font=font)
    img.save(out)


def write_plots(results: Path) -> List[Path]:
    markdown = results.read_text()
    written = []
    for name, series, title in (
            ("scaling_llm.png", llm_series(markdown),
             "Tiny Nemotron-H on CPU: tokens/s by sequence length (bench_llm)"),
            ("scaling_vs_hf.png", vs_hf_series(markdown),
             "Training step tokens/s: ours vs transformers, same weights (bench_vs_hf)")):
        if series:
            plot(series, title, results.parent / name)
            written.append(results.parent / name)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results.md")
    args = ap.parse_args(argv)
    for path in write_plots(args.results):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
