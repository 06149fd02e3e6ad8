"""The run config checked against the model families: the loader everyone above uses.

disttrain/config builds a config from YAML and overrides with no model family involved. Here, where
the config and the families are both known, the config gets what needs a family: a model's own
input size where data.image_size / data.load_size are not given (a timm model's `pretrained_cfg`),
does `model.name` exist and does `model.pretrained` fit its family, do model.drop_rate and
model.drop_path_rate fit it (stochastic depth only where the family has it), and do
`finetune.groups` fit the model. The launcher front runs this before any process starts.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Mapping

from disttrain.config import Config, ConfigError, ModelConfig
from disttrain.config.parse import build_config_unchecked, load_config_unchecked
from disttrain.models.build import empty_model
from disttrain.models.families import family_of
from disttrain.models.groups import split_layer_groups

SIZE_KEYS = ("data.image_size", "data.load_size")


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None), apply overrides, and check
    it against its model family; a ConfigError names the file."""
    return load_config_unchecked(path, overrides, defaults=size_defaults, check=check_model)


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple = ()) -> Config:
    """A Config from a nested dict (YAML) plus `key=value` override strings, checked against its model family."""
    return build_config_unchecked(raw, overrides, defaults=size_defaults, check=check_model)


def size_defaults(given: Mapping[str, Any]) -> dict[str, Any]:
    """data.image_size and data.load_size where `given` (the keys set so far) does not set them, from
    the model's own input size (a timm model's pretrained_cfg: input size, image_size / crop_pct)."""
    name = given.get("model.name")
    if not isinstance(name, str) or set(SIZE_KEYS) <= set(given):
        return {}
    own = family_of(name).input_size(name)
    if own is None:
        return {}
    out: dict[str, Any] = {} if "data.image_size" in given else {"data.image_size": own.image_size}
    if "data.load_size" not in given:
        try:
            size = int(given.get("data.image_size", own.image_size))
        except (TypeError, ValueError):
            return out  # not a number: building data.image_size says so
        out["data.load_size"] = max(size, math.floor(size / own.crop_pct))  # the eval resize by crop_pct
    return out


def check_model(cfg: Config) -> None:
    """ConfigError unless model.name exists in its family, model.pretrained fits it, model.drop_rate
    and model.drop_path_rate are probabilities the model takes, and (with stages) the model can be
    cut into finetune.groups layer groups."""
    check_rates(cfg.model)
    family_of(cfg.model.name).check(cfg.model)  # also: drop_path_rate for a family without stochastic depth
    if cfg.stages:  # finetune.groups against model.name, built on the meta device (no weights, no memory)
        check_groups(cfg.model.name, cfg.finetune.groups)


def check_rates(model: ModelConfig) -> None:
    """ConfigError unless model.drop_rate and model.drop_path_rate are null or in [0, 1)."""
    for key in ("drop_rate", "drop_path_rate"):
        value = getattr(model, key)
        if value is not None and not 0 <= value < 1:  # a number: the config's types say so first
            raise ConfigError(f"model.{key}: a probability in [0, 1) or null (the architecture's default), got {value!r}")


@functools.lru_cache(maxsize=None)
def check_groups(name: str, groups: int) -> None:
    """Raise SplitError (a ConfigError) when model `name` cannot be cut into `groups` layer groups."""
    split_layer_groups(empty_model(name), groups, name)
