"""Stage resolution: a stage's keys left out taken from the run's sections, checked against them."""

from __future__ import annotations

import dataclasses

from disttrain.config.schema import Config, ConfigError, StageConfig, _positive


def run_stages(cfg: Config) -> list[StageConfig]:
    """The stages to run: `cfg.stages`, or the one stage the top-level sections describe."""
    return cfg.stages or [resolve_stage(StageConfig(schedule=cfg.schedule, sweep=cfg.sweep), cfg)]


def resolve_stage(stage: StageConfig, cfg: "Config", index: int | None = None) -> StageConfig:
    """A stage with the keys it left out taken from the run's sections, checked against them (index
    None: the one implicit stage of a run without `stages`, whose keys are the sections' own)."""

    def key(name: str) -> str:
        if index is not None:
            return f"stages[{index}].{name}"
        return {"epochs": "train.epochs", "lr": "optim.lr", "image_size": "data.image_size"}.get(name, name)

    groups = cfg.finetune.groups
    image_size = stage.image_size if stage.image_size is not None else cfg.data.image_size
    load_size = stage.load_size
    if load_size is None:  # keep the run's presize margin at a larger image size
        load_size = max(cfg.data.load_size, round(image_size * cfg.data.load_size / cfg.data.image_size))
    stage = dataclasses.replace(
        stage,
        epochs=stage.epochs if stage.epochs is not None else cfg.train.epochs,
        lr=stage.lr if stage.lr is not None else cfg.optim.lr,
        image_size=image_size,
        load_size=load_size,
        batch_size=stage.batch_size if stage.batch_size is not None else cfg.data.batch_size,
    )
    for name in ("epochs", "image_size", "load_size", "batch_size", "lr_ratio"):
        _positive(key(name), getattr(stage, name))
    if stage.lr != "auto":
        _positive(key("lr"), stage.lr)
    if stage.lr_ratio < 1:
        raise ConfigError(f"{key('lr_ratio')}: {stage.lr_ratio} would give the first group a higher LR than the head; "
                          "use 1 (one LR) or more (e.g. 100: the first group at lr / 100)")
    if stage.image_size > stage.load_size:
        raise ConfigError(f"{key('load_size')}: {stage.load_size} is smaller than the image size {stage.image_size}; "
                          "set it to at least the image size")
    if not -groups <= stage.freeze_to <= groups:
        raise ConfigError(
            f"{key('freeze_to')}: {stage.freeze_to} is outside the {groups} layer groups (finetune.groups); use 0 (train "
            f"everything), -1 (everything but the head) or 1 to {groups - 1}"
        )
    frozen = frozen_groups(stage.freeze_to, groups)
    if frozen == groups and not cfg.finetune.train_bn:
        what = "lr: auto has nothing to sweep" if stage.lr == "auto" else "nothing would train"
        raise ConfigError(
            f"{key('freeze_to')}: {stage.freeze_to} freezes every layer group and finetune.train_bn is false, so "
            f"{what}; use freeze_to -1 to train the head"
        )
    if stage.schedule.name == "sgdr":
        fits = sgdr_epoch_counts(stage.schedule.cycle_len, stage.schedule.cycle_mult, stage.epochs)
        if stage.epochs not in fits:
            counts = ", ".join(map(str, fits[:-1])) + f" or {fits[-1]}" if len(fits) > 1 else str(fits[0])
            raise ConfigError(
                f"{key('epochs')}: {stage.epochs} epochs do not fit whole SGDR cycles (cycle_len {stage.schedule.cycle_len}, "
                f"cycle_mult {stage.schedule.cycle_mult}: {counts} epochs); change the epochs or the cycles"
            )
    if stage.precompute:
        if stage.augment:
            raise ConfigError(f"{key('precompute')}: the body's output is computed once per image, so every epoch sees the "
                              f"same view; set {key('augment')}=false")
        if frozen != groups - 1:
            raise ConfigError(f"{key('precompute')}: needs everything but the head frozen; set {key('freeze_to')}=-1")
        if cfg.data.format != "folder":
            raise ConfigError(f"{key('precompute')}: needs data.format=folder (the activations are indexed by image)")
        if stage.mix:
            raise ConfigError(f"{key('mix')}: MixUp/CutMix mix images, and a precompute stage trains on the body's output; "
                              f"set {key('mix')}=false (or null)")
    return stage


def frozen_groups(freeze_to: int, groups: int) -> int:
    """How many layer groups (from the first) `freeze_to` freezes: negative counts from the end."""
    return freeze_to if freeze_to >= 0 else groups + freeze_to


def sgdr_epoch_counts(cycle_len: int, cycle_mult: int, at_least: int) -> list[int]:
    """Epoch counts made of whole SGDR cycles, up to the first one >= `at_least` (and at least 4 of them)."""
    counts, length, total = [], cycle_len, 0
    while len(counts) < 4 or counts[-1] < at_least:
        total += length
        counts.append(total)
        length *= cycle_mult
    return counts

