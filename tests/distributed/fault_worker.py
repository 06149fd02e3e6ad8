"""The real `train()` with one injected fault at a given global step (the number of optimizer steps
done when `Trainer.step` is called):

    fault_worker.py MODE STEP MARKERS [section.key=value ...]

Every rank writes MARKERS/pid-rank<R> (its pid) when it starts.
`raise`: rank 1 writes MARKERS/raised (its time.time()) and raises.
`kill`:  rank 1 SIGKILLs itself, on the elastic agent's first attempt only.
`hold`:  every rank writes MARKERS/held-rank<R> (its pid) and holds still until MARKERS/go exists;
         a rank named in `go` (one rank number per line: the ranks the test signalled) also waits
         until its own preemption flag is set, so the signal is in before training goes on.
`save`:  the checkpoint save of global step STEP: the main process writes half of `shared.pt`
         into `step-<STEP>.tmp/`, then MARKERS/saving, and holds still until it is SIGKILLed.
"""

import io
import os
import signal
import sys
import time
from pathlib import Path

import torch

from disttrain.cli import run_user_errors, train
from disttrain.config import load_config
from disttrain.trainer import Trainer

mode, at, markers, overrides = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
real_step = Trainer.step
HOLD_LIMIT = 120  # seconds: a test that never says go fails instead of hanging


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)  # the test never reads a half-written marker


def _hold(trainer) -> None:
    rank = trainer.accelerator.process_index
    _write(markers / f"held-rank{rank}", f"{os.getpid()}\n")
    deadline = time.monotonic() + HOLD_LIMIT
    go = markers / "go"
    while not go.exists():  # the test-only hook holds this rank still until the test says go
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: no {go} within {HOLD_LIMIT} s")
        time.sleep(0.02)
    if str(rank) in go.read_text().split():
        while not trainer.checkpointer.flag.requested:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}: was signalled but its preemption flag is not set")
            time.sleep(0.02)


def faulty_step(self, batches):
    if self.global_step == at:
        rank = self.accelerator.process_index
        if mode == "hold":
            _hold(self)
        elif rank == 1 and mode == "raise":
            _write(markers / "raised", repr(time.time()))
            raise RuntimeError(f"injected failure on rank 1 at step {at}")
        elif rank == 1 and mode == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, batches)


Trainer.step = faulty_step
_write(markers / f"pid-rank{os.environ['RANK']}", f"{os.getpid()}\n")
real_save = torch.save


def half_a_save(obj, path, *args, **kwargs):
    """In the middle of writing shared.pt of step `at`: half the bytes on disk, then hold still."""
    path = Path(path)
    if path.name == "shared.pt" and path.parent.name == f"step-{at:08d}.tmp":
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        _write(markers / "saving", f"{os.getpid()}\n")
        signal.pause()  # until the test's SIGKILL
    return real_save(obj, path, *args, **kwargs)


if mode == "save":
    torch.save = half_a_save
sys.exit(run_user_errors(lambda: train(load_config("configs/demo.yaml", overrides))))
