"""The real `train()` with one injected fault: rank 1 raises at a given global step."""

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
    return real_step(self, batches)


Trainer.step = faulty_step
sys.exit(run_user_errors(lambda: train(load_config("configs/demo.yaml", overrides))))
