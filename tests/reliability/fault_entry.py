"""torchrun entry for the one-rank-failure test: the real ``megatron_vlm.train`` CLI, with the train
step of one rank raising at one step (``FAIL_RANK``, ``FAIL_AT_STEP``). Before raising, that rank
writes the time to ``FAIL_STAMP`` so the test can measure how long the job takes to stop."""

import os
import sys
import time


def main() -> int:
    from megatron_vlm.training import loop

    fail_rank, fail_step = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_AT_STEP"])
    real_step, calls = loop.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if int(os.environ["RANK"]) == fail_rank and calls[0] == fail_step:
            with open(os.environ["FAIL_STAMP"], "w") as f:
                f.write(str(time.time()))
            raise ValueError("injected by the test: rank %d at step %d" % (fail_rank, fail_step))
        return real_step(*args, **kwargs)

    loop.train_step = train_step
    from megatron_vlm.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
