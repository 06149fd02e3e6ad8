"""Cost of the synchronized LR sweep against the same number of plain training steps, in one run.

    python benchmarks/sweep_cost.py [--steps 40] [key=value ...]                       # one process
    accelerate launch --multi_gpu --num_processes 2 benchmarks/sweep_cost.py ...      # real DDP

The sweep adds a snapshot and restore of model/optimizer/RNG state, one all-reduce of two scalars
per step and a host sync per step (to decide the stop). Plain steps sync only at the end. Each is
timed twice, alternating, and the faster of each is kept. Target: ratio <= 1.05. The ratio is printed last.
"""

from __future__ import annotations

import argparse
import time

from disttrain.build import build_trainer
from disttrain.config import load_config
from disttrain.demo_data import write_demo_data
from disttrain.lr_sweep import lr_sweep
from disttrain.runtime import build_accelerator


def plain_steps(trainer, steps: int) -> float:
    sampler = trainer.train_loader.batch_sampler
    sampler.set_epoch(0)
    t0 = time.perf_counter()
    done, total = 0, None
    while done < steps:
        for group in trainer.groups(iter(trainer.train_loader), min(len(trainer.train_loader), steps - done)):
            loss_sum, _ = trainer.step(group)
            total = loss_sum if total is None else total + loss_sum
            done += 1
    total.item()  # wait for the device, as the sweep's last step does
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data", default="~/.cache/disttrain/mnist")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    write_demo_data(args.data)
    cfg = load_config(
        "configs/demo.yaml",
        [f"data.root={args.data}", "log.progress=false", f"sweep.num_iter={args.steps}",
         "sweep.start_lr=1e-6", "sweep.end_lr=1e-3", "sweep.divergence=1e9"] + args.overrides,
    )
    accelerator = build_accelerator(cfg)
    trainer, _ = build_trainer(cfg, accelerator)
    plain_steps(trainer, 5)  # warm-up: workers started, kernels chosen
    plain, sweep = [], []
    for _ in range(2):
        plain.append(plain_steps(trainer, args.steps))
        t0 = time.perf_counter()
        result = lr_sweep(trainer, cfg.sweep)
        sweep.append(time.perf_counter() - t0)
        assert result.iterations == args.steps, "the benchmark sweep must not stop early"
    if accelerator.is_main_process:
        world = accelerator.num_processes
        print(f"device {accelerator.device.type}, {world} process(es), global batch {cfg.data.batch_size * world}, {args.steps} steps")
        print(f"plain steps: {min(plain):.2f} s ({[round(p, 2) for p in plain]})")
        print(f"LR sweep:    {min(sweep):.2f} s ({[round(s, 2) for s in sweep]})")
        print(f"ratio sweep/plain={min(sweep) / min(plain):.3f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
