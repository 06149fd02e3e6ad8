"""Run by test_lr_sweep_distributed.py under a real launcher.

`real OUT overrides...`: the real sweep on real data; every rank compares everything a training step
or the sweep can touch (model parameters and buffers, optimizer moments, step counts and group
hyperparameters, grad scaler, schedule, Python / NumPy / torch RNGs, the augmentation generator, the
train loader's epoch) before the sweep, just before its restore, and after it, and writes what it
found. The state just before the restore must differ for every item (so the comparison after it
means something): what the sweep itself does not change (the global RNGs, the schedule, the
loader's epoch) is changed there by this worker, the way dropout, a stepped schedule or another
epoch would.
`constructed OUT`: the real all-reduce fed losses built so that each rank, alone, would stop at a
different step; every rank writes where the shared curve stopped.
"""

import copy
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from disttrain.config import SweepConfig
from disttrain.models.checks import load_config
from disttrain.dist.runtime import build_runtime


def state_of(trainer) -> dict:
    """Deep copies of every piece of state the sweep must leave as it found it."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    optimizer = trainer.optimizer.state_dict()
    scaler = trainer.accelerator.scaler
    return copy.deepcopy({
        "parameters": {k: v.detach() for k, v in model.named_parameters()},
        "buffers": {k: v.detach() for k, v in model.named_buffers()},
        "optimizer_state": optimizer["state"],
        "optimizer_groups": optimizer["param_groups"],
        "scaler": None if scaler is None else scaler.state_dict(),
        "schedule": trainer.schedule.state_dict(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
        "augment": trainer.augment.state_dict()["generator"],
        "loader_epoch": trainer.train_loader.epoch,
    })


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def real(out: Path, overrides: list[str]) -> None:
    import disttrain.train.lr_sweep as lr_sweep_module
    from disttrain.train.build import build_trainer

    cfg = load_config(None, overrides)
    runtime = build_runtime(cfg)
    accelerator = runtime.accelerator
    trainer, _ = build_trainer(cfg, runtime)
    trainer.train_epoch(0)  # optimizer state (Adam moments, step counts) exists and must survive the sweep too
    before = state_of(trainer)
    during = {}
    real_restore = lr_sweep_module.restore

    def restore_after_changing_the_rest(trainer_, state):
        # what the sweep's steps do not touch here is changed now, so its restore must undo it too
        random.random()
        np.random.rand()
        torch.rand(1)
        trainer_.schedule.step()  # LR and one-cycle betas of every group, and the schedule's step count
        trainer_.train_loader.set_epoch(trainer_.train_loader.epoch + 7)
        during.update(state_of(trainer_))
        real_restore(trainer_, state)

    lr_sweep_module.restore = restore_after_changing_the_rest  # find_lr -> lr_sweep looks it up at the call
    lr_sweep_module.find_lr(trainer, cfg.sweep, cfg.run.dir, trainer.reporter)
    after = state_of(trainer)
    assert during, "the sweep did not call restore"
    report = {key: {"changed": not equal(before[key], during[key]), "restored": equal(before[key], after[key])}
              for key in before if key != "scaler"}
    report["scaler"] = {"before": before["scaler"], "after": after["scaler"]}
    report["sizes"] = {"buffers": len(before["buffers"]), "optimizer_state": len(before["optimizer_state"]),
                       "moments": sorted(next(iter(before["optimizer_state"].values()), {}))}
    (out / f"state.rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.end_training()


def constructed(out: Path) -> None:
    from disttrain.models.checks import build_config
    from disttrain.train.lr_sweep import run_curve

    accelerator = build_runtime(build_config({}, ["train.precision=no"])).accelerator
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
