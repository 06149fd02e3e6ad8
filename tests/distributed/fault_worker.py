"""The real `train()` with one injected fault on rank 1 at a given global step: `raise` (an
exception) or `kill` (SIGKILL of the process, on the elastic agent's first attempt only)."""

import os
import signal
import sys

from disttrain.cli import run_user_errors, train
from disttrain.config import load_config
from disttrain.trainer import Trainer

mode, at, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_step = Trainer.step


def faulty_step(self, batches):
    if self.accelerator.process_index == 1 and self.global_step == at:
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank 1 at step {at}")
        if mode == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, batches)


Trainer.step = faulty_step
sys.exit(run_user_errors(lambda: train(load_config("configs/demo.yaml", overrides))))
