"""What a run feeds its model: the scanned image folder or the shard manifest (read once, on the
main process), this rank's loaders at a stage's sizes, and the on-device augmentation.

disttrain/train/build.py (the trainer) and train/stages.py (a stage's loaders) both use this
module; it uses neither. What it needs of the run comes in as values: the resolved loader workers
(`Workers`), a group that reads on the main process for every rank (`MainFirst`, the job's JobGroup)
and a `report(line)` callable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from accelerate import Accelerator

from disttrain.config import Config, ConfigError
from disttrain.data.augment import DeviceAugment
from disttrain.data.folder import DataError, ImageFolderData, scan_image_folder, write_bad_files
from disttrain.data.loader import DecodeOnDevice, DeviceLoader, FolderDataset, RankBatchSampler, Workers, loader_generator, make_loader
from disttrain.data.shards import Manifest, ShardDataset, load_manifest
from disttrain.dist.runtime import rank_seed

T = TypeVar("T")


class MainFirst(Protocol):
    """What the data layer needs of the job's group (disttrain/dist/jobgroup.py's JobGroup is one):
    `from_main(make)` runs `make` on the main process and gives every rank its result."""

    is_main: bool

    def from_main(self, make: Callable[[], T]) -> T: ...


def load_data(cfg: Config, group: MainFirst, report: Callable[[str], None], scan_workers: int) -> ImageFolderData | Manifest:
    """The scanned image folder (`data.format=folder`) or the shard manifest (`shards`): read by the
    main process, every rank waiting for it on `group` (a scan decodes every image: no collective
    timeout may cut it short). `report`: where its lines go (the run's console reporter);
    `scan_workers`: the rank's loader workers (the scan uses at least 2 processes)."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.format == "shards":
        manifest: Manifest = group.from_main(lambda: load_manifest(root))
        train, valid = manifest.splits["train"], manifest.splits["valid"]
        report(
            f"data: {train.samples} train / {valid.samples} valid samples in {len(manifest.classes)} classes "
            f"from {len(train.paths)} + {len(valid.paths)} shards in {root}"
        )
        if manifest.presize < cfg.data.load_size:
            report(
                f"warning: the shards were presized to {manifest.presize} px, data.load_size is {cfg.data.load_size}: "
                "images are upsampled; set data.load_size to at most the shards' presize"
            )
        return manifest
    data: ImageFolderData = group.from_main(
        lambda: scan_image_folder(root, cfg.data.train_dir, cfg.data.valid_dir, cfg.data.bad_files, workers=max(2, scan_workers)),
    )
    if group.is_main:
        write_bad_files(data.bad, cfg.run.dir / "bad_files.txt")
    skipped = f"; {len(data.bad)} undecodable file(s) skipped, listed in {cfg.run.dir / 'bad_files.txt'}" if data.bad else ""
    report(
        f"data: {len(data.train)} train / {len(data.valid)} valid images in {len(data.classes)} classes from {root}{skipped}"
    )
    return data


def build_loaders(
    cfg: Config, data: ImageFolderData | Manifest, accelerator: Accelerator, workers: Workers, load_size: int | None = None,
    batch_size: int | None = None,
) -> tuple[DeviceLoader, DeviceLoader]:
    """Train and valid loaders for this rank (at `load_size` / `batch_size`, default data.*), decoding
    with `workers` (the run's resolved plan, not data.num_workers as written).
    Accelerate does not touch them: each rank reads only its own part (Accelerate's dispatching
    would make rank 0 decode everything)."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    pin = device.type == "cuda"
    load_size = load_size or cfg.data.load_size
    bs, timeout = batch_size or cfg.data.batch_size, cfg.data.worker_timeout
    count, cores = workers.count, workers.cores
    if isinstance(data, Manifest):
        if cfg.data.decode == "gpu" and device.type != "cuda":
            raise ConfigError("data.decode=gpu: nvJPEG needs a CUDA device and this run has none; set data.decode=cpu")
        raw = cfg.data.decode == "gpu"
        common = dict(load_size=load_size, world=world, rank=rank, num_workers=count, raw=raw)
        train_set = ShardDataset(data, "train", bs, train=True, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer, **common)
        valid_set = ShardDataset(data, "valid", bs * 2, train=False, **common)
        return (
            DeviceLoader(make_loader(train_set, count, pin, timeout=timeout, generator=loader_generator(cfg.run.seed, rank, "train"),
                                     worker_cores=cores),
                         train_set, bs, device, DecodeOnDevice(load_size, substitute=True) if raw else None, name="train"),
            DeviceLoader(make_loader(valid_set, count, pin, timeout=timeout, generator=loader_generator(cfg.run.seed, rank, "valid"),
                                     worker_cores=cores),
                         valid_set, bs * 2, device, DecodeOnDevice(load_size, substitute=False) if raw else None, name="valid"),
        )
    if len(data.train) < world:
        raise DataError(f"{data.train.dir}: {len(data.train)} training images cannot be shared by {world} ranks")
    train_sampler = RankBatchSampler(len(data.train), bs, world, rank, seed=cfg.run.seed, shuffle=True)
    valid_share = rank_share(_eval_sampler(len(data.valid), bs * 2, accelerator))
    cache = use_cache(cfg.data.cache, (len(data.train) + len(valid_share)) * load_size**2 * 3)
    train = make_loader(FolderDataset(data.train, load_size, cache), count, pin, train_sampler, timeout,
                        generator=loader_generator(cfg.run.seed, rank, "train"), worker_cores=cores)
    return (DeviceLoader(train, train_sampler, bs, device, name="train"),
            eval_loader(cfg, data.valid, accelerator, workers, load_size, bs * 2, name="valid", cache=cache))


def eval_loader(cfg: Config, split, accelerator: Accelerator, workers: Workers, load_size: int, batch_size: int, name: str,
                cache: bool = False) -> DeviceLoader:
    """This rank's share of a folder split, in order, every image once across ranks (validation,
    and the precompute pass over the training images); `name` says which in a LoaderStalled error;
    `cache`: keep the decoded images of this rank's share (validation every epoch)."""
    sampler = _eval_sampler(len(split), batch_size, accelerator)
    dataset = FolderDataset(split, load_size, rank_share(sampler) if cache else False)
    loader = make_loader(dataset, workers.count, accelerator.device.type == "cuda", sampler, cfg.data.worker_timeout,
                         generator=loader_generator(cfg.run.seed, accelerator.process_index, name), worker_cores=workers.cores)
    return DeviceLoader(loader, sampler, batch_size, accelerator.device, name=name)


def _eval_sampler(samples: int, batch_size: int, accelerator: Accelerator) -> RankBatchSampler:
    return RankBatchSampler(samples, batch_size, accelerator.num_processes, accelerator.process_index, shuffle=False, drop_empty=True)


def rank_share(sampler) -> list[int]:
    """The dataset indices a fixed (unshuffled) batch sampler gives this rank, in order."""
    return [index for batch in sampler for index in batch]


def release_loaders(*loaders) -> None:
    """Stop the persistent workers of these loaders (DeviceLoaders; others, such as precomputed
    activations, have none) now rather than whenever their last reference goes: a stage's loaders
    and the images they cache are let go before the next stage builds its own."""
    for loader in loaders:
        inner = getattr(loader, "loader", None)
        iterator = getattr(inner, "_iterator", None)  # kept by a DataLoader with persistent workers
        if iterator is not None:
            iterator._shutdown_workers()
            inner._iterator = None


def use_cache(setting: str, pixels: int) -> bool:
    """data.cache: whether a stage's decoded images (`pixels` bytes for this rank: the whole training
    split and its validation share) stay in memory.
    `auto`: when every rank of this node can hold its copy in a quarter of the available memory
    and half of /dev/shm's free space (where the shared array lives)."""
    if setting != "auto":
        return setting == "on"
    need = pixels * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        shm_free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return False
    return need <= min(_available_memory() / 4, shm_free / 2)


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); 0 where there is none (no cache then)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def build_augment(cfg: Config, accelerator: Accelerator, mean: list[float] | None = None, std: list[float] | None = None,
                  interpolation: str = "bilinear") -> DeviceAugment:
    return DeviceAugment(
        cfg.augment,
        cfg.data.image_size,
        seed=rank_seed(cfg.run.seed, accelerator.process_index),
        channels_last=cfg.model.channels_last,
        mean=mean,
        std=std,
        interpolation=interpolation,
    )
