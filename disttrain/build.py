"""Assemble a run from a Config: scan the data or read the shard manifest (once, on the main process), build loaders, model,
optimizer, schedule and trainer. Everything a user could get wrong fails here, before step one."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from disttrain.checkpoint import Checkpointer, PreemptionFlag
from disttrain.config import Config, ConfigError, save_config
from disttrain.data.augment import DeviceAugment
from disttrain.data.decode import decode_jpeg_batch
from disttrain.data.folder import DataError, ImageFolderData, scan_image_folder, write_bad_files
from disttrain.data.loader import DeviceLoader, FolderDataset, RankBatchSampler, make_loader
from disttrain.data.shards import Manifest, ShardDataset, load_manifest
from disttrain.config import IMAGENET
from disttrain.finetune import split_layer_groups
from disttrain.models import WeightsError, build_model, fetch_imagenet_weights, normalization
from disttrain.runtime import rank_seed, resolve_precision, seed_everything
from disttrain.stage import enter_stage, plan_stages
from disttrain.tracking import ConsoleReporter, Tracker
from disttrain.trainer import Trainer


def _load_on_main(accelerator: Accelerator, load):
    """`load()` runs on the main process only; every rank receives the same result (or the same
    DataError / WeightsError, so no rank is left waiting in a collective)."""
    payload: list = [None]
    if accelerator.is_main_process:
        try:
            payload[0] = load()
        except (DataError, WeightsError) as err:
            payload[0] = err
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    if isinstance(payload[0], (DataError, WeightsError)):
        raise payload[0]
    return payload[0]


def load_data(cfg: Config, accelerator: Accelerator, reporter: ConsoleReporter) -> ImageFolderData | Manifest:
    """The scanned image folder (`data.format=folder`) or the shard manifest (`shards`)."""
    root = Path(cfg.data.root).expanduser()
    if cfg.data.format == "shards":
        manifest: Manifest = _load_on_main(accelerator, lambda: load_manifest(root))
        train, valid = manifest.splits["train"], manifest.splits["valid"]
        reporter.line(
            f"data: {train.samples} train / {valid.samples} valid samples in {len(manifest.classes)} classes "
            f"from {len(train.paths)} + {len(valid.paths)} shards in {root}"
        )
        if manifest.presize < cfg.data.load_size:
            reporter.line(
                f"warning: the shards were presized to {manifest.presize} px, data.load_size is {cfg.data.load_size}: "
                "images are upsampled; set data.load_size to at most the shards' presize"
            )
        return manifest
    data: ImageFolderData = _load_on_main(
        accelerator,
        lambda: scan_image_folder(root, cfg.data.train_dir, cfg.data.valid_dir, cfg.data.bad_files, workers=max(2, cfg.data.num_workers)),
    )
    if accelerator.is_main_process:
        write_bad_files(data.bad, cfg.run.dir / "bad_files.txt")
    skipped = f"; {len(data.bad)} undecodable file(s) skipped, listed in {cfg.run.dir / 'bad_files.txt'}" if data.bad else ""
    reporter.line(
        f"data: {len(data.train)} train / {len(data.valid)} valid images in {len(data.classes)} classes from {root}{skipped}"
    )
    return data


def build_loaders(
    cfg: Config, data: ImageFolderData | Manifest, accelerator: Accelerator, load_size: int | None = None, batch_size: int | None = None
) -> tuple[DeviceLoader, DeviceLoader]:
    """Train and valid loaders for this rank (at `load_size` / `batch_size`, default data.*).
    Accelerate does not touch them: each rank reads only its own part (Accelerate's dispatching
    would make rank 0 decode everything)."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    pin = device.type == "cuda"
    load_size = load_size or cfg.data.load_size
    bs, workers = batch_size or cfg.data.batch_size, cfg.data.num_workers
    if isinstance(data, Manifest):
        if cfg.data.decode == "gpu" and device.type != "cuda":
            raise ConfigError("data.decode=gpu: nvJPEG needs a CUDA device and this run has none; set data.decode=cpu")
        raw = cfg.data.decode == "gpu"
        finish = (lambda images, dev: decode_jpeg_batch(images, load_size, dev)) if raw else None
        common = dict(load_size=load_size, world=world, rank=rank, num_workers=workers, raw=raw)
        train_set = ShardDataset(data, "train", bs, train=True, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer, **common)
        valid_set = ShardDataset(data, "valid", bs * 2, train=False, **common)
        return (
            DeviceLoader(make_loader(train_set, workers, pin), train_set, bs, device, finish),
            DeviceLoader(make_loader(valid_set, workers, pin), valid_set, bs * 2, device, finish),
        )
    if len(data.train) < world:
        raise DataError(f"{data.train.dir}: {len(data.train)} training images cannot be shared by {world} ranks")
    train_sampler = RankBatchSampler(len(data.train), bs, world, rank, seed=cfg.run.seed, shuffle=True)
    train = make_loader(FolderDataset(data.train, load_size), workers, pin, train_sampler)
    return DeviceLoader(train, train_sampler, bs, device), eval_loader(cfg, data.valid, accelerator, load_size, bs * 2)


def eval_loader(cfg: Config, split, accelerator: Accelerator, load_size: int, batch_size: int) -> DeviceLoader:
    """This rank's share of a folder split, in order, every image once across ranks (validation,
    and the precompute pass over the training images)."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    sampler = RankBatchSampler(len(split), batch_size, world, rank, shuffle=False, drop_empty=True)
    loader = make_loader(FolderDataset(split, load_size), cfg.data.num_workers, device.type == "cuda", sampler)
    return DeviceLoader(loader, sampler, batch_size, device)


def build_augment(cfg: Config, accelerator: Accelerator, mean: list[float] | None = None, std: list[float] | None = None) -> DeviceAugment:
    return DeviceAugment(
        cfg.augment,
        cfg.data.image_size,
        seed=rank_seed(cfg.run.seed, accelerator.process_index),
        channels_last=cfg.model.channels_last,
        mean=mean,
        std=std,
    )


def build_trainer(
    cfg: Config, accelerator: Accelerator, resume_step: int | None = None, flag: PreemptionFlag | None = None, stage: int = 0
) -> tuple[Trainer, ImageFolderData | Manifest]:
    """The run's trainer, set up for stage `stage` (0 unless resuming in a later one)."""
    reporter = ConsoleReporter(accelerator.is_main_process, progress=cfg.log.progress)
    if accelerator.is_main_process:
        save_config(cfg, cfg.run.dir / "config.yaml")
    precision = resolve_precision(cfg.train.precision, accelerator.device.type == "cuda")
    if precision.warning:
        reporter.line(precision.warning)
    data = load_data(cfg, accelerator, reporter)
    tracker = Tracker(cfg, accelerator.is_main_process, reporter, resume_step=resume_step)
    if cfg.model.pretrained == IMAGENET:  # downloaded by the main process when missing; the others wait
        path = _load_on_main(accelerator, lambda: fetch_imagenet_weights(cfg.model.name, progress=cfg.log.progress))
        reporter.line(f"pretrained: torchvision's ImageNet weights of {cfg.model.name} from {path}")
    mean, std, source = normalization(cfg.model, cfg.augment)
    if cfg.model.pretrained is not None or cfg.augment.mean is None:
        reporter.line(f"normalization: mean {_fmt(mean)}, std {_fmt(std)} ({source})")

    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, num_classes=len(data.classes)).to(accelerator.device)
    plans = plan_stages(cfg)
    trainer = Trainer(
        accelerator,
        model,
        optimizer=None,
        schedule=None,
        train_loader=None,
        valid_loader=None,
        augment=build_augment(cfg, accelerator, mean, std),
        reporter=reporter,
        epochs=plans[-1].end_epoch,
        grad_accum=cfg.train.grad_accum,
        clip_grad=cfg.train.clip_grad,
        label_smoothing=cfg.train.label_smoothing,
        max_steps_per_epoch=cfg.train.max_steps_per_epoch,
        classes=list(data.classes),
        tracker=tracker,
        log_every=cfg.log.every_n_steps,
        checkpointer=Checkpointer(
            cfg.run.dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
            {"classes": list(data.classes), "model": cfg.model.name, "run": cfg.run.name, "precision": precision.mode}, flag,
        ),
        precision_reason=precision.reason if cfg.train.precision == "auto" else "",
    )
    if cfg.stages:
        trainer.layer_groups = split_layer_groups(model, cfg.finetune.groups)
        reporter.line(f"layer groups of {cfg.model.name} (finetune.groups={cfg.finetune.groups}):")
        for group in trainer.layer_groups:
            reporter.line(f"  {group.describe()}")
    enter_stage(trainer, cfg, data, plans[stage])
    torch.manual_seed(rank_seed(cfg.run.seed, accelerator.process_index, stream=1))  # dropout etc. differ per rank
    return trainer, data


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
