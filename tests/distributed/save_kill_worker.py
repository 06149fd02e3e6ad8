"""The real `train()` (as launch/train.py runs it) with a test-only hook that freezes one checkpoint
save half-way, for the test to SIGKILL the whole job there:

    save_kill_worker.py WHERE STEP MARKER [section.key=value ...]

The save of global step STEP holds still on the main process (the other ranks wait for it in the
save's barrier), after it wrote MARKER (its pid):
`files`:  right after `shared.pt` went into `step-<STEP>.tmp/` (its own `rank0.pt` is there, `meta.json`
          is not yet);
`rename`: when every file of `step-<STEP>.tmp/` is written and synced, just before the rename.
"""

import os
import sys
import time
from pathlib import Path

import torch

import disttrain.train.checkpoint as checkpoint
from disttrain.cli import run_user_errors, train
from disttrain.models.checks import load_config

where, at, marker, overrides = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
target = checkpoint.step_name(at) + ".tmp"
HOLD_LIMIT = 120  # seconds: a test that never kills the job fails instead of hanging it


def _hold() -> None:
    part = marker.with_name(marker.name + ".part")
    part.write_text(f"{os.getpid()}\n")
    os.replace(part, marker)
    deadline = time.monotonic() + HOLD_LIMIT
    while time.monotonic() < deadline:  # the test-only hook holds the save still until the SIGKILL
        time.sleep(0.05)
    raise RuntimeError(f"the save of step {at} was held {HOLD_LIMIT} s and nothing killed the job")


real_save, real_fsync = torch.save, checkpoint._fsync_dir_files


def save_then_hold(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    path = Path(f) if isinstance(f, (str, os.PathLike)) else None
    if where == "files" and path is not None and path.parent.name == target and path.name == "shared.pt":
        _hold()


def fsync_then_hold(path):
    real_fsync(path)
    if where == "rename" and Path(path).name == target:
        _hold()


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    assert where in ("files", "rename"), where
    torch.save = save_then_hold  # disttrain.train.checkpoint calls torch.save through the torch module
    checkpoint._fsync_dir_files = fsync_then_hold  # looked up in the module at call time by save_checkpoint
    sys.exit(run_user_errors(lambda: train(load_config("configs/demo.yaml", overrides))))
