"""The run configuration: the schema (one dataclass per section), loading (YAML + `section.key=value`
overrides) and stage resolution. This package imports nothing else of disttrain but its errors, so
it knows no model family: a run's config is loaded with disttrain.models.checks's `load_config` /
`build_config`, which add the family's input size and checks to disttrain.config.parse's unchecked
builders."""

from disttrain.config.schema import (
    IMAGENET,
    TIMM,
    AugmentConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    StageConfig,
    SweepConfig,
    TrainConfig,
    WandbConfig,
)
from disttrain.config.parse import parse_overrides, save_config
from disttrain.config.stages import frozen_groups, resolve_stage, run_stages, sgdr_epoch_counts

__all__ = [
    "IMAGENET", "TIMM", "AugmentConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "FinetuneConfig",
    "LogConfig", "ModelConfig", "OptimConfig", "RunConfig", "ScheduleConfig", "StageConfig", "SweepConfig", "TrainConfig",
    "WandbConfig", "parse_overrides", "save_config", "frozen_groups", "resolve_stage",
    "run_stages", "sgdr_epoch_counts",
]
