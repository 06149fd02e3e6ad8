"""Classification models by name (torchvision's, and timm's as `timm/<name>`: disttrain/models/timm.py), a
head sized to the data, pretrained weights (a local state dict or safetensors file, torchvision's
ImageNet weights from torch's hub cache, timm's from the Hugging Face cache), the preprocessing
they expect, and the optimizer (no weight decay on biases, norm weights, tokens, position embeddings and
layer scales)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterable

import torch
import torchvision
from torch import nn

from disttrain.models import timm as zoo
from disttrain.config import IMAGENET, TIMM, AugmentConfig, ModelConfig, OptimConfig
from disttrain.data.augment import IMAGENET_MEAN, IMAGENET_STD
from disttrain.errors import UserError

DOWNLOAD_TIMEOUT = 30  # seconds without an answer before a weights download counts as failed


class WeightsError(UserError):
    """A weights file that does not fit the model; the message names the file and the fix."""


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """`cfg.name` with a head for `num_classes`, from `cfg.pretrained` (for `imagenet` the hub file
    must be there already: `fetch_imagenet_weights`; for `timm` the Hugging Face cache's file)."""
    if zoo.is_timm(cfg.name):
        model = zoo.create(cfg.name, num_classes, zoo.cached_weights(cfg.name) if cfg.pretrained == TIMM else None)
    else:
        model = torchvision.models.get_model(cfg.name, weights=None, num_classes=num_classes)
    if cfg.pretrained not in (None, TIMM):
        skipped = load_pretrained(model, pretrained_file(cfg))
        if zoo.is_timm(cfg.name) and any(name.startswith(zoo.classifier_name(model) + ".") for name in skipped):
            model.reset_classifier(num_classes)  # a fresh head as timm makes one for pretrained weights (its from-scratch
            # init of some families, EfficientNet's and MobileNet's, is scaled for 1000 classes: large logits for 2)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def imagenet_weights(name: str):
    """torchvision's default weights enum member for model `name`."""
    return torchvision.models.get_model_weights(name).DEFAULT


def imagenet_file(name: str) -> tuple[Path, str]:
    """(where torch's hub cache keeps `name`'s ImageNet weights, the URL they come from)."""
    url = imagenet_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def pretrained_file(cfg: ModelConfig) -> Path:
    if cfg.pretrained == IMAGENET:
        return imagenet_file(cfg.name)[0]
    return Path(cfg.pretrained).expanduser()


def fetch_imagenet_weights(name: str, progress: bool = True) -> Path:
    """The hub-cache file of `name`'s ImageNet weights, downloaded there when missing (call on one
    process). Raises WeightsError naming the file, its URL and the folder when it cannot be had."""
    path, url = imagenet_file(name)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=progress)
    except Exception as err:  # no network, a proxy's refusal, a timeout, a full disk
        reason = getattr(err, "reason", None) or err
        raise WeightsError(
            f"model.pretrained=imagenet: {path.name} is not in {path.parent} and could not be downloaded from {url} "
            f"({reason}); download it on a machine with network and put it in {path.parent} (or set TORCH_HOME)"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def normalization(model: ModelConfig, augment: AugmentConfig) -> tuple[list[float], list[float], str]:
    """(mean, std, where they come from): augment.mean/std when set, else the pretrained weights'
    own (a disttrain model.pt keeps its own; a timm model's are its `pretrained_cfg`'s, pretrained
    or not; torchvision's weights and plain state dicts follow the ImageNet convention), else ImageNet's."""
    mean, std, source = list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet's, the default"
    if zoo.is_timm(model.name):
        own = zoo.preprocess(model.name)
        mean, std, source = own.mean, own.std, f"timm's pretrained_cfg of {zoo.timm_name(model.name)}"
    if model.pretrained == IMAGENET:
        transforms = imagenet_weights(model.name).transforms()
        mean, std, source = list(transforms.mean), list(transforms.std), f"the ImageNet weights' own ({model.name})"
    elif model.pretrained is not None:
        saved = _saved_normalization(Path(model.pretrained).expanduser())
        if saved is not None:
            mean, std = saved
            source = f"{model.pretrained}'s own"
        elif not zoo.is_timm(model.name):
            source = f"ImageNet's, the convention of torchvision state dicts like {Path(model.pretrained).name}"
    if augment.mean is not None or augment.std is not None:
        mean, std = augment.mean or mean, augment.std or std
        source = "augment.mean/std"
    return mean, std, source


def interpolation(model: ModelConfig, augment: AugmentConfig) -> tuple[str, str]:
    """(the device resample's interpolation, where it comes from): augment.interpolation when set,
    else a timm model's `pretrained_cfg`'s, else bilinear (torchvision's weights' own)."""
    if augment.interpolation != "auto":
        return augment.interpolation, "augment.interpolation"
    if zoo.is_timm(model.name):
        return zoo.preprocess(model.name).interpolation, f"timm's pretrained_cfg of {zoo.timm_name(model.name)}"
    return "bilinear", "torchvision's weights' own"


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
            from safetensors.torch import load_file

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
