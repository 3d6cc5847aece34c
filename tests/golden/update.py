"""Regenerate the golden losses: ``python -m tests.golden.update [case ...]`` (``make golden``).

Builds the demo corpus the tests use in a temporary directory, runs each case, shows what changed
and rewrites ``tests/golden/<case>.json``. Run it after a change that is meant to alter numerics
(e.g. a new loss reduction), on the reference build, and commit the files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.golden.cases import CASES, DEMO_SCALE, GOLDEN_DIR, REPO, build_info, mismatches, run_case


def make_workdir(tmp: Path) -> Path:
    """A directory laid out like the repo root, with a fresh demo corpus (as the tests build it)."""
    subprocess.run([sys.executable, "-m", "megatron_vlm.data_prep.make_demo_data", "--out",
                    str(tmp / "demo_data"), "--scale", DEMO_SCALE],
                   cwd=REPO, check=True, capture_output=True)
    (tmp / "recipes").symlink_to(REPO / "recipes")
    return tmp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=sorted(CASES), help="default: all")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        workdir = make_workdir(Path(tmp))
        results = {case: run_case(case, workdir) for case in args.cases}  # all run before any write
    for case, steps in results.items():
        path = GOLDEN_DIR / f"{case}.json"
        if path.exists():
            changes = mismatches(json.loads(path.read_text()), steps)
            print(f"{case}: " + ("unchanged" if not changes else
                                 f"{len(changes)} value(s) changed:\n  " + "\n  ".join(changes)))
        else:
            print(f"{case}: new")
        recipe, overrides = CASES[case]
        record = {"case": case, "recipe": f"recipes/tiny/{recipe}.yaml",
                  "overrides": overrides, "build": build_info(), "steps": steps}
        tmp_path = path.with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(record, indent=1) + "\n")
        tmp_path.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
