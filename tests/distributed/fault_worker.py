"""The real `train()` with one injected fault at a given global step (the number of optimizer steps
done when `Trainer.step` is called):

    fault_worker.py MODE STEP MARKERS [section.key=value ...]

Every rank writes MARKERS/pid-rank<R> (its pid) when it starts.
`raise`: rank 1 writes MARKERS/raised (its time.time()) and raises.
`kill`:  rank 1 SIGKILLs itself, on the elastic agent's first attempt only.
`hold`:  every rank writes MARKERS/held-rank<R> (its pid) and holds still until MARKERS/go exists;
         a rank named in `go` (one rank number per line: the ranks the test signalled) also waits
         until its own preemption flag is set, so the signal is in before training goes on.
"""

import os
import signal
import sys
import time
from pathlib import Path


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


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    Trainer.step = faulty_step
    _write(markers / f"pid-rank{os.environ['RANK']}", f"{os.getpid()}\n")
    sys.exit(run_user_errors(lambda: train(load_config("configs/demo.yaml", overrides))))
