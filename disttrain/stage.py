"""Put a Trainer into one stage of a run: frozen groups, param groups and a new optimizer, a new DDP
wrapper, the schedule, loaders and augmentation at the stage's sizes (or precomputed activations).

The DDP wrapper and the optimizer are built per stage from the unwrapped model, after the freezing:
DDP registers the parameters that require grad when it is built and all-reduces only those, so a
wrapper kept across an unfreeze would leave the newly trainable weights unsynchronized (the ranks
drift apart without an error). The previous stage's wrapper and optimizer are released first, so
their gradient hooks are gone. Each stage's optimizer starts with fresh state.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from torch import nn

from disttrain.config import Config, StageConfig, frozen_groups
from disttrain.finetune import freeze, group_lrs
from disttrain.finetune import param_groups as layer_param_groups
from disttrain.models import make_optimizer, param_groups
from disttrain.schedule import Schedule
from disttrain.trainer import Trainer, epoch_steps


@dataclass
class StagePlan:
    index: int
    cfg: StageConfig
    first_epoch: int
    """The run's epoch number the stage starts at (epoch numbers continue across stages)."""
    staged: bool
    """The run has `stages` (False: the one implicit stage of a plain run)."""

    @property
    def end_epoch(self) -> int:
        return self.first_epoch + self.cfg.epochs

    @property
    def name(self) -> str:
        return self.cfg.name or f"stage {self.index}"


def plan_stages(cfg: Config) -> list[StagePlan]:
    plans, epoch = [], 0
    for index, stage in enumerate(cfg.run_stages()):
        plans.append(StagePlan(index, stage, epoch, staged=bool(cfg.stages)))
        epoch += stage.epochs
    return plans


def _release(trainer: Trainer) -> None:
    """Drop the previous stage's wrapper and optimizer (Accelerate's references too) and give the
    bare module back its own forward."""
    acc = trainer.accelerator
    if trainer.model is not None:
        bare = acc.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        bare.__dict__.pop("_is_accelerate_prepared", None)
    trainer.model = trainer.optimizer = trainer.schedule = None
    acc.free_memory()
    gc.collect()  # the old DDP reducer removes its autograd hooks when it is destroyed


def enter_stage(trainer: Trainer, cfg: Config, data, plan: StagePlan) -> None:
    from disttrain.build import build_loaders, eval_loader  # build.py builds the trainer with this module

    acc, stage, module = trainer.accelerator, plan.cfg, trainer.module
    _release(trainer)
    groups = getattr(trainer, "layer_groups", None)
    frozen = frozen_groups(stage.freeze_to, len(groups)) if groups else 0
    trainer.fixed_norms = freeze(module, groups, frozen, cfg.finetune.train_bn, cfg.finetune.freeze_bn_stats) if groups else []
    lr = 1.0 if stage.lr == "auto" else stage.lr  # auto: the sweep sets the real peak LR before training
    if groups and stage.lr_ratio != 1:
        optimizer_groups, trainer.lr_owner = layer_param_groups(groups, group_lrs(lr, stage.lr_ratio, len(groups)), cfg.optim.weight_decay)
    else:
        optimizer_groups, trainer.lr_owner = param_groups(module, cfg.optim.weight_decay), None
    optimizer = make_optimizer(cfg.optim, optimizer_groups, lr)

    view = trainer.augment if stage.augment else (lambda images, train: trainer.augment(images, train=False))
    trainer.augment.image_size = stage.image_size
    target: nn.Module = module
    if stage.precompute:
        from disttrain.precompute import precompute

        head = getattr(module, groups[-1].blocks[0])
        train, _ = build_loaders(cfg, data, acc, stage.load_size, stage.batch_size)
        each_once = eval_loader(cfg, data.train, acc, stage.load_size, stage.batch_size * 2)
        valid = eval_loader(cfg, data.valid, acc, stage.load_size, stage.batch_size * 2)
        trainer.train_loader, trainer.valid_loader, seconds = precompute(trainer, head, each_once, train.source, valid, view, stage.batch_size)
        trainer.reporter.line(
            f"{plan.name}: precomputed the frozen body's output for {len(data.train)} train + {len(data.valid)} valid images "
            f"in {seconds:.1f} s; training the head ({groups[-1].blocks[0]}) on it"
        )
        trainer.transform = lambda features, train: features
        trainer.fixed_norms = []
        target = head
    else:
        trainer.train_loader, trainer.valid_loader = build_loaders(cfg, data, acc, stage.load_size, stage.batch_size)
        trainer.transform = view
    trainer.model, trainer.optimizer = acc.prepare(target, optimizer)
    steps = epoch_steps(len(trainer.train_loader), trainer.grad_accum, trainer.max_steps_per_epoch)
    trainer.schedule = Schedule(trainer.optimizer, stage.schedule, total_steps=stage.epochs * steps, steps_per_epoch=steps)
    trainer.epochs = plan.end_epoch
    trainer.start = (plan.first_epoch, 0)
    trainer.stage = plan.index if plan.staged else None
    trainer.train_mode()


def describe(trainer: Trainer, plan: StagePlan, cfg: Config) -> str:
    """The stage's first line: epochs, frozen groups, peak LR per group, schedule, image size."""
    stage = plan.cfg
    groups = getattr(trainer, "layer_groups", None) or []
    frozen = frozen_groups(stage.freeze_to, len(groups)) if groups else 0
    if frozen == 0:
        frozen_text = "nothing frozen"
    else:
        bn = "; their normalization layers train" if cfg.finetune.train_bn and not stage.precompute else ""
        frozen_text = f"groups 0-{frozen - 1} frozen{bn}" if frozen > 1 else f"group 0 frozen{bn}"
    if cfg.finetune.freeze_bn_stats and not stage.precompute:
        frozen_text += ", BatchNorm running statistics kept"
    lrs = ("swept " if stage.lr == "auto" else "") + "peak LR " + _group_lrs(trainer)
    sched = stage.schedule
    shape = {"sgdr": f"sgdr (cycle_len {sched.cycle_len}, cycle_mult {sched.cycle_mult})", "onecycle": "one-cycle"}.get(sched.name, sched.name)
    view = "precomputed activations" if stage.precompute else ("augmented" if stage.augment else "no augmentation")
    epochs = f"epoch {plan.first_epoch}" if stage.epochs == 1 else f"epochs {plan.first_epoch}-{plan.end_epoch - 1}"
    return (f"{plan.name} ({plan.index + 1}/{len(cfg.run_stages())}): {epochs}, {frozen_text}, {lrs}, {shape}, "
            f"{stage.image_size} px from {stage.load_size} ({view}), batch {stage.batch_size} per rank")


def _group_lrs(trainer: Trainer) -> str:
    lrs = trainer.schedule.base_lrs
    if trainer.lr_owner is None:
        return f"{max(lrs):.2e} (every group)"
    per_group = dict(zip(trainer.lr_owner, lrs))
    return " / ".join(f"{lr:.2e}" for _, lr in sorted(per_group.items())) + " (group 0 .. head)"
