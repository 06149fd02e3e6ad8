"""Training steps per second of the demo model in each precision this machine offers, and what
`train.precision=auto` picks here.

    python benchmarks/precision.py                      # the demo's rank: resnet18, 28 px, 32 images, 1 thread
    python benchmarks/precision.py --size 64 --threads 2

Each step is what the trainer does: forward under autocast, cross-entropy in fp32, backward (with
the grad scaler for fp16), AdamW step. Timings are interleaved (no, bf16, no, bf16, ...) and the
best of `--repeats` is kept, so a machine whose speed drifts does not favour one precision. The last
line is the ratio of `auto`'s speed to the fastest measured (target 1.00).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from disttrain.config import ModelConfig, OptimConfig
from disttrain.models.build import build_model
from disttrain.models.optim import build_optimizer
from disttrain.dist.precision import device_facts, resolve_precision

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def offered(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["no", "fp16"] + (["bf16"] if device_facts(device).emulated_bf16 else [])
    return ["no", "bf16"]


def steps_per_second(precision: str, device: torch.device, args) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=args.model), num_classes=10).to(device)
    optimizer = build_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1), model)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        cast = torch.autocast(device.type, dtype=DTYPES[precision]) if precision in DTYPES else contextlib.nullcontext()
        with cast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=28, help="image side (the demo: 28)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (the demo: 32 per rank)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the demo runs 2 processes x 1 thread on 2 cores)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    facts = device_facts(device)
    where = f"{facts.name}, native bf16: {facts.native_bf16}"
    print(f"{args.model}, {args.batch} x {args.size} px, {args.threads} thread(s), {where}, torch {torch.__version__}")

    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for precision in offered(device):
            best[precision] = max(best.get(precision, 0.0), steps_per_second(precision, device, args))
    auto = resolve_precision("auto", device)
    for precision, speed in best.items():
        mark = "  <- auto" if precision == auto.mode else ""
        print(f"{precision:>5}: {speed:7.2f} steps/s  {speed * args.batch:8.1f} images/s{mark}")
    fastest = max(best, key=best.get)
    print(f"auto picks {auto.mode} ({auto.reason}); fastest: {fastest}")
    print(f"ratio auto/fastest={best[auto.mode] / best[fastest]:.2f} (target 1.00)")


if __name__ == "__main__":
    main()
