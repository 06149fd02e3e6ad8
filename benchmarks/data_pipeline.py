"""What the CPU delivers per second, four ways, measured in one run on the same JPEG folder.

    python benchmarks/data_pipeline.py --data ../shared/data/hymenoptera/train --workers 2

(a) the usual torchvision pipeline: ImageFolder + PIL RandomResizedCrop(224), flip, ToTensor,
    Normalize, DataLoader: all of the augmentation is CPU work;
(b) disttrain from the folder and (c) from shards (`disttrain prepare`), each up to the uint8 batch
    in the main process: decode, presize, collate (augmentation runs on the device later);
(d) the ceiling: the same workers only decoding the shards' JPEGs (nothing collated or sent back).
Each is a DataLoader with --workers worker processes, read for at least --epochs passes and
--seconds seconds after a first, untimed pass (worker start, page cache); (a)-(d) are timed
--repeats times, interleaved, and the fastest of each is kept (this machine's speed drifts).
Targets with 2 workers on a 2-core machine: (c)/(a) >= 4, (b)/(a) >= 1.5, (c)/(d) >= 0.8. For information, (b) and (c) are also run with
DeviceAugment on this machine's CPU in the main process (on a GPU machine it runs on the GPU).
The last line printed is `ratios: folder/torchvision=X.XX shards/torchvision=Y.YY shards/ceiling=Z.ZZ`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from disttrain.config import AugmentConfig
from disttrain.data.augment import DeviceAugment
from disttrain.data.decode import decode_rgb
from disttrain.data.folder import scan_image_folder
from disttrain.data.loader import DeviceLoader, FolderDataset, RankBatchSampler, make_loader
from disttrain.data.prepare import PrepareSettings, prepare
from disttrain.data.shards import ShardDataset, load_manifest, plan_epoch, read_range

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timed_passes(make_iter, min_passes: int, min_seconds: float, per_batch=None) -> float:
    """Images per second over passes 2, 3, ... of `make_iter(epoch)` (pass 1 warms up: worker start,
    page cache), timing at least `min_passes` passes and at least `min_seconds`."""
    images, start, epoch = 0, None, 0
    while start is None or epoch <= min_passes or time.perf_counter() - start < min_seconds:
        if epoch == 1:
            start = time.perf_counter()
        for batch in make_iter(epoch):
            n = batch if isinstance(batch, int) else len(batch[1])
            if per_batch is not None:
                per_batch(batch)
            if epoch >= 1:
                images += n
        epoch += 1
    return images / (time.perf_counter() - start)


def torchvision_pipeline(folder: Path, batch: int, workers: int, size: int):
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomResizedCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    loader = DataLoader(datasets.ImageFolder(str(folder), transform=transform), batch_size=batch, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0)
    return lambda epoch: loader


def folder_pipeline(root: Path, batch: int, workers: int, load_size: int) -> DeviceLoader:
    data = scan_image_folder(root, "train", "valid", workers=workers)
    sampler = RankBatchSampler(len(data.train), batch, seed=0)
    return DeviceLoader(make_loader(FolderDataset(data.train, load_size), workers, False, sampler), sampler, batch, torch.device("cpu"))


def shard_pipeline(shards: Path, batch: int, workers: int, load_size: int) -> DeviceLoader:
    dataset = ShardDataset(load_manifest(shards), "train", batch, load_size, num_workers=workers, train=True)
    return DeviceLoader(make_loader(dataset, workers, False), dataset, batch, torch.device("cpu"))


def epochs_of(loader: DeviceLoader):
    def make(epoch):
        loader.set_epoch(epoch)
        return loader

    return make


class DecodeOnly(IterableDataset):
    """The ceiling: each worker decodes its range of the shards' JPEGs (the same split and the same
    decoder call as the reader) and sends back only a count per batch."""

    def __init__(self, shards: Path, batch: int, workers: int, load_size: int):
        self.manifest = load_manifest(shards)
        self.batch, self.workers, self.load_size = batch, workers, load_size

    def __iter__(self):
        info = get_worker_info()
        split = self.manifest.splits["train"]
        plan = plan_epoch(split.counts, 1, 0, self.workers, self.batch, train=False)[info.id if info else 0]
        count = 0
        for shard, start, stop in plan.pieces:
            for sample in read_range(split.paths[shard], start, stop, {}, len(self.manifest.classes)):
                decode_rgb(sample.image, self.load_size)
                count += 1
                if count == self.batch:
                    yield count
                    count = 0
        if count:
            yield count


def ceiling_pipeline(shards: Path, batch: int, workers: int, load_size: int):
    loader = DataLoader(DecodeOnly(shards, batch, workers, load_size), batch_size=None, num_workers=workers,
                        persistent_workers=workers > 0)
    return lambda epoch: loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/hymenoptera/train", help="a folder of <class>/<images>")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15, help="timed passes over the data per timing, at least")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per timing, at least")
    parser.add_argument("--repeats", type=int, default=3, help="timings of (a)-(d), interleaved; the fastest of each is kept")
    parser.add_argument("--size", type=int, default=224, help="training size (torchvision crop, DeviceAugment output)")
    parser.add_argument("--load-size", type=int, default=256, help="disttrain presize (the shards are made at this size)")
    parser.add_argument("--samples-per-shard", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collects batches; the workers do the work

    folder = Path(args.data).expanduser().resolve()
    if not folder.is_dir():
        raise SystemExit(f"--data: {folder} is not a folder of <class>/<images>")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        os.symlink(folder, root / "train")
        os.symlink(folder, root / "valid")  # prepare wants both splits; only train is read
        t0 = time.perf_counter()
        prepare(root, Path(tmp) / "shards", PrepareSettings(args.samples_per_shard, args.load_size), workers=args.workers,
                progress=False, log=lambda line: None)
        print(f"prepare: {time.perf_counter() - t0:.1f} s for both splits with {args.workers} workers (one-time)")
        shards = Path(tmp) / "shards"
        n_images = sum(load_manifest(shards).splits["train"].counts)
        print(f"data: {folder} ({n_images} images), batch {args.batch}, {args.workers} workers, "
              f">= {args.epochs} timed passes and >= {args.seconds:.0f} s per timing, best of {args.repeats}")

        augment = DeviceAugment(AugmentConfig(), args.size, seed=0)
        results = {}
        runs = [
            ("a", "torchvision ImageFolder + RandomResizedCrop/flip/ToTensor/Normalize", lambda: torchvision_pipeline(folder, args.batch, args.workers, args.size), None),
            ("b", "disttrain folder -> uint8 batch", lambda: epochs_of(folder_pipeline(root, args.batch, args.workers, args.load_size)), None),
            ("c", "disttrain shards -> uint8 batch", lambda: epochs_of(shard_pipeline(shards, args.batch, args.workers, args.load_size)), None),
            ("d", "ceiling: decode the shards' JPEGs only", lambda: ceiling_pipeline(shards, args.batch, args.workers, args.load_size), None),
            ("b+aug", "(b) + DeviceAugment on this CPU", lambda: epochs_of(folder_pipeline(root, args.batch, args.workers, args.load_size)), lambda b: augment(b[0], train=True)),
            ("c+aug", "(c) + DeviceAugment on this CPU", lambda: epochs_of(shard_pipeline(shards, args.batch, args.workers, args.load_size)), lambda b: augment(b[0], train=True)),
        ]
        for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits every pipeline
            for key, label, build, per_batch in runs[: 4 if repeat else len(runs)]:
                speed = timed_passes(build(), args.epochs if per_batch is None else 2, args.seconds if per_batch is None else 0, per_batch)
                results[key] = max(results.get(key, 0.0), speed)
        for key, label, _, _ in runs:
            print(f"({key}) {label}: {results[key]:.1f} images/s")
    a, b, c, d = (results[k] for k in "abcd")
    print(f"targets: (c)/(a) >= 4: {c / a:.2f}   (b)/(a) >= 1.5: {b / a:.2f}   (c)/(d) >= 0.8: {c / d:.2f}")
    print(f"ratios: folder/torchvision={b / a:.2f} shards/torchvision={c / a:.2f} shards/ceiling={c / d:.2f}")


if __name__ == "__main__":
    main()
