"""Run by test_distributed.py under a real launcher: train a few steps, then every rank saves its
own copy of the weights so the test can compare them."""

import sys
from pathlib import Path

import torch

from disttrain.train.build import build_trainer
from disttrain.models.checks import load_config
from disttrain.dist.runtime import build_runtime

if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    out = Path(sys.argv[1])
    cfg = load_config(None, sys.argv[2:])
    runtime = build_runtime(cfg)
    accelerator = runtime.accelerator
    trainer, _ = build_trainer(cfg, runtime)
    model = accelerator.unwrap_model(trainer.model)
    if accelerator.is_main_process:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "init.pt")
    trainer.train_epoch(0)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()
