"""torchvision's classification models (`model.name: resnet18`, any name without another family's
prefix): the names, building one with the data's classes, its ImageNet weights from torch's hub
cache (`model.pretrained: imagenet`), their preprocessing, and the layer groups per model class.

Layer groups are a per-family fact, as fastai's splitters state them. SPLITS states, per
torchvision model class, the body's natural units in forward order (a stem, stages or blocks; the
final norm joins the last unit) and where the default 3 groups cut them: group 0 is the units whose
output is at stride <= 8, group 1 starts at the first unit whose output is at stride 16 (fastai's
resnet and densenet splits; its vgg16_bn split too), ViT's encoder is halved. The tests measure the
strides of every variant in torchvision's list of each class. Classes without an entry (alexnet,
googlenet, inception, squeezenet, shufflenet, mnasnet, maxvit) get disttrain/models/groups.py's
balanced blocks. The head is the last top-level child holding parameters (`fc`, `classifier`,
`heads`, `head`).

Regularization (`model.drop_rate`, `model.drop_path_rate`) is per family too, told apart by the
module of the name's builder (`torchvision.models.efficientnet` for efficientnet_b0 and _v2_s):

- drop_rate: the families whose builder takes a `dropout` that is their classifier's dropout
  (CLASSIFIER_DROPOUT) get it there; the others get a `DropoutLinear` as their final classifier
  layer (see there), which keeps the state dict's keys. ViT's and Swin's builders do have a
  `dropout`, but it is the encoder's (every MLP and attention output), not the classifier's: they
  get the DropoutLinear as well.
- drop_path_rate: torchvision's families with stochastic depth (STOCHASTIC_DEPTH) schedule it
  linearly with depth up to the rate their builder gives; convnext and efficientnet (v1 and v2)
  take another rate through their builder, swin (v1 and v2) and maxvit fix theirs in the builder,
  so each of their StochasticDepth modules is rescaled by rate / the builder's rate (the schedule
  the builder would have made with that rate). Other families have none: a ConfigError at check time.
"""

from __future__ import annotations

import difflib
import socket
from pathlib import Path
from typing import Callable

import torch
import torchvision
from accelerate import init_empty_weights
from torch import nn
from torchvision import models
from torchvision.ops import StochasticDepth

from disttrain.config import IMAGENET, TIMM, ConfigError, ModelConfig
from disttrain.data.augment import IMAGENET_MEAN, IMAGENET_STD
from disttrain.models.family import InputSize, SplitRule, Unit, WeightsError, last_child_with_parameters, parameter_count

DOWNLOAD_TIMEOUT = 30  # seconds without an answer before a weights download counts as failed


def imagenet_weights(name: str):
    """torchvision's default weights enum member for model `name`."""
    return torchvision.models.get_model_weights(name).DEFAULT


def imagenet_file(name: str) -> tuple[Path, str]:
    """(where torch's hub cache keeps `name`'s ImageNet weights, the URL they come from)."""
    url = imagenet_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


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


# -- layer groups: the units of each model class and where the default 3 groups cut them

def _holding(parent: nn.Module, prefix: str) -> list[str]:
    """`prefix.child` for each child of `parent` that holds parameters, in order."""
    return [f"{prefix}.{name}" for name, child in parent.named_children() if parameter_count(child) > 0]


def _resnet_units(model: nn.Module) -> list[Unit]:  # ResNet, ResNeXt, Wide ResNet
    return [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]


def _densenet_units(model: nn.Module) -> list[Unit]:  # conv0, norm0, denseblock1, transition1, .., denseblock4, norm5
    names = _holding(model.features, "features")
    return [tuple(names[:2]), *((name,) for name in names[2:-2]), tuple(names[-2:])]


def _vgg_units(model: nn.Module) -> list[Unit]:
    """The 5 stages: the convolutions up to and including each max-pool."""
    units, current = [], []
    for name, child in model.features.named_children():
        if parameter_count(child) > 0:
            current.append(f"features.{name}")
        if isinstance(child, nn.MaxPool2d) and current:
            units.append(tuple(current))
            current = []
    return units + ([tuple(current)] if current else [])


def _features_units(model: nn.Module) -> list[Unit]:  # MobileNet v2/v3, EfficientNet v1/v2, ConvNeXt
    return [(name,) for name in _holding(model.features, "features")]


def _regnet_units(model: nn.Module) -> list[Unit]:
    return [("stem",), *((name,) for name in _holding(model.trunk_output, "trunk_output"))]


def _vit_units(model: nn.Module) -> list[Unit]:
    layers = _holding(model.encoder.layers, "encoder.layers")
    return [("conv_proj", "class_token", "encoder.pos_embedding"), *((name,) for name in layers[:-1]), (layers[-1], "encoder.ln")]


def _swin_units(model: nn.Module) -> list[Unit]:
    stages = _holding(model.features, "features")
    return [*((name,) for name in stages[:-1]), (stages[-1], "norm")]


def _starting(member: str) -> Callable[[nn.Module, list[Unit]], int]:
    """The cut before the unit that starts with `member`."""
    return lambda model, units: next(i for i, unit in enumerate(units) if unit[0] == member)


def _first_at_stride_16(model: nn.Module, units: list[Unit]) -> int:
    """The cut before the first unit whose output is at stride 16, from the strides of its
    convolutions (models whose downsampling convolutions are all on the main path)."""
    stride = 1
    for i, unit in enumerate(units):
        for member in unit:
            stride *= _conv_stride(model.get_submodule(member))
        if stride >= 16:
            return i
    raise RuntimeError(f"{type(model).__name__}: no unit reaches stride 16; its entry in disttrain.models.torchvision's SPLITS is wrong")


def _conv_stride(module: nn.Module) -> int:
    stride = 1
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            stride *= conv.stride[0]
    return stride


def _vit_cut(model: nn.Module, units: list[Unit]) -> int:
    return 1 + len(model.encoder.layers) // 2  # after the stem, half of the encoder blocks


_HALVES = "the encoder's first half | its second half"

SPLITS: dict[type, SplitRule] = {
    models.ResNet: SplitRule("resnet", _resnet_units, _starting("layer3"), "fastai's resnet split"),
    models.DenseNet: SplitRule("densenet", _densenet_units, _starting("features.transition2"), "fastai's densenet split"),
    models.VGG: SplitRule("vgg", _vgg_units, lambda model, units: 3, "after the 3rd max-pool as fastai's vgg16_bn split"),
    models.MobileNetV2: SplitRule("mobilenet_v2", _features_units, _first_at_stride_16),
    models.MobileNetV3: SplitRule("mobilenet_v3", _features_units, _first_at_stride_16),
    models.EfficientNet: SplitRule("efficientnet", _features_units, _first_at_stride_16),
    models.ConvNeXt: SplitRule("convnext", _features_units, _first_at_stride_16),
    models.RegNet: SplitRule("regnet", _regnet_units, _starting("trunk_output.block3")),
    models.SwinTransformer: SplitRule("swin", _swin_units, _starting("features.4")),
    models.VisionTransformer: SplitRule("vit", _vit_units, _vit_cut, layout=_HALVES),
}
"""Per model class (exact: a subclass may be built otherwise), its units and default cut."""


# -- regularization: classifier dropout and stochastic depth per family

CLASSIFIER_DROPOUT = frozenset({"efficientnet", "mobilenetv2", "mobilenetv3", "mnasnet", "vgg", "alexnet", "squeezenet",
                                "googlenet", "inception"})
"""Families (builder modules) whose builder's `dropout` is the dropout before the classifier (vgg's
and alexnet's: both of its classifier's Dropout layers; googlenet's aux heads keep `dropout_aux`)."""

STOCHASTIC_DEPTH = {"convnext": "builder", "efficientnet": "builder", "swin_transformer": "rescale", "maxvit": "rescale"}
"""Families (builder modules) with stochastic depth -> how another rate gets there: `builder`, its
`stochastic_depth_prob` keyword; `rescale`, the builder fixes the rate (`rescale_stochastic_depth`)."""

STOCHASTIC_DEPTH_NAMES = "convnext_*, efficientnet_b* and efficientnet_v2_*, swin_* and swin_v2_*, maxvit_t"
"""STOCHASTIC_DEPTH's model names, for the error message."""


def builder_family(name: str) -> str:
    """The family of torchvision model `name`: its builder's module (`efficientnet` for efficientnet_v2_s)."""
    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]


class DropoutLinear(nn.Linear):
    """A Linear layer with dropout on its input: the classifier of a family whose builder has no
    classifier dropout, with `model.drop_rate`. It is a Linear subclass, its Dropout a child without
    state, so the state dict's keys stay the Linear's own (`fc.weight`, `fc.bias`): ImageNet weights,
    state dicts and checkpoints of the model without it load unchanged. In eval mode it is the Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.drop = nn.Dropout(p)

    @classmethod
    def replacing(cls, linear: nn.Linear, p: float) -> "DropoutLinear":
        """A DropoutLinear holding `linear`'s own parameters (no copy, no new initialization)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, p, device="meta")
        out.weight = linear.weight
        out.bias = linear.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.drop(x))


def add_classifier_dropout(model: nn.Module, p: float, classifier: str | None) -> None:
    """Dropout `p` before the last Linear layer of `model`'s `classifier` (the classifier itself
    where it is one: resnet's `fc`; convnext's `classifier.2`, vit's `heads.head`, maxvit's `classifier.5`)."""
    head = model.get_submodule(classifier) if classifier else None
    linears = [name for name, module in (head.named_modules() if head is not None else ()) if isinstance(module, nn.Linear)]
    if not linears:
        raise ConfigError(f"model.drop_rate: {type(model).__name__}'s classifier {classifier!r} has no Linear layer to put dropout "
                          "before; set model.drop_rate=null")
    target = f"{classifier}.{linears[-1]}" if linears[-1] else classifier
    parent, _, child = target.rpartition(".")
    model.get_submodule(parent).register_module(child, DropoutLinear.replacing(model.get_submodule(target), p))


def rescale_stochastic_depth(model: nn.Module, rate: float) -> None:
    """Stochastic depth up to `rate` for a family whose builder fixes its rate (swin, maxvit): their
    schedules are linear from 0 to that rate (the last block's), so each module's probability times
    rate / that rate is the schedule the builder would have made with `rate`. Each module is
    replaced by a new one (maxvit's attention layers call theirs twice: both take the new one)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, StochasticDepth)}
    built = max((m.p for m in modules.values()), default=0.0)
    if built <= 0:
        raise ConfigError(f"model.drop_path_rate: {type(model).__name__} was built without stochastic depth to rescale; "
                          "set model.drop_path_rate=null")
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, StochasticDepth(module.p * rate / built, module.mode))


class TorchvisionFamily:
    """torchvision's classification models (see the module docstring)."""

    name = "torchvision"
    prefix = ""
    weights = IMAGENET

    def check(self, model: ModelConfig) -> None:
        if model.pretrained == TIMM:
            raise ConfigError(f"model.pretrained: `{TIMM}` is for timm models (model.name: timm/<name>); for torchvision's "
                              f"{model.name} use `{IMAGENET}` or a state dict's path")
        names = torchvision.models.list_models(module=torchvision.models)
        if model.name not in names:
            close = difflib.get_close_matches(model.name, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"model.name: {model.name!r} is not a torchvision classification model{hint}")
        if model.pretrained == IMAGENET:
            weights = torchvision.models.get_model_weights(model.name)
            if weights is None or not hasattr(weights, "DEFAULT"):
                raise ConfigError(
                    f"model.pretrained: torchvision has no ImageNet weights for {model.name}; pick another "
                    "model.name or give the path of a state dict"
                )
        elif model.pretrained is not None and not Path(model.pretrained).expanduser().is_file():
            raise ConfigError(
                f"model.pretrained: {model.pretrained!r} is not a file; give the path of a local state "
                f"dict, `{IMAGENET}` for torchvision's weights, or set model.pretrained=null"
            )
        family = builder_family(model.name)
        if model.drop_path_rate and family not in STOCHASTIC_DEPTH:
            raise ConfigError(
                f"model.drop_path_rate: torchvision's {model.name} (family {family}) has no stochastic depth; torchvision's "
                f"families with it: {STOCHASTIC_DEPTH_NAMES}; pick one of those or a timm model (timm/<name>), "
                "or set model.drop_path_rate=null"
            )

    def create(self, name: str, num_classes: int, pretrained: str | None,
               drop_rate: float | None = None, drop_path_rate: float | None = None) -> nn.Module:
        """The model with `num_classes` outputs, from scratch (weights: `weights_file`), with the
        classifier dropout and stochastic depth asked (None: the architecture's own)."""
        family = builder_family(name)
        kwargs: dict = {"num_classes": num_classes}
        if drop_rate is not None and family in CLASSIFIER_DROPOUT:
            kwargs["dropout"] = drop_rate
        if drop_path_rate is not None and STOCHASTIC_DEPTH.get(family) == "builder":
            kwargs["stochastic_depth_prob"] = drop_path_rate
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        if drop_rate and family not in CLASSIFIER_DROPOUT:
            add_classifier_dropout(model, drop_rate, self.classifier_name(model))
        if drop_path_rate is not None and STOCHASTIC_DEPTH.get(family) == "rescale":
            rescale_stochastic_depth(model, drop_path_rate)
        return model

    def empty(self, name: str, num_classes: int) -> nn.Module:
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(name, num_classes=num_classes)
        except NotImplementedError:  # RegNet computes its widths with tensors: only its parameters go to meta
            with init_empty_weights():
                model = torchvision.models.get_model(name, num_classes=num_classes)
            return model.to("meta")

    def fetch_weights(self, name: str, progress: bool) -> tuple[Path, str]:
        return fetch_imagenet_weights(name, progress=progress), f"torchvision's ImageNet weights of {name}"

    def weights_file(self, name: str) -> Path | None:
        """The hub cache's file (there already: `fetch_imagenet_weights` puts it there first)."""
        return imagenet_file(name)[0]

    def fit_head(self, model: nn.Module, skipped: list[str], num_classes: int) -> None:
        """Nothing: a head of another size keeps its fresh initialization."""

    def owns_model(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("torchvision.models.")

    def classifier_name(self, model: nn.Module) -> str | None:
        return last_child_with_parameters(model)

    def split_rule(self, model: nn.Module) -> SplitRule | None:
        return SPLITS.get(type(model))

    def normalization(self, name: str, pretrained: str | None) -> tuple[list[float], list[float], str]:
        """The ImageNet weights' own transforms; ImageNet's for a state dict (torchvision's convention) or from scratch."""
        if pretrained == IMAGENET:
            transforms = imagenet_weights(name).transforms()
            return list(transforms.mean), list(transforms.std), f"the ImageNet weights' own ({name})"
        if pretrained is not None:
            return list(IMAGENET_MEAN), list(IMAGENET_STD), f"ImageNet's, the convention of torchvision state dicts like {Path(pretrained).name}"
        return list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet's, the default"

    def interpolation(self, name: str) -> tuple[str, str]:
        return "bilinear", "torchvision's weights' own"

    def input_size(self, name: str) -> InputSize | None:
        return None  # data.image_size / data.load_size's defaults (224 from 256) are torchvision's convention


FAMILY = TorchvisionFamily()
