"""Loading a run config: YAML plus `section.key=value` overrides, typed by the dataclass fields.

These are the unchecked builders: they know no model family, so they do not check model.name, nor
give a model its own input size. A run's config comes from disttrain.models.checks's `load_config`
/ `build_config`, which pass them the family's defaults and checks."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union

import yaml

from disttrain.config.schema import Config, ConfigError, StageConfig
from disttrain.config.stages import resolve_stage, run_stages

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a CLI string) to the field type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise bad
        present = [a for a in args if a is not type(None)]
        if len(present) == 1:  # Optional[X]: X's own message (e.g. which list item is wrong)
            return _coerce(key, value, present[0])
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):  # YAML 1.1 reads a bare on/off as a boolean
            value = "on" if value else "off"
        text = str(value).strip() if not isinstance(value, bool) else value
        for choice in choices:
            if text == choice or str(text) == str(choice):
                return choice
        raise bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            parsed = yaml.safe_load(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    raise bad from None
                if as_float.is_integer():
                    return int(as_float)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _unknown(key: str, valid: list[str]) -> ConfigError:
    """An unknown key: the closest valid one where there is one; else the keys of its section, or,
    for an unknown section, the sections (never all 70 keys)."""
    section = key.split(".", 1)[0]
    sections = list(dict.fromkeys(k.split(".", 1)[0] for k in valid)) + [STAGES]
    if section in sections:
        own = [k[len(section) + 1 :] for k in valid if k.startswith(section + ".")]
        close = difflib.get_close_matches(key[len(section) + 1 :], own, n=1, cutoff=0.6)
        if close:
            return ConfigError(f"unknown config key {key!r}; did you mean {section + '.' + close[0]!r}?")
        return ConfigError(f"unknown config key {key!r}; the keys of {section} are {', '.join(own)}")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) if "." in key else []
    if close:
        return ConfigError(f"unknown config key {key!r}; did you mean {close[0]!r}?")
    near = difflib.get_close_matches(section, sections, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    where = f" (in {key!r})" if key != section else ""
    return ConfigError(f"unknown config section {section!r}{where}; {hint}the sections are {', '.join(sections)}")


def _leaf_types(cls: type = None, prefix: str = "") -> dict[str, Any]:
    """Every settable key (`section.key`, `section.sub.key`) with its field type."""
    cls = cls or Config
    out: dict[str, Any] = {}
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, key + "."))
        elif cls is not Config:
            out[key] = tp
    return out


def _all_keys() -> list[str]:
    return list(_leaf_types())


def _flatten(raw: Any, prefix: str, flat: dict[str, Any], leaves: dict[str, Any], unknown=_unknown, where: str = "") -> None:
    """YAML mappings of sections (and sub-sections) -> `{"section.key": value}`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.')}: must be a mapping of keys, got {raw!r}")
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if key in leaves:
            flat[key] = value
        elif any(k.startswith(key + ".") for k in leaves):
            if value is not None:
                _flatten(value, key + ".", flat, leaves, unknown, where)
        else:
            raise unknown(key, list(leaves))


# -- stages: `stages:` is a list of mappings; overrides say `stages.1.lr=3e-3` (or `stages[1].lr=...`)

STAGES = "stages"
_INHERITED = ("schedule.", "sweep.")  # a stage's sections start from the run's own


def _stage_unknown(index: int):
    def unknown(key: str, valid: list[str]) -> ConfigError:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            return ConfigError(f"unknown config key 'stages[{index}].{key}'; did you mean 'stages[{index}].{close[0]}'?")
        own = [k for k in valid if not k.startswith(_INHERITED)]
        return ConfigError(f"unknown config key 'stages[{index}].{key}'; the keys of a stage are {', '.join(own)}, schedule.*, sweep.*")

    return unknown


def _stage_override(key: str, value: Any, stage_flats: list[dict[str, Any]]) -> None:
    """`stages.1.lr=3e-3` / `stages[1].lr=3e-3` into the flat keys of stage 1."""
    normal = re.sub(r"^stages\[(\d+)\]\.", r"stages.\1.", key)
    parts = normal.split(".", 2)
    if len(parts) < 3 or not parts[1].isdigit():
        raise ConfigError(f"{key!r}: a stage key looks like stages.<index>.<key>, e.g. stages.1.lr=3e-3")
    index, name = int(parts[1]), parts[2]
    if index >= len(stage_flats):
        have = f"stages 0 to {len(stage_flats) - 1}" if stage_flats else "no stages"
        raise ConfigError(f"{key!r}: the config has {have}; add the stage to the config file's stages: list")
    leaves = _leaf_types(StageConfig)
    if name not in leaves:
        raise _stage_unknown(index)(name, list(leaves))
    stage_flats[index][name] = value


def _build_stages(raw_stages: Any, stage_overrides: list[tuple[str, Any]], flat: dict[str, Any], cfg: "Config") -> list[StageConfig]:
    if raw_stages is None:
        raw_stages = []
    if not isinstance(raw_stages, list):
        raise ConfigError(f"stages: must be a list of stages (- epochs: 1 ...), got {raw_stages!r}")
    leaves = _leaf_types(StageConfig)
    stage_flats: list[dict[str, Any]] = []
    for index, item in enumerate(raw_stages):
        stage_flat: dict[str, Any] = {}
        _flatten(item if item is not None else {}, "", stage_flat, leaves, _stage_unknown(index), where=f"stages[{index}].")
        stage_flats.append(stage_flat)
    for key, value in stage_overrides:
        _stage_override(key, value, stage_flats)
    stages = []
    for index, stage_flat in enumerate(stage_flats):
        inherited = {k: v for k, v in flat.items() if k.startswith(_INHERITED)}
        try:
            stage = _build(StageConfig, "", {**inherited, **stage_flat})
        except ConfigError as err:
            raise ConfigError(f"stages[{index}].{err}") from None
        stages.append(resolve_stage(stage, cfg, index))
    return stages



def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """`["data.batch_size=32", ...]` -> `[("data.batch_size", "32"), ...]`."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-3)")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def _build(cls: type, prefix: str, flat: dict[str, Any]):
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, key + ".", flat)
        elif key == STAGES:
            continue  # built by _build_stages, once the sections they inherit from exist
        elif key in flat:
            kwargs[f.name] = _coerce(key, flat[key], tp)
    return cls(**kwargs)


Defaults = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""Given the keys set so far (`{"section.key": value}`), values for keys they do not set."""
Check = Callable[[Config], None]
"""A check of the built config that raises ConfigError."""


def build_config_unchecked(raw: dict[str, Any] | None = None, overrides: list[str] | tuple = (), defaults: Defaults | None = None,
                           check: Check | None = None) -> Config:
    """A Config from a nested dict (YAML) plus `key=value` override strings, each section's values
    checked, but NOT against a model family (use disttrain.models.checks.build_config for a run).
    `defaults` fills keys neither sets, before the sections are built; `check` runs on the result."""
    raw = dict(raw or {})
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a mapping of sections (run:, data:, ...)")
    raw_stages = raw.pop(STAGES, None)
    leaves = _leaf_types()
    flat: dict[str, Any] = {}
    _flatten(raw, "", flat, leaves)
    stage_overrides = []
    for key, value in parse_overrides(list(overrides)):
        if key.startswith((STAGES + ".", STAGES + "[")):
            stage_overrides.append((key, value))
            continue
        if key not in leaves:
            raise _unknown(key, list(leaves))
        flat[key] = value
    if defaults is not None:
        for key, value in defaults(dict(flat)).items():
            flat.setdefault(key, value)
    cfg = _build(Config, "", flat)
    cfg.stages = _build_stages(raw_stages, stage_overrides, flat, cfg)
    run_stages(cfg)  # the implicit stage of a run without stages is checked too (e.g. sgdr epochs)
    if cfg.train.interpret and cfg.data.format != "folder":
        raise ConfigError("train.interpret: needs data.format=folder (it shows images by their paths; shards hold none); "
                          "set train.interpret=false and run `disttrain evaluate --interpret DIR --data <image folder>`")
    if check is not None:
        check(cfg)
    return cfg


def load_config_unchecked(path: str | Path | None, overrides: list[str] | tuple = (), defaults: Defaults | None = None,
                          check: Check | None = None) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides, NOT
    checked against a model family (use disttrain.models.checks.load_config for a run); `defaults`
    and `check` as `build_config_unchecked`'s. A ConfigError names the file."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return build_config_unchecked(raw, overrides, defaults, check)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (readable back with disttrain.models.checks.load_config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
