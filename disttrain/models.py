"""torchvision classification models by name, a head sized to the data, local pretrained weights,
and parameter groups (no weight decay on norm weights and biases)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from disttrain.config import ModelConfig, OptimConfig


class WeightsError(ValueError):
    """A weights file that does not fit the model; the message names the file and the fix."""


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    model = torchvision.models.get_model(cfg.name, weights=None, num_classes=num_classes)
    if cfg.pretrained is not None:
        load_pretrained(model, cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare state dict, or one of our checkpoints (`{"model": ...}`)."""
    path = Path(path).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a loadable state dict ({err})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices/kernels with weight decay; norm weights and biases (1-d) without."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    lr = 1.0 if cfg.lr == "auto" else cfg.lr  # auto: the sweep sets the real peak LR before training
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.betas2))
