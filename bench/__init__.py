"""Benchmarks (`make bench`): each module prints a markdown section; run_all collects them."""

import os


def load_average() -> str:
    """The machine's 1/5/15-minute load, for the note under a table (shared cores distort timings)."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def emit(lines: list, out=None) -> str:
    """Print a benchmark's markdown lines and, given a path, write them there too."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)
    return text
