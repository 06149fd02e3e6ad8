"""Training throughput through the real Trainer: device-resident synthetic data (the ceiling) vs the
real pipeline from shards (workers decode, pinned uint8 batches, prefetching copy, DeviceAugment),
plus the batched nvJPEG decoder. Used by benchmarks/gpu_check.sh; runs on a CPU too (small settings).

    python benchmarks/gpu_throughput.py --shards DIR [--model resnet50] [--batch 256] [--steps 30]
        [--workers 12] [--decode cpu|gpu]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from disttrain.train.build import build_trainer
from disttrain.models.checks import load_config
from disttrain.data.decode import decode_jpeg_batch
from disttrain.data.shards import load_manifest, read_range
from disttrain.dist.runtime import build_runtime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="output of `disttrain prepare`")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each kind (after 5 warm-up steps)")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--decode", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--load-size", type=int, default=256)
    args = parser.parse_args()

    cfg = load_config(None, [
        f"data.root={args.shards}", "data.format=shards", f"data.decode={args.decode}", f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}", f"data.image_size={args.size}", f"data.load_size={args.load_size}",
        f"model.name={args.model}", "train.precision=bf16", "optim.lr=0.1", "optim.name=sgd", "log.progress=false",
        "run.name=gpu_throughput", "run.output_dir=/tmp/disttrain-bench", "log.wandb.mode=disabled",
    ])
    runtime = build_runtime(cfg)
    accelerator = runtime.accelerator
    trainer, _ = build_trainer(cfg, runtime)
    device = accelerator.device
    warmup = 5

    # the ceiling: one uint8 batch resident on the device, augmented and trained on every step
    images = torch.randint(0, 256, (args.batch, 3, args.load_size, args.load_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (args.batch,), device=device)
    for step in range(warmup + args.steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        trainer.step([(images, labels)])
    sync(device)
    ceiling = args.batch * args.steps / (time.perf_counter() - start)
    print(f"synthetic device-resident data (ceiling): {ceiling:.0f} images/s")

    # the real pipeline: the same step fed by the shard loader
    def batches():
        for epoch in itertools.count():
            trainer.train_loader.set_epoch(epoch)
            yield from trainer.train_loader

    stream = batches()
    for step in range(warmup + args.steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        trainer.step([next(stream)])
    sync(device)
    real = args.batch * args.steps / (time.perf_counter() - start)
    print(f"real pipeline from shards (decode={args.decode}, {args.workers} workers): {real:.0f} images/s")
    print(f"real / ceiling: {real / ceiling:.2f} (target >= 0.90)")

    manifest = load_manifest(args.shards)
    payloads = [torch.frombuffer(bytearray(s.image), dtype=torch.uint8)
                for s in itertools.islice(read_range(manifest.splits["train"].paths[0], 0, args.batch, {}, len(manifest.classes)), args.batch)]
    decode_jpeg_batch(payloads, args.load_size, device)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        decode_jpeg_batch(payloads, args.load_size, device)
    sync(device)
    print(f"batched JPEG decode + presize on {device.type}: {5 * len(payloads) / (time.perf_counter() - start):.0f} images/s")
    accelerator.end_training()


if __name__ == "__main__":
    main()
