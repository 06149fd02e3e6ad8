"""Assemble a run's trainer from a Config: the data (disttrain/data/setup.py), the model (with a
resumed run's weights), layer groups, checkpointer, tracker, and its first stage (disttrain/train/stages.py).
Everything a user could get wrong fails here, before step one."""

from __future__ import annotations

import torch

from disttrain.config import Config, ConfigError, save_config
from disttrain.data.folder import ImageFolderData
from disttrain.data.mix import Mixer
from disttrain.data.setup import build_augment, load_data
from disttrain.data.shards import Manifest
from disttrain.dist.jobgroup import JobGroup
from disttrain.dist.runtime import Runtime, rank_seed, seed_everything
from disttrain.models.build import build_model, interpolation, normalization
from disttrain.models.families import family_of
from disttrain.task import Task
from disttrain.models.groups import layer_groups_header, split_layer_groups
from disttrain.tracking import ConsoleReporter, Tracker
from disttrain.train.checkpoint import Checkpointer, PreemptionFlag, Resume, stop_if_preempted
from disttrain.train.ema import WeightEma
from disttrain.train.monitor import EarlyStopping, check_monitor
from disttrain.train.stages import StagePlan, enter_stage, plan_stages
from disttrain.train.trainer import Trainer


def build_trainer(
    cfg: Config, runtime: Runtime, plans: list[StagePlan] | None = None, resume: Resume | None = None,
    flag: PreemptionFlag | None = None, stage: int = 0, find_lr_only: bool = False,
) -> tuple[Trainer, ImageFolderData | Manifest]:
    """The run's trainer, set up for stage `stage` of `plans` (0 unless resuming in a later one; `plans`:
    the run's, `plan_stages(cfg)` when not given). `runtime`: what build_runtime resolved (the
    accelerator, this rank's cores and loader workers, the job's precision). A resumed run's weights
    go into the model before the stage is entered (a precompute stage computes its activations from
    them); the rest of the checkpoint is the caller's (`Trainer.load_state`).
    `find_lr_only` (`disttrain find-lr`): the tracker keeps its records apart from the run's."""
    accelerator, precision = runtime.accelerator, runtime.precision  # the job's precision, agreed by every rank
    reporter = ConsoleReporter(accelerator.is_main_process, progress=cfg.log.progress)
    if accelerator.is_main_process:
        save_config(cfg, cfg.run.dir / "config.yaml")
    if precision.warning:
        reporter.line(precision.warning)
    job = JobGroup(accelerator.num_processes)  # for what the main process alone reads or fetches, and the saves
    data = load_data(cfg, job, reporter.line, runtime.cores.workers, resuming=resume is not None)
    stop_if_preempted(flag, job, resume.path if resume else None, "during the data scan")
    if resume is not None:
        resume.check(cfg.model.name, data.classes, data_identity(data))
    tracker = Tracker(cfg, accelerator.is_main_process, reporter, resume_step=resume.meta["global_step"] if resume else None,
                      find_lr_only=find_lr_only)
    family = family_of(cfg.model.name)
    if cfg.model.pretrained == family.weights:  # the family's own: fetched by the main process when missing; the others wait
        path, what = job.from_main(lambda: family.fetch_weights(cfg.model.name, progress=cfg.log.progress))
        reporter.line(f"pretrained: {what} from {path}")
    mean, std, source = normalization(cfg.model, cfg.augment)
    resample, resample_source = interpolation(cfg.model, cfg.augment)
    if cfg.model.pretrained is not None or cfg.augment.mean is None:
        reporter.line(f"normalization: mean {_fmt(mean)}, std {_fmt(std)} ({source})")
    if family.input_size(cfg.model.name) is not None or cfg.augment.interpolation != "auto":  # the model states its input
        reporter.line(f"input: {cfg.data.image_size} px from a {cfg.data.load_size} px presize, {resample} resampling ({resample_source})")

    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, num_classes=len(data.classes)).to(accelerator.device)
    if resume is not None:
        model.load_state_dict(resume.shared["model"])
    groups = split_layer_groups(model, cfg.finetune.groups, cfg.model.name) if cfg.stages else []
    if groups:
        reporter.line(layer_groups_header(cfg.model.name, model, cfg.finetune.groups))
        for group in groups:
            reporter.line(f"  {group.describe()}")
    plans = plans if plans is not None else plan_stages(cfg)
    task = task_of(cfg, data)
    _check_monitors(cfg, task, data)
    ema = WeightEma(model, cfg.train.ema, cfg.train.ema_warmup, cfg.train.ema_every) if cfg.train.ema is not None else None
    stop = cfg.train.early_stop
    mixing = cfg.augment.mixup > 0 or cfg.augment.cutmix > 0
    trainer = Trainer(
        accelerator,
        model,
        augment=build_augment(cfg, accelerator, mean, std, resample),
        reporter=reporter,
        total_epochs=plans[-1].end_epoch,
        grad_accum=cfg.train.grad_accum,
        clip_grad=cfg.train.clip_grad,
        task=task,
        max_steps_per_epoch=cfg.train.max_steps_per_epoch,
        classes=list(data.classes),
        tracker=tracker,
        log_every=cfg.log.every_n_steps,
        checkpointer=Checkpointer(
            cfg.run.dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
            {"classes": list(data.classes), "samples": data_identity(data), "model": cfg.model.name, "run": cfg.run.name,
             "precision": precision.mode}, job, flag, keep_best=cfg.checkpoint.keep_best, monitor=cfg.checkpoint.monitor,
        ),
        precision_reason=precision.reason if cfg.train.precision == "auto" else "",
        layer_groups=groups,
        cores=runtime.cores,
        mixer=Mixer(cfg.augment, task, rank_seed(cfg.run.seed, accelerator.process_index, stream=2)) if mixing else None,
        ema=ema,
        early_stop=EarlyStopping(stop.monitor, stop.patience, stop.min_delta) if stop.patience is not None else None,
    )
    trainer.use(enter_stage(trainer, cfg, data, plans[stage]))
    torch.manual_seed(rank_seed(cfg.run.seed, accelerator.process_index, stream=1))  # dropout etc. differ per rank
    return trainer, data


def task_of(cfg: Config, data: ImageFolderData | Manifest) -> Task:
    """The run's task, decided once from its data (disttrain/task.py)."""
    return Task(bool(getattr(data, "multi_label", False)), len(data.classes), cfg.train.label_smoothing, cfg.train.threshold,
                cfg.train.fbeta, loss_kind=cfg.train.loss)


def table_columns(cfg: Config, task: Task) -> tuple[str, ...]:
    """The epoch table's columns a monitor may name: valid_loss, the task's, and with train.ema the EMA's."""
    ema = ("ema_valid_loss", *(f"ema_{c}" for c in task.columns if c != "threshold")) if cfg.train.ema is not None else ()
    return ("valid_loss", *task.columns, *ema)


def _check_monitors(cfg: Config, task: Task, data) -> None:
    """train.early_stop's and checkpoint.keep_best's monitors name columns of the run's table; both
    need validation images."""
    columns = table_columns(cfg, task)
    watching = []
    if cfg.train.early_stop.patience is not None:
        check_monitor(cfg.train.early_stop.monitor, columns, "train.early_stop.monitor")
        watching.append("train.early_stop")
    if cfg.checkpoint.keep_best:
        check_monitor(cfg.checkpoint.monitor, columns, "checkpoint.monitor")
        watching.append("checkpoint.keep_best")
    if watching and not data_identity(data)["valid"]:
        raise ConfigError(f"{watching[0]}: watches a validation figure and this run has no validation images "
                          f"(data.valid_pct=0); set a validation split or leave it off")


def data_identity(data: ImageFolderData | Manifest) -> dict[str, int]:
    """Samples per split (a folder's usable images, a manifest's samples): what a checkpoint's meta
    records of the data, and what `Resume.check` compares on resume."""
    if isinstance(data, Manifest):
        return {name: data.splits[name].samples for name in ("train", "valid")}
    return {"train": len(data.train), "valid": len(data.valid)}


def _fmt(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
