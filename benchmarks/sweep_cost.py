"""Cost of the synchronized LR sweep against the same number of plain training steps, in one run.

    python benchmarks/sweep_cost.py [--steps 100] [key=value ...]                       # one process
    accelerate launch --multi_gpu --num_processes 2 benchmarks/sweep_cost.py ...      # real DDP

The sweep adds a snapshot and restore of model/optimizer/RNG state, one all-reduce of two scalars
per step and a host sync per step (to decide the stop). Plain steps walk the same LRs from the same
state (restored before each timing, untimed: a step's time depends on the state it starts from; on
this CPU steps from a fresh optimizer state were 1.2x slower than steps from a trained one) and sync
only at the end. Each is
timed --repeats times, in alternating order, and the fastest of each is kept. Target: ratio <= 1.05. The ratio is printed last.
"""

from __future__ import annotations

import argparse
import time

from disttrain.train.build import build_trainer
from disttrain.models.checks import load_config
from disttrain.data.demo import write_demo_data
from disttrain.train.lr_sweep import lr_sweep, restore, snapshot, sweep_lrs
from disttrain.dist.runtime import build_runtime


def plain_steps(trainer, lrs: list[float]) -> None:
    """One plain training step per LR in `lrs` (the sweep's own LR sequence: on a CPU the step time
    depends on the LR, 0.96x vs 1.18x measured, so both must walk the same LRs to isolate the
    sweep's own cost). No per-step sync; one at the end."""
    trainer.train_loader.set_epoch(0)
    done, total = 0, None
    while done < len(lrs):
        n = min(len(trainer.train_loader), len(lrs) - done)
        for group in trainer.groups(iter(trainer.train_loader), n):
            for param_group in trainer.optimizer.param_groups:
                param_group["lr"] = lrs[done]
            loss_sum, _ = trainer.step(group)
            total = loss_sum if total is None else total + loss_sum
            done += 1
    total.item()  # wait for the device, as the sweep's last step does


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="sweep.num_iter, and as many plain steps")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each kind; the fastest is kept")
    parser.add_argument("--data", default="~/.cache/disttrain/mnist")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    write_demo_data(args.data)
    cfg = load_config(
        "configs/demo.yaml",
        [f"data.root={args.data}", "log.progress=false", f"sweep.num_iter={args.steps}",
         "sweep.start_lr=1e-6", "sweep.end_lr=1e-3", "sweep.divergence=1e9", "log.wandb.mode=disabled"] + args.overrides,
    )
    runtime = build_runtime(cfg)
    accelerator = runtime.accelerator
    trainer, _ = build_trainer(cfg, runtime)
    lrs = sweep_lrs(cfg.sweep.start_lr, cfg.sweep.end_lr, cfg.sweep.num_iter)
    plain_steps(trainer, lrs[:5])  # warm-up: workers started, kernels chosen
    inside = []  # seconds spent inside trainer.step, per step
    trainer.observe_steps(inside.append)
    start = snapshot(trainer)  # every timing starts from this state (untimed for the plain steps)
    plain, sweep, machinery = [], [], []
    for rep in range(args.repeats):
        for kind in ("plain", "sweep") if rep % 2 == 0 else ("sweep", "plain"):  # alternate the order
            restore(trainer, start)
            t0 = time.perf_counter()
            if kind == "plain":
                plain_steps(trainer, lrs)
                plain.append(time.perf_counter() - t0)
            else:
                inside.clear()
                result = lr_sweep(trainer, cfg.sweep)
                sweep.append(time.perf_counter() - t0)
                machinery.append(sweep[-1] - sum(inside))
                assert result.iterations == args.steps, "the benchmark sweep must not stop early"
    if accelerator.is_main_process:
        world = accelerator.num_processes
        print(f"device {accelerator.device.type}, {world} process(es), global batch {cfg.data.batch_size * world}, {args.steps} steps")
        print(f"plain steps: {min(plain):.2f} s ({[round(p, 2) for p in plain]})")
        print(f"LR sweep:    {min(sweep):.2f} s ({[round(s, 2) for s in sweep]})")
        print(
            f"sweep machinery (outside the training steps: snapshot, restore, collectives, stop rule): "
            f"{min(machinery):.3f} s = {min(machinery) / min(sweep):.1%} of the sweep"
        )
        print(f"ratio sweep/plain={min(sweep) / min(plain):.3f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
