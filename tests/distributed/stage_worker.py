"""Run by test_finetune_distributed.py under a real launcher: the real staged run (disttrain.run.train), with
every rank saving, at the end of each stage, its own parameters, buffers, optimizer state and which
parameters were trainable, so the test can compare ranks bitwise."""

import sys
from pathlib import Path

import torch

from disttrain.config import load_config
from disttrain.run import train
from disttrain.trainer import Trainer

out = Path(sys.argv[1])
cfg = load_config(sys.argv[2], sys.argv[3:])
fit = Trainer.fit


def fit_and_dump(self: Trainer, *args, **kwargs):
    result = fit(self, *args, **kwargs)
    rank = self.accelerator.process_index
    optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in self.module.named_parameters()},
            "trainable": sorted(k for k, v in self.module.named_parameters() if v.requires_grad),
            "buffers": {k: v.detach().clone() for k, v in self.module.named_buffers()},
            "optimizer": optimizer.state_dict(),
            "lrs": [group["lr"] for group in optimizer.param_groups],
        },
        out / f"stage{self.stage}-rank{rank}.pt",
    )
    return result


Trainer.fit = fit_and_dump
train(cfg)
