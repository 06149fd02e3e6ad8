"""Assemble a run from a Config: scan the data (once, on the main process), build loaders, model,
optimizer, schedule and trainer. Everything a user could get wrong fails here, before step one."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from disttrain.config import Config, save_config
from disttrain.data.augment import DeviceAugment
from disttrain.data.folder import DataError, ImageFolderData, scan_image_folder, write_bad_files
from disttrain.data.loader import FolderDataset, RankBatchSampler, make_loader
from disttrain.models import build_model, build_optimizer
from disttrain.runtime import rank_seed, seed_everything
from disttrain.schedule import Schedule
from disttrain.tracking import ConsoleReporter
from disttrain.trainer import Trainer, epoch_steps


def scan_data(cfg: Config, accelerator: Accelerator, reporter: ConsoleReporter) -> ImageFolderData:
    """The main process scans and validates the folder; every rank receives the same result (or the
    same error, so no rank is left waiting in a collective)."""
    payload: list = [None]
    if accelerator.is_main_process:
        try:
            payload[0] = scan_image_folder(
                cfg.data.root, cfg.data.train_dir, cfg.data.valid_dir, cfg.data.bad_files, workers=max(2, cfg.data.num_workers)
            )
        except DataError as err:
            payload[0] = err
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    result = payload[0]
    if isinstance(result, DataError):
        raise result
    data: ImageFolderData = result
    if accelerator.is_main_process:
        write_bad_files(data.bad, cfg.run.dir / "bad_files.txt")
    skipped = f"; {len(data.bad)} undecodable file(s) skipped, listed in {cfg.run.dir / 'bad_files.txt'}" if data.bad else ""
    reporter.line(
        f"data: {len(data.train)} train / {len(data.valid)} valid images in {len(data.classes)} classes "
        f"from {Path(cfg.data.root).expanduser()}{skipped}"
    )
    return data


def build_loaders(cfg: Config, data: ImageFolderData, accelerator: Accelerator):
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(data.train) < world:
        raise DataError(f"{data.train.dir}: {len(data.train)} training images cannot be shared by {world} ranks")
    pin = accelerator.device.type == "cuda"
    train_sampler = RankBatchSampler(len(data.train), cfg.data.batch_size, world, rank, seed=cfg.run.seed, shuffle=True)
    valid_sampler = RankBatchSampler(len(data.valid), cfg.data.batch_size * 2, world, rank, shuffle=False, drop_empty=True)
    train = make_loader(FolderDataset(data.train, cfg.data.load_size), train_sampler, cfg.data.num_workers, pin)
    valid = make_loader(FolderDataset(data.valid, cfg.data.load_size), valid_sampler, cfg.data.num_workers, pin)
    return train, valid


def build_augment(cfg: Config, accelerator: Accelerator) -> DeviceAugment:
    return DeviceAugment(
        cfg.augment,
        cfg.data.image_size,
        seed=rank_seed(cfg.run.seed, accelerator.process_index),
        channels_last=cfg.model.channels_last,
    )


def build_trainer(cfg: Config, accelerator: Accelerator) -> tuple[Trainer, ImageFolderData]:
    reporter = ConsoleReporter(accelerator.is_main_process, progress=cfg.log.progress)
    if accelerator.is_main_process:
        save_config(cfg, cfg.run.dir / "config.yaml")
    data = scan_data(cfg, accelerator, reporter)
    train_loader, valid_loader = build_loaders(cfg, data, accelerator)

    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, num_classes=len(data.classes))
    optimizer = build_optimizer(cfg.optim, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    steps = epoch_steps(len(train_loader), cfg.train.grad_accum, cfg.train.max_steps_per_epoch)
    schedule = Schedule(optimizer, cfg.schedule, total_steps=cfg.train.epochs * steps)

    trainer = Trainer(
        accelerator,
        model,
        optimizer,
        schedule,
        train_loader=train_loader,
        valid_loader=valid_loader,
        augment=build_augment(cfg, accelerator),
        reporter=reporter,
        epochs=cfg.train.epochs,
        grad_accum=cfg.train.grad_accum,
        clip_grad=cfg.train.clip_grad,
        label_smoothing=cfg.train.label_smoothing,
        max_steps_per_epoch=cfg.train.max_steps_per_epoch,
    )
    torch.manual_seed(rank_seed(cfg.run.seed, accelerator.process_index, stream=1))  # dropout etc. differ per rank
    return trainer, data
