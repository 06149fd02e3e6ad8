"""Run by the distributed tests under a real launcher: the real run (disttrain.train.run.train, staged or not,
as launch/train.py runs it) with two test-only hooks:

    run_worker.py CONFIG [--dump OUT] [--kill-after CHECKPOINT] [--stall RANK] [section.key=value ...]

- `--dump OUT`: every rank saves OUT/stage<i>-rank<R>.pt right after the last training step of each stage, before
  the evaluation takes rank 0's BatchNorm statistics: its own parameters, buffers, optimizer state
  and which parameters were trainable, as that rank computed them;
- `--kill-after step-00000006`: every rank SIGKILLs itself once that checkpoint is complete (after
  the save's last barrier): the job dies at a fixed step, not at a time;
- `--stall 1`: rank 1's validation loader worker never delivers a batch (tests/distributed/stall_hook.py).
"""

import os
import signal
import sys
from pathlib import Path

import torch

import disttrain.train.checkpoint as checkpoint
from disttrain.cli import run_user_errors
from disttrain.models.checks import load_config
from disttrain.train.run import train
from disttrain.train.trainer import Trainer

config, words = sys.argv[1], sys.argv[2:]
out = kill_after = stall = None
while words[:1] in (["--dump"], ["--kill-after"], ["--stall"]):
    if words[0] == "--dump":
        out = Path(words[1])
    elif words[0] == "--kill-after":
        kill_after = words[1]
    else:
        stall = int(words[1])
    words = words[2:]
real_epoch, real_save = Trainer.train_epoch, checkpoint.save_checkpoint


def epoch_and_dump(self: Trainer, epoch: int, skip_steps: int = 0):
    result = real_epoch(self, epoch, skip_steps)
    if out is not None and epoch == self.epochs - 1:  # the stage's last training step is done; nothing synced since
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in self.module.named_parameters()},
                "trainable": sorted(k for k, v in self.module.named_parameters() if v.requires_grad),
                "buffers": {k: v.detach().clone() for k, v in self.module.named_buffers()},
                "optimizer": optimizer.state_dict(),
                "lrs": [group["lr"] for group in optimizer.param_groups],
            },
            out / f"stage{self.stage}-rank{self.accelerator.process_index}.pt",
        )
    return result


def save_then_kill(*args, **kwargs):
    final = real_save(*args, **kwargs)
    if final.name == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return final


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    Trainer.train_epoch = epoch_and_dump
    checkpoint.save_checkpoint = save_then_kill  # Checkpointer.save looks it up in the module at call time
    if stall is not None:
        import disttrain.data.setup
        import stall_hook

        stall_hook.stall_rank = stall
        disttrain.data.setup.FolderDataset = stall_hook.StallingFolderDataset  # looked up there when the loaders are built
    sys.exit(run_user_errors(lambda: train(load_config(config, words))))
