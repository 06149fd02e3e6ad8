"""One stage of a run, set up from the unwrapped model: frozen groups, param groups and a new
optimizer, a new DDP wrapper, the schedule, loaders and augmentation at the stage's sizes (or
precomputed activations). `enter_stage` returns it as one `StageSetup` that the Trainer takes whole.

The DDP wrapper and the optimizer are built per stage from the unwrapped model, after the freezing:
DDP registers the parameters that require grad when it is built and all-reduces only those, so a
wrapper kept across an unfreeze would leave the newly trainable weights unsynchronized (the ranks
drift apart without an error). The previous stage's wrapper and optimizer are released first, so
their gradient hooks are gone, and so are its loaders (their workers stopped, the images they
cached and the activations precomputed for it freed): two stages' data never coexist. Each stage's
optimizer starts with fresh state.

Entering a stage draws nothing from the run's random streams (the data loaders it iterates to
precompute would otherwise draw their seeds): a resumed run enters its stage again, and must continue
with the random state its checkpoint holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from disttrain.config import Config, StageConfig, frozen_groups, run_stages
from disttrain.data.folder import DataError
from disttrain.data.setup import build_loaders, eval_loader, release_loaders
from disttrain.models.groups import freeze, group_lrs
from disttrain.models.groups import param_groups as layer_param_groups
from disttrain.models.optim import decay_groups, make_optimizer
from disttrain.train import precompute as precomputing
from disttrain.train.schedule import Schedule
from disttrain.train.trainer import StageSetup, Trainer, epoch_steps


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
    for index, stage in enumerate(run_stages(cfg)):
        plans.append(StagePlan(index, stage, epoch, staged=bool(cfg.stages)))
        epoch += stage.epochs
    return plans


def enter_stage(trainer: Trainer, cfg: Config, data, plan: StagePlan) -> StageSetup:
    """The stage's setup, built from the trainer's bare model (whose weights must already be the
    ones the stage starts from: a resumed run loads its checkpoint's before this)."""
    with torch.random.fork_rng(devices=[]):
        return _setup(trainer, cfg, data, plan)


def _setup(trainer: Trainer, cfg: Config, data, plan: StagePlan) -> StageSetup:
    acc, stage, module = trainer.accelerator, plan.cfg, trainer.module
    trainer.release_stage()
    groups = trainer.layer_groups
    frozen = frozen_groups(stage.freeze_to, len(groups)) if groups else 0
    # a precompute stage never runs the body in training: its norms cannot train there (train_bn)
    train_bn = cfg.finetune.train_bn and not stage.precompute
    fixed_norms = freeze(module, groups, frozen, train_bn, cfg.finetune.freeze_bn_stats) if groups else []
    lr = 1.0 if stage.lr == "auto" else stage.lr  # auto: the sweep sets the real peak LR before training
    if groups and stage.lr_ratio != 1:
        optimizer_groups, lr_owner = layer_param_groups(groups, group_lrs(lr, stage.lr_ratio, len(groups)), cfg.optim.weight_decay)
    else:
        optimizer_groups, lr_owner = decay_groups(module.named_parameters(), cfg.optim.weight_decay), None
    optimizer = make_optimizer(cfg.optim, optimizer_groups, lr)

    augment = trainer.augment
    augment.image_size = stage.image_size
    view = augment if stage.augment else (lambda images, train: augment(images, train=False))
    target: nn.Module = module
    target_name = ""
    if stage.precompute:
        head_name = target_name = groups[-1].blocks[0]
        if not len(data.valid):
            raise DataError(f"{plan.name}: precompute needs validation images and data.valid_pct=0 leaves none; "
                            f"set precompute: false for that stage (or data.valid_pct > 0)")
        target = module.get_submodule(head_name)
        bs, world = stage.batch_size, acc.num_processes
        steps = -(-len(data.train) // (world * bs))  # as the image path's RankBatchSampler: equal on every rank
        shares = (eval_loader(cfg, data.train, acc, trainer.workers, stage.load_size, bs * 2, name="precompute train"),
                  eval_loader(cfg, data.valid, acc, trainer.workers, stage.load_size, bs * 2, name="precompute valid"))
        features = precomputing.precompute(acc, module, target, view, *shares, bs, steps, cfg.run.seed)
        release_loaders(*shares)
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}[features.dtype]
        trainer.reporter.line(
            f"{plan.name}: precomputed the frozen body's output for {len(data.train)} train + {len(data.valid)} valid images in "
            f"{features.seconds:.1f} s ({'x'.join(map(str, features.shape))} per image, each rank keeps its own share as {dtype}); "
            f"training the head ({head_name}) on it"
        )
        train_loader, valid_loader = features.train, features.valid
        transform, fixed_norms = (lambda inputs, train: inputs), []
        inputs = f"precomputed activations, {features.bytes_per_rank / 2**20:.2f} MB of {dtype} per rank"
    else:
        train_loader, valid_loader = build_loaders(cfg, data, acc, trainer.workers, stage.load_size, stage.batch_size)
        transform = view
        inputs = "augmented" if stage.augment else "no augmentation"
    model, optimizer = acc.prepare(target, optimizer)
    compiled = torch.compile(model) if cfg.train.compile else None  # a new wrapper per stage: dynamo's guards
    # (requires_grad, shapes) decide what compiles again; the trainer reports each compile
    steps = epoch_steps(len(train_loader), trainer.grad_accum, trainer.max_steps_per_epoch)
    return StageSetup(
        model=model, optimizer=optimizer,
        schedule=Schedule(optimizer, stage.schedule, total_steps=stage.epochs * steps, steps_per_epoch=steps),
        train_loader=train_loader, valid_loader=valid_loader, transform=transform,
        first_epoch=plan.first_epoch, end_epoch=plan.end_epoch, index=plan.index if plan.staged else None,
        fixed_norms=fixed_norms, lr_owner=lr_owner, images=not stage.precompute, inputs=inputs, compiled=compiled,
        target=target_name, mix=mixes(stage), ema=updates_ema(stage, cfg),
        ema_restart=plan.index > 0 and updates_ema(stage, cfg) and not updates_ema(run_stages(cfg)[plan.index - 1], cfg),
    )


def mixes(stage: StageConfig) -> bool:
    """MixUp/CutMix in this stage (stages[i].mix; null: when it trains on augmented images)."""
    return stage.mix if stage.mix is not None else stage.augment and not stage.precompute


def updates_ema(stage: StageConfig, cfg: Config) -> bool:
    """The weight EMA (train.ema) is updated in this stage (stages[i].ema; null: unless it is a precompute stage)."""
    return cfg.train.ema is not None and (stage.ema if stage.ema is not None else not stage.precompute)


def describe(trainer: Trainer, plan: StagePlan, cfg: Config) -> str:
    """The stage's first line: epochs, frozen groups, peak LR per group, schedule, image size."""
    stage = plan.cfg
    groups = trainer.layer_groups
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
    epochs = f"epoch {plan.first_epoch}" if stage.epochs == 1 else f"epochs {plan.first_epoch}-{plan.end_epoch - 1}"
    return (f"{plan.name} ({plan.index + 1}/{len(run_stages(cfg))}): {epochs}, {frozen_text}, {lrs}, {shape}, "
            f"{stage.image_size} px from {stage.load_size} ({trainer.inputs}), batch {stage.batch_size} per rank")


def _group_lrs(trainer: Trainer) -> str:
    lrs = trainer.schedule.base_lrs
    if trainer.lr_owner is None:
        return f"{max(lrs):.2e} (every group)"
    per_group = dict(zip(trainer.lr_owner, lrs))
    return " / ".join(f"{lr:.2e}" for _, lr in sorted(per_group.items())) + " (group 0 .. head)"
