"""`make demo`: generate the demo corpus, train the tiny base + Stage 0-4 recipes on 2 CPU
processes, and print the stage table.

    python -m tools.demo [--data demo_data] [--workdir runs/tiny] [--nproc 2]

Re-running continues where it stopped: finished stages are skipped, an interrupted stage resumes
from its latest checkpoint.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("demo_data"),
                    help="demo corpus directory (the tiny recipes read demo_data/)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    if not (REPO / args.data / "datasets.json").is_file():
        print(f"== generating the demo corpus in {args.data}", flush=True)
        subprocess.run([sys.executable, "-m", "data_prep.make_demo_data", "--out", str(args.data)],
                       cwd=REPO, check=True)
    else:
        print(f"== demo corpus already in {args.data}", flush=True)
    subprocess.run([sys.executable, str(REPO / "tools" / "run_stages.py"), "--recipes",
                    "recipes/tiny", "--workdir", str(args.workdir), "--nproc", str(args.nproc)],
                   cwd=REPO, check=True)
    print(f"\ndemo finished in {(time.monotonic() - t0) / 60:.1f} min; TensorBoard: "
          f"tensorboard --logdir {args.workdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
