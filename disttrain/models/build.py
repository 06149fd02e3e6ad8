"""Classification models by name, through their family (disttrain/models/families.py: torchvision's,
and timm's as `timm/<name>`): a head sized to the data, pretrained weights (the family's own, or a
local state dict or safetensors file loaded by name and shape), and the preprocessing they expect
(a weights file's own normalization, else the family's, else augment.mean/std when set)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from disttrain.config import AugmentConfig, ModelConfig
from disttrain.models.families import family_of
from disttrain.models.family import WeightsError


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """`cfg.name` with a head for `num_classes`, from `cfg.pretrained` (for `imagenet` the hub file
    must be there already: `fetch_imagenet_weights`; for `timm` the Hugging Face cache's file),
    with `cfg.drop_rate` and `cfg.drop_path_rate` (the family says where they go; neither changes the
    state dict's keys). ConfigError first where the family refuses `cfg` (e.g. a model.pt's `arch`
    this timm lacks, or stochastic depth for a torchvision family without it)."""
    family = family_of(cfg.name)
    family.check(cfg)
    model = family.create(cfg.name, num_classes, cfg.pretrained, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    path = pretrained_file(cfg)
    if path is not None:
        family.fit_head(model, load_pretrained(model, path), num_classes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def empty_model(name: str, num_classes: int = 2) -> nn.Module:
    """Model `name` on the meta device: shapes only, no memory, no initialization cost."""
    return family_of(name).empty(name, num_classes)


def pretrained_file(cfg: ModelConfig) -> Path | None:
    """The file disttrain loads into the model by name and shape: a weights file's path, or where
    the family keeps its own weights; None when `create` took them or there are none."""
    if cfg.pretrained is None:
        return None
    family = family_of(cfg.name)
    if cfg.pretrained == family.weights:
        return family.weights_file(cfg.name)
    return Path(cfg.pretrained).expanduser()


def normalization(model: ModelConfig, augment: AugmentConfig) -> tuple[list[float], list[float], str]:
    """(mean, std, where they come from): augment.mean/std when set, else the pretrained weights'
    own (a disttrain model.pt keeps its own), else the family's for those weights (a timm model's
    `pretrained_cfg`, pretrained or not; torchvision's weights and plain state dicts follow the
    ImageNet convention; ImageNet's from scratch)."""
    family = family_of(model.name)
    mean, std, source = family.normalization(model.name, model.pretrained)
    if model.pretrained is not None and model.pretrained != family.weights:
        saved = _saved_normalization(Path(model.pretrained).expanduser())
        if saved is not None:
            mean, std = saved
            source = f"{model.pretrained}'s own"
    if augment.mean is not None or augment.std is not None:
        mean, std = augment.mean or mean, augment.std or std
        source = "augment.mean/std"
    return mean, std, source


def interpolation(model: ModelConfig, augment: AugmentConfig) -> tuple[str, str]:
    """(the device resample's interpolation, where it comes from): augment.interpolation when set,
    else the family's (a timm model's `pretrained_cfg`'s, bilinear for torchvision's)."""
    if augment.interpolation != "auto":
        return augment.interpolation, "augment.interpolation"
    return family_of(model.name).interpolation(model.name)


def _saved_normalization(path: Path) -> tuple[list[float], list[float]] | None:
    """The normalization a disttrain model.pt was trained with, if the file says."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    found = state.get("normalize") if isinstance(state, dict) else None
    if isinstance(found, dict) and "mean" in found and "std" in found:
        return list(found["mean"]), list(found["std"])
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a safetensors file, a bare state dict, or one of our checkpoints
    (`{"model": ...}`)."""
    path = Path(path).expanduser()
    try:
        if _is_safetensors(path):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a loadable state dict or safetensors file ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as stream:
        head = stream.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load every tensor whose name and shape match; the rest (a head of another size) stays as
    initialized. Returns the names skipped. Raises if the file does not look like this architecture."""
    state = read_state_dict(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    if not usable or len(skipped) > max(4, len(own) // 10):
        raise WeightsError(
            f"{path}: only {len(usable)} of {len(own)} tensors fit {type(model).__name__} "
            f"(e.g. {', '.join(skipped[:3])} do not); is it a state dict of model.name's architecture?"
        )
    model.load_state_dict(usable, strict=False)
    return skipped
