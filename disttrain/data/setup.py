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

from disttrain.config import Config, ConfigError, DataConfig
from disttrain.data.augment import DeviceAugment
from disttrain.data.folder import DataError, FolderListing, ImageFolderData, scan_image_folder, scan_listing, write_bad_files
from disttrain.data.source import check_flat_usable, list_source
from disttrain.data.split import SPLIT_FILE, SplitRecord, read_split, write_split
from disttrain.data.loader import DecodeOnDevice, DeviceLoader, FolderCollate, FolderDataset, RankBatchSampler, Workers, loader_generator, make_loader
from disttrain.data.paths import in_shared_memory
from disttrain.data.shards import Manifest, ShardDataset, load_manifest
from disttrain.dist.runtime import rank_seed
from disttrain.errors import UserError

T = TypeVar("T")


class MainFirst(Protocol):
    """What the data layer needs of the job's group (disttrain/dist/jobgroup.py's JobGroup is one):
    `from_main(make)` runs `make` on the main process and gives every rank its result."""

    is_main: bool
    world: int

    def from_main(self, make: Callable[[], T]) -> T: ...

    def gather(self, value: T) -> list[T]: ...


def load_data(cfg: Config, group: MainFirst, report: Callable[[str], None], scan_workers: int,
              resuming: bool = False) -> ImageFolderData | Manifest:
    """The scanned image folder (`data.format=folder`, any source of disttrain/data/source.py) or the
    shard manifest (`shards`): read by the main process, every rank waiting for it on `group` (a
    scan decodes every image: no collective timeout may cut it short). A drawn split is drawn by
    every rank and compared first (`agreed_listing`), checked against the run's split.json when
    `resuming`, and written there. `report`: where its lines go (the run's console reporter);
    `scan_workers`: the rank's loader workers (the scan uses at least 2 processes)."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.format == "shards":
        manifest: Manifest = group.from_main(lambda: load_manifest(root))
        train, valid = manifest.splits["train"], manifest.splits["valid"]
        kind = f"{len(manifest.classes)} tags (multi-label)" if manifest.multi_label else f"{len(manifest.classes)} classes"
        report(f"data: {train.samples} train / {valid.samples} valid samples with {kind} "
               f"from {len(train.paths)} + {len(valid.paths)} shards in {root}" if manifest.multi_label else
               f"data: {train.samples} train / {valid.samples} valid samples in {kind} "
               f"from {len(train.paths)} + {len(valid.paths)} shards in {root}")
        if manifest.split is not None and group.is_main:  # the split prepare drew: the run keeps its record
            write_split(SplitRecord(**manifest.split), cfg.run.dir)
        if manifest.presize < cfg.data.load_size:
            report(
                f"warning: the shards were presized to {manifest.presize} px, data.load_size is {cfg.data.load_size}: "
                "images are upsampled; set data.load_size to at most the shards' presize"
            )
        return manifest
    workers = max(2, scan_workers)
    if not draws_split(cfg.data):
        data: ImageFolderData = group.from_main(
            lambda: scan_image_folder(root, cfg.data.train_dir, cfg.data.valid_dir, cfg.data.bad_files, workers=workers,
                                      verify=cfg.data.verify, cache_dir=cfg.run.dir, use_cache=cfg.data.scan_cache),
        )
    else:
        listing = agreed_listing(cfg, group)
        if resuming:
            group.from_main(lambda: check_resumed_split(cfg.run.dir / SPLIT_FILE, listing.split))
        data = group.from_main(lambda: scan_flat(listing, cfg.data, workers, cfg.run.dir))
        if group.is_main:
            write_split(listing.split, cfg.run.dir)
        record: SplitRecord = listing.split
        report(f"split: {len(record.valid)} valid / {record.train} train files ({record.how}), the same on {group.world} rank(s); "
               f"listed in {cfg.run.dir / SPLIT_FILE}")
    for split in (data.train, data.valid):  # once: every stage's loader workers get handles to it, not a copy each
        split.paths = in_shared_memory(split.paths)
    if group.is_main:
        write_bad_files(data.bad, cfg.run.dir / "bad_files.txt")
    skipped = f"; {len(data.bad)} undecodable file(s) skipped, listed in {cfg.run.dir / 'bad_files.txt'}" if data.bad else ""
    kind = f"images in {len(data.classes)} classes" if not data.multi_label else f"images with {len(data.classes)} tags (multi-label)"
    report(f"data: {len(data.train)} train / {len(data.valid)} valid {kind} from {root}{skipped}")
    return data


def draws_split(data: DataConfig) -> bool:
    """Whether the source's split is drawn (a flat folder, or data.valid_pct on class folders)
    rather than read from a validation folder."""
    return data.flat or data.valid_pct is not None


def agreed_listing(cfg: Config, group: MainFirst) -> FolderListing:
    """The listing and its split, drawn by every rank itself; their digests are all-gathered and
    compared before anything is broadcast. A rank whose listing failed makes every rank raise its
    error (none is left waiting)."""
    try:
        listing = list_source(cfg.data)
        mine: str | UserError = listing.split.digest
    except UserError as err:
        mine = err
    digests = group.gather(mine)
    for found in digests:
        if isinstance(found, UserError):
            raise found
    if len(set(digests)) > 1:
        ranks = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
        raise DataError(f"{cfg.data.root}: the ranks listed different data or drew different splits ({ranks}); "
                        "every rank must see the same files and labels (a shared filesystem, no file written meanwhile)")
    return listing


def check_resumed_split(path: Path, split: SplitRecord) -> None:
    """A resume trains on the split its run started with: refuse when the data would split otherwise."""
    if not path.is_file():
        return  # a run from before split.json, or a checkpoint copied without it: nothing to compare
    before = read_split(path)
    if before.digest != split.digest:
        raise DataError(f"{path}: the run split its data as {before.how} into {len(before.valid)} valid / {before.train} train files; "
                        f"the data now splits into {len(split.valid)} / {split.train} ({split.how}), other files or labels: "
                        "resume with the same data and data.* split settings, or start a new run")


def scan_flat(listing: FolderListing, data_cfg: DataConfig, workers: int, run_dir: Path) -> ImageFolderData:
    """Check a drawn listing's files (data.verify); a single-label class must keep a training image."""
    data = scan_listing(listing, data_cfg.bad_files, workers, data_cfg.verify, run_dir, data_cfg.scan_cache)
    check_flat_usable(listing, data.train.labels, str(listing.train_dir))
    if len(data.train) == 0:
        raise DataError(f"{listing.train_dir}: no usable training image in this split")
    return data


def build_loaders(
    cfg: Config, data: ImageFolderData | Manifest, accelerator: Accelerator, workers: Workers, load_size: int | None = None,
    batch_size: int | None = None,
) -> tuple[DeviceLoader, DeviceLoader | None]:
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
        train_set = ShardDataset(data, "train", bs, train=True, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                 repeats=cfg.data.repeats, **common)
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
    train_sampler = RankBatchSampler(len(data.train), bs, world, rank, seed=cfg.run.seed, shuffle=True, repeats=cfg.data.repeats)
    valid_share = rank_share(_eval_sampler(len(data.valid), bs * 2, accelerator)) if len(data.valid) else []
    cache = use_cache(cfg.data.cache, (len(data.train) + len(valid_share)) * load_size**2 * 3)
    train = make_loader(FolderDataset(data.train, load_size, cache), count, pin, train_sampler, timeout, FolderCollate(substitute=True),
                        generator=loader_generator(cfg.run.seed, rank, "train"), worker_cores=cores)
    valid = eval_loader(cfg, data.valid, accelerator, workers, load_size, bs * 2, name="valid", cache=cache) if len(data.valid) else None
    return DeviceLoader(train, train_sampler, bs, device, name="train"), valid  # no valid loader: data.valid_pct=0


def eval_loader(cfg: Config, split, accelerator: Accelerator, workers: Workers, load_size: int, batch_size: int, name: str,
                cache: bool = False) -> DeviceLoader:
    """This rank's share of a folder split, in order, every image once across ranks (validation,
    and the precompute pass over the training images); `name` says which in a LoaderStalled error;
    `cache`: keep the decoded images of this rank's share (validation every epoch)."""
    sampler = _eval_sampler(len(split), batch_size, accelerator)
    dataset = FolderDataset(split, load_size, rank_share(sampler) if cache else False)
    loader = make_loader(dataset, workers.count, accelerator.device.type == "cuda", sampler, cfg.data.worker_timeout, FolderCollate(substitute=False),
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
