"""The optimizer and its parameter groups: no weight decay on biases, norm weights, tokens, position
embeddings and layer scales (by parameter name and shape, the same rule for every family)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from disttrain.config import OptimConfig

NO_DECAY_IN_NAME = ("pos_embed", "position_embedding", "relative_position_bias", "rel_pos", "layer_scale")
"""Parts of a parameter's own name that mean no weight decay: position embeddings (ViT's
`pos_embedding`, timm's `pos_embed`), relative position bias tables (Swin, MaxViT), layer scales
(torchvision ConvNeXt's `layer_scale`, timm's `layer_scale_1`)."""
NO_DECAY_NAMES = ("gamma", "logit_scale")
"""Parameter names that mean no weight decay: timm's layer scales (`gamma`, `ls1.gamma`) and Swin
v2's attention temperature (`logit_scale`)."""


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter is kept out of weight decay: every parameter with ndim <= 1 (biases,
    norm weights), tokens (`class_token`, `cls_token`, `dist_token`, `register_tokens`), position
    embeddings and relative position biases, layer scales and Swin v2's logit scale. Decay pulls
    these towards 0, which is no regularization for an offset, a scale or an embedding."""
    own = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or own.endswith(("token", "tokens")) or own in NO_DECAY_NAMES or any(part in own for part in NO_DECAY_IN_NAME)


def decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, **options) -> list[dict]:
    """The trainable parameters as optimizer param groups: those with `weight_decay`, then those
    without (`no_weight_decay`); empty ones left out, each with `options` (e.g. its `lr`)."""
    decay, no_decay = [], []
    for name, param in named:
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": params, "weight_decay": wd, **options} for params, wd in ((decay, weight_decay), (no_decay, 0.0)) if params]


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    lr = 1.0 if cfg.lr == "auto" else cfg.lr  # auto: the sweep sets the real peak LR before training
    return make_optimizer(cfg, decay_groups(model.named_parameters(), cfg.weight_decay), lr)


def make_optimizer(cfg: OptimConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """`cfg.name` over `groups` (a group's own `lr` wins over `lr`)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.betas2))
