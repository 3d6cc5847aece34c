"""Run every benchmark and write one markdown report (``make bench``).

Each ``bench/bench_*.py`` takes ``--out FILE`` and writes a markdown section there.
"""

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "results.md")
    ap.add_argument("--only", nargs="*", help="benchmark file stems to run")
    args = ap.parse_args()
    sections = [f"# megatron-vlm benchmarks\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, "
                f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads\n\nPlots of the scaling curves: "
                "`scaling_llm.png`, `scaling_vs_hf.png` (bench/plots.py).\n"]
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        if args.only and script.stem not in args.only:
            continue
        with tempfile.NamedTemporaryFile(suffix=".md") as tmp:
            print(f"== {script.stem}", flush=True)
            proc = subprocess.run([sys.executable, "-m", f"bench.{script.stem}", "--out", tmp.name],
                                  cwd=HERE.parent)
            if proc.returncode != 0:  # said in the report, so a missing table is never silent
                failed.append(script.stem)
                sections.append(f"## {script.stem}: FAILED (exit code {proc.returncode}); its table is "
                                "missing from this run, see the console log\n")
                continue
            sections.append(Path(tmp.name).read_text())
    args.out.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.out}")
    from bench.plots import write_plots  # the scaling curves, beside the tables they plot

    for png in write_plots(args.out):
        print(f"wrote {png}")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
