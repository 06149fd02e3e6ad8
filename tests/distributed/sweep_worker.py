"""Run by test_lr_sweep_distributed.py under a real launcher.

`real OUT overrides...`: the real sweep on real data; every rank checks that model, optimizer, RNG
and augmentation state after the sweep are bitwise equal to before, and writes what it found.
`constructed OUT`: the real all-reduce fed losses built so that each rank, alone, would stop at a
different step; every rank writes where the shared curve stopped.
"""

import copy
import json
import sys
from pathlib import Path

import torch

from disttrain.config import SweepConfig, load_config
from disttrain.runtime import build_accelerator


def state_of(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "rng": torch.get_rng_state().clone(),
        "augment": trainer.augment.state_dict()["generator"].clone(),
        "lrs": [g["lr"] for g in trainer.optimizer.param_groups],
    }


def equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def real(out: Path, overrides: list[str]) -> None:
    from disttrain.build import build_trainer
    from disttrain.lr_sweep import find_lr

    cfg = load_config(None, overrides)
    accelerator = build_accelerator(cfg)
    trainer, _ = build_trainer(cfg, accelerator)
    trainer.train_epoch(0)  # optimizer state (Adam moments) exists and must survive the sweep too
    before = copy.deepcopy(state_of(trainer))
    find_lr(trainer, cfg.sweep, cfg.run.dir, trainer.reporter)
    after = state_of(trainer)
    report = {key: equal(before[key], after[key]) for key in before}
    (out / f"state.rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.end_training()


def constructed(out: Path) -> None:
    from disttrain.config import build_config
    from disttrain.lr_sweep import run_curve

    accelerator = build_accelerator(build_config({}, ["train.precision=no"]))
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = SweepConfig(num_iter=40, beta=0.0, divergence=4.0, skip_start=0, skip_end=0)
    # Rank r's loss jumps from 1 to 6 at step 10 + 5r: alone, rank 0 would stop at step 10 (6 > 4 x 1),
    # rank 1 at 15, rank 2 at 20. The mean first exceeds 4 at step 15 (2 ranks: 6; 3 ranks: 13/3).
    own = [1.0 if i < 10 + 5 * rank else 6.0 for i in range(40)]

    def step(i, lr):
        return torch.tensor(own[i], dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)

    lrs, losses, smoothed, local, stopped = run_curve(step, lambda t: accelerator.reduce(t, reduction="sum"), world, cfg)
    alone = run_curve(step, lambda t: t.clone(), 1, cfg)[0]
    (out / f"constructed.rank{rank}.json").write_text(
        json.dumps({"steps": len(lrs), "own_steps": len(alone), "losses": losses, "stopped": stopped})
    )
    accelerator.end_training()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    real(out, sys.argv[3:]) if mode == "real" else constructed(out)
