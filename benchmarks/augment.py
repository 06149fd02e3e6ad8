"""DeviceAugment throughput and its share of a ResNet-50 training step, on the available device.

    python benchmarks/augment.py [--batch 256] [--size 224] [--load-size 256] [--steps N]

Input: a uint8 batch of presized squares already on the device (what the loader delivers). The
augmentation is the default `augment.*` (random-resized-crop, flip, rotation, zoom, lighting,
normalize, channels_last). The training step is ResNet-50 forward + backward + SGD step under bf16
autocast, channels_last, at the same batch. Target on a GPU: augmentation < 5% of the step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision

from disttrain.config import AugmentConfig
from disttrain.data.augment import DeviceAugment


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, steps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--load-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="timed calls (default: 50 on CUDA, 2 on CPU)")
    parser.add_argument("--model", default="resnet50")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    steps = args.steps or (50 if device.type == "cuda" else 2)
    print(f"device: {name}, batch {args.batch}, {args.load_size} px uint8 -> {args.size} px, {steps} timed calls")

    images = torch.randint(0, 256, (args.batch, 3, args.load_size, args.load_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    augment = DeviceAugment(AugmentConfig(), args.size, seed=0)
    aug_s = seconds_per_call(lambda: augment(images, train=True), device, steps)
    print(f"DeviceAugment: {args.batch / aug_s:.0f} images/s ({aug_s * 1000:.1f} ms per batch)")

    model = torchvision.models.get_model(args.model, num_classes=1000).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = augment(images, train=True)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = seconds_per_call(train_step, device, steps)
    print(f"{args.model} training step (bf16, channels_last): {args.batch / step_s:.0f} images/s ({step_s * 1000:.0f} ms per step)")
    print(f"augmentation share of a step: {aug_s / (aug_s + step_s) * 100:.2f}% (target on a GPU: < 5%)")


if __name__ == "__main__":
    main()
