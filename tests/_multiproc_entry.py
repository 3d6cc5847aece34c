"""Per-rank entry point used by tests/multiproc.py (not a test module)."""

import importlib
import json
import os
import sys
import traceback
from pathlib import Path


def main() -> int:
    target, tmp = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ.get("RANK", 0))
    try:
        from megatron_vlm.known_warnings import ignore_known_noise
        from megatron_vlm.platform import setup_platform

        ignore_known_noise()
        setup_platform()
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(**json.loads((tmp / "kwargs.json").read_text()))
        (tmp / f"rank{rank}.json").write_text(json.dumps(result))
        return 0
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit from asserts
        (tmp / f"rank{rank}.err").write_text(traceback.format_exc())
        return 1
    finally:
        from megatron_vlm.distributed import destroy_distributed

        try:
            destroy_distributed()
        except Exception:  # noqa: BLE001 - teardown after a failure must not hide it
            pass


if __name__ == "__main__":
    sys.exit(main())
