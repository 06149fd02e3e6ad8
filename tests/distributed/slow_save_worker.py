"""The real `train()` (as launch/train.py runs it) with a test-only hook that makes the main process's
part of one checkpoint save outlast `train.collective_timeout`:

    slow_save_worker.py STEP MARKERS [section.key=value ...]

In the save of global step STEP, rank 1 writes MARKERS/rank1-saved once its own file is written (it
then waits in the save's barrier); rank 0, before it writes shared.pt, waits for that marker and then
holds still for 1.5 x train.collective_timeout: a large model on a slow filesystem.
"""

import os
import sys
import time
from pathlib import Path

HOLD_LIMIT = 120  # seconds: a rank 1 that never gets to the save fails the test instead of hanging it


def main() -> int:
    import torch

    import disttrain.train.checkpoint as checkpoint
    from disttrain.cli import run_user_errors, train
    from disttrain.models.checks import load_config

    at, markers, overrides = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    cfg = load_config("configs/demo.yaml", overrides)
    target, marker, real_save = checkpoint.step_name(at) + ".tmp", markers / "rank1-saved", torch.save

    def save(obj, f, *args, **kwargs):
        path = Path(f) if isinstance(f, (str, os.PathLike)) else None
        if path is not None and path.parent.name == target and path.name == "shared.pt":
            deadline = time.monotonic() + HOLD_LIMIT
            while not marker.exists():  # rank 1 has written its part: it waits in the barrier from here
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank 1 did not get to the save of step {at} within {HOLD_LIMIT} s")
                time.sleep(0.02)
            time.sleep(1.5 * cfg.train.collective_timeout)  # the slow save: what the test is about
        real_save(obj, f, *args, **kwargs)
        if path is not None and path.parent.name == target and path.name == "rank1.pt":
            part = marker.with_name(marker.name + ".part")
            part.write_text("written\n")
            os.replace(part, marker)

    torch.save = save  # disttrain.train.checkpoint calls torch.save through the torch module
    return run_user_errors(lambda: train(cfg))


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    sys.exit(main())
