"""Layer groups of any torchvision classifier, freezing (`freeze_to`, `train_bn`), the per-group
learning rates of `lr_ratio`, and which parameters get weight decay.

Layer groups are a per-family fact, as fastai's splitters and timm's `group_matcher` state them.
FAMILIES states, per torchvision model class, the body's natural units in forward order (a stem,
stages or blocks; the final norm joins the last unit) and where the default 3 groups cut them:
group 0 is the units whose output is at stride <= 8, group 1 starts at the first unit whose output
is at stride 16 (fastai's resnet and densenet splits; its vgg16_bn split too), ViT's encoder is
halved, and the head (the classifier: `fc`, `classifier`, `heads`, `head`) is the last group. The
tests measure the strides of every variant in torchvision's list of each family. With 2 groups the
body is one group; with more than 3 the units are cut into body groups of about equal parameter
counts, never inside a unit. timm models (`timm/<name>`) are one family: their units are timm's own
coarse `group_matcher` groups (the stem, then each stage; disttrain/models/timm.py), the head is their
`pretrained_cfg`'s classifier, and group 1 starts after the last stage at stride <= 8 by their
`feature_info` (an isotropic model, ViT's, is halved after its stem). Models without a family (alexnet, googlenet, inception, squeezenet,
shufflenet, mnasnet, maxvit) are cut at block boundaries into groups of about equal parameter
counts, blocks being the children of `nn.Sequential` / `nn.ModuleList` containers, a module too
large for one group split into its children. The printed header says which rule made the split.

Frozen means `requires_grad=False`: no gradient is ever computed for it, so the optimizer never
sees it (no weight decay, no momentum), and DDP, built per stage from the unwrapped model after the
freezing (see stage.py), neither expects nor all-reduces it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from disttrain.models import timm as zoo
from disttrain.config import ConfigError
from disttrain.models.build import decay_groups

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)

Unit = tuple[str, ...]
"""A natural unit of a body: the names of its modules and directly held parameters, in forward order."""


class SplitError(ConfigError):
    """The model cannot be cut into `finetune.groups` groups; the message names the key, the model and the range."""


@dataclass
class LayerGroup:
    index: int
    blocks: list[str] = field(default_factory=list)
    """Names of the blocks (modules, or parameters held directly) in forward order."""
    params: list[nn.Parameter] = field(default_factory=list)
    head: bool = False
    names: list[str] = field(default_factory=list)
    """The parameters' names in the model, one per entry of `params` (the weight decay rules read them)."""

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)

    def describe(self) -> str:
        span = self.blocks[0] if len(self.blocks) == 1 else f"{self.blocks[0]} .. {self.blocks[-1]}"
        return f"group {self.index}{' (head)' if self.head else ''}: {span} ({_count(self.size)} parameters)"


@dataclass(frozen=True)
class Family:
    name: str
    units: Callable[[nn.Module], list[Unit]]
    """The body's natural units in forward order; every body parameter is in exactly one."""
    cut: Callable[[nn.Module, list[Unit]], int]
    """The index of the unit that starts group 1 of the default 3 groups."""
    source: str | None = None
    """Whose split the 3 groups are (None: disttrain's stated split), for the printed header."""
    layout: str = "stride <= 8 | stride 16 and 32"
    """What the 2 body groups of the default 3 hold, for the printed header."""


def _count(n: int) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _holding(parent: nn.Module, prefix: str) -> list[str]:
    """`prefix.child` for each child of `parent` that holds parameters, in order."""
    return [f"{prefix}.{name}" for name, child in parent.named_children() if _size(child) > 0]


def _resnet_units(model: nn.Module) -> list[Unit]:  # ResNet, ResNeXt, Wide ResNet
    return [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]


def _densenet_units(model: nn.Module) -> list[Unit]:  # conv0, norm0, denseblock1, transition1, .., denseblock4, norm5
    names = _holding(model.features, "features")
    return [tuple(names[:2]), *((name,) for name in names[2:-2]), tuple(names[-2:])]


def _vgg_units(model: nn.Module) -> list[Unit]:
    """The 5 stages: the convolutions up to and including each max-pool."""
    units, current = [], []
    for name, child in model.features.named_children():
        if _size(child) > 0:
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
    raise RuntimeError(f"{type(model).__name__}: no unit reaches stride 16; its family entry in disttrain.models.groups is wrong")


def _conv_stride(module: nn.Module) -> int:
    stride = 1
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            stride *= conv.stride[0]
    return stride


def _vit_cut(model: nn.Module, units: list[Unit]) -> int:
    return 1 + len(model.encoder.layers) // 2  # after the stem, half of the encoder blocks


def _families() -> dict[type, Family]:
    from torchvision import models

    halves = "the encoder's first half | its second half"
    return {
        models.ResNet: Family("resnet", _resnet_units, _starting("layer3"), "fastai's resnet split"),
        models.DenseNet: Family("densenet", _densenet_units, _starting("features.transition2"), "fastai's densenet split"),
        models.VGG: Family("vgg", _vgg_units, lambda model, units: 3, "after the 3rd max-pool as fastai's vgg16_bn split"),
        models.MobileNetV2: Family("mobilenet_v2", _features_units, _first_at_stride_16),
        models.MobileNetV3: Family("mobilenet_v3", _features_units, _first_at_stride_16),
        models.EfficientNet: Family("efficientnet", _features_units, _first_at_stride_16),
        models.ConvNeXt: Family("convnext", _features_units, _first_at_stride_16),
        models.RegNet: Family("regnet", _regnet_units, _starting("trunk_output.block3")),
        models.SwinTransformer: Family("swin", _swin_units, _starting("features.4")),
        models.VisionTransformer: Family("vit", _vit_units, _vit_cut, layout=halves),
    }


TIMM_FAMILY = Family(
    "timm", lambda model: zoo.units(model, zoo.classifier_name(model)), zoo.first_stride_16_unit,
    "timm's group_matcher stages, cut by its feature_info",
)


def family_of(model: nn.Module) -> Family | None:
    """The model's family entry (by exact class: a subclass may be built otherwise; every timm model
    is the timm family), or None."""
    if zoo.is_timm_model(model):
        return TIMM_FAMILY
    return _families().get(type(model))


def head_name(model: nn.Module) -> str:
    """The classifier the data's classes size: a timm model's `pretrained_cfg` names it (`head.fc`,
    ...); otherwise the last top-level child holding parameters."""
    if zoo.is_timm_model(model):
        return zoo.classifier_name(model)
    with_params = [name for name, child in model.named_children() if _size(child) > 0]
    if not with_params:
        raise SplitError(f"model.name: {type(model).__name__} has no top-level module with parameters to use as the head")
    return with_params[-1]


def _named(model: nn.Module, member: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters of a unit member: a module's (recursively) or a parameter held directly."""
    try:
        return list(model.get_submodule(member).named_parameters(prefix=member))
    except AttributeError:
        return [(member, model.get_parameter(member))]


def _blocks(model: nn.Module, head: str, target: float) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """The body in forward order as (name, named parameters) blocks, none larger than `target`
    unless it has no children to split into (models without a family)."""
    blocks: list[tuple[str, list[tuple[str, nn.Parameter]]]] = []

    def direct(prefix: str, module: nn.Module) -> None:
        for name, param in module.named_parameters(recurse=False):
            blocks.append((f"{prefix}{name}", [(f"{prefix}{name}", param)]))

    def visit(name: str, module: nn.Module) -> None:
        children = list(module.named_children())
        container = type(module) in (nn.Sequential, nn.ModuleList)
        if children and (container or _size(module) > target):
            direct(name + ".", module)
            for child_name, child in children:
                visit(f"{name}.{child_name}", child)
        elif _size(module) > 0:
            blocks.append((name, list(module.named_parameters(prefix=name))))

    direct("", model)
    for name, child in model.named_children():
        if name != head:
            visit(name, child)
    return blocks


def _units(model: nn.Module, head: str, groups: int) -> tuple[list[Unit], Family | None]:
    """The units the body groups are made of: the family's, or (without one) blocks small enough
    for `groups - 1` balanced groups."""
    family = family_of(model)
    if family is not None:
        return family.units(model), family
    body = _size(model) - _size(model.get_submodule(head))
    blocks = _blocks(model, head, body / max(1, groups - 1))
    if len(blocks) < groups - 1:
        blocks = _blocks(model, head, 0)  # the finest cut: every module with children split
    return [(name,) for name, _ in blocks], None


def split_layer_groups(model: nn.Module, groups: int, name: str | None = None) -> list[LayerGroup]:
    """`groups` layer groups in forward order, the head last (see the module docstring for the
    rule). Every parameter is in exactly one group. `name` (model.name) is for the error message.
    Raises SplitError when the body has fewer units than `groups - 1`."""
    label = name or type(model).__name__
    head = head_name(model)
    units, family = _units(model, head, groups)
    named = [[pair for member in unit for pair in _named(model, member)] for unit in units]
    units, named = [u for u, n in zip(units, named) if n], [n for n in named if n]  # a unit without parameters adds nothing
    if len(units) < groups - 1:
        kind = "units" if family else "blocks"
        span = f" ({units[0][0]} .. {units[-1][-1]})" if units else ""
        raise SplitError(
            f"finetune.groups: {groups} is too many for {label}, whose body has {len(units)} {kind} to cut between{span}; "
            f"use 2 to {max(2, len(units) + 1)}"
        )
    if groups == 3 and family is not None:
        cuts = [family.cut(model, units)]
    else:
        cuts = _balanced_cuts([sum(p.numel() for _, p in pairs) for pairs in named], groups - 1)
    out = []
    for g, (start, end) in enumerate(zip([0, *cuts], [*cuts, len(units)])):
        pairs = [pair for part in named[start:end] for pair in part]
        blocks = [member for unit in units[start:end] for member in unit if _named(model, member)]
        out.append(LayerGroup(g, blocks, [p for _, p in pairs], names=[n for n, _ in pairs]))
    head_pairs = list(model.get_submodule(head).named_parameters(prefix=head))
    out.append(LayerGroup(groups - 1, [head], [p for _, p in head_pairs], head=True, names=[n for n, _ in head_pairs]))
    seen = [id(p) for group in out for p in group.params]
    if len(seen) != len(set(seen)) or set(seen) != {id(p) for p in model.parameters()}:
        if family is not None:
            raise RuntimeError(f"{label}: disttrain.models.groups's {family.name} units do not cover each parameter once")
        raise SplitError(f"model.name: {label} shares parameters between modules; layer groups need each once")
    return out


def layer_groups_header(name: str, model: nn.Module, groups: int) -> str:
    """The line printed above the groups' `describe()`: the model, finetune.groups and the rule that made the split."""
    family = family_of(model)
    if groups == 2:
        rule = "the body | the head"
    elif family is not None and groups == 3:
        source = family.source or f"disttrain's stated split for {name}"
        layout = "the stem and the first half of the blocks | the second half" if family is TIMM_FAMILY and zoo.isotropic(model) else family.layout
        rule = f"{layout} | head, {source}"
    elif family is not None:
        units = len(family.units(model))
        rule = f"{family.name}'s {units} units in {groups - 1} body groups balanced by parameter count | head"
    else:
        rule = f"blocks balanced by parameter count | head; no stated split for {type(model).__name__}"
    return f"layer groups of {name} (finetune.groups={groups}: {rule}):"


def _balanced_cuts(sizes: list[int], parts: int) -> list[int]:
    """`parts - 1` cut positions (unit indices) so the parts' sums come closest to equal, each
    part at least one unit: every cut at the boundary whose running sum is nearest to k/parts of
    the total, after the previous cut and leaving a unit for each later part."""
    total = sum(sizes)
    running = [0]
    for size in sizes:
        running.append(running[-1] + size)
    cuts: list[int] = []
    for k in range(1, parts):
        low = (cuts[-1] if cuts else 0) + 1
        high = len(sizes) - (parts - k)
        cuts.append(min(range(low, high + 1), key=lambda i: (abs(running[i] - total * k / parts), i)))
    return cuts


def empty_model(name: str, num_classes: int = 2) -> nn.Module:
    """Model `name` (torchvision's, or timm's `timm/<name>`) on the meta device: shapes only, no
    memory, no initialization cost."""
    import torchvision

    if zoo.is_timm(name):
        return zoo.empty(name, num_classes)
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, num_classes=num_classes)
    except NotImplementedError:  # RegNet computes its widths with tensors: only its parameters go to meta
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = torchvision.models.get_model(name, num_classes=num_classes)
        return model.to("meta")


@functools.lru_cache(maxsize=None)
def check_groups(name: str, groups: int) -> None:
    """Raise SplitError (a ConfigError) when model `name` cannot be cut into `groups` layer groups:
    checked when the config is built, before any process starts."""
    split_layer_groups(empty_model(name), groups, name)


def freeze(model: nn.Module, groups: list[LayerGroup], frozen: int, train_bn: bool, keep_bn_stats: bool = False) -> list[nn.Module]:
    """Freeze groups [0, frozen): `requires_grad=False` on their parameters, except the weights of
    normalization layers when `train_bn`. Returns the normalization modules that must stay in eval
    mode (running statistics frozen too): those of frozen groups unless `train_bn`, and with
    `keep_bn_stats` every BatchNorm layer (whose weights still train where their group does)."""
    group_of = {id(p): group.index for group in groups for p in group.params}
    for group in groups:
        for param in group.params:
            param.requires_grad_(group.index >= frozen)
    fixed = []
    for module in model.modules():
        if not isinstance(module, NORM_TYPES):
            continue
        own = list(module.parameters(recurse=False))
        in_frozen = bool(own) and group_of[id(own[0])] < frozen
        if in_frozen and train_bn:
            for param in own:
                param.requires_grad_(True)
        if (in_frozen and not train_bn) or (keep_bn_stats and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            fixed.append(module)
    return fixed


def group_lrs(lr: float, lr_ratio: float, groups: int) -> list[float]:
    """Peak LR per layer group: geometric from lr / lr_ratio (group 0) to lr (the head)."""
    if groups == 1:
        return [lr]
    return [lr / lr_ratio ** ((groups - 1 - g) / (groups - 1)) for g in range(groups)]


def param_groups(groups: list[LayerGroup], lrs: list[float], weight_decay: float) -> tuple[list[dict], list[int]]:
    """Optimizer param groups, per layer group with trainable parameters: `decay_groups` at the
    group's LR. Returns them and, per param group, the layer group it belongs to."""
    out, owner = [], []
    for group, lr in zip(groups, lrs):
        found = decay_groups(zip(group.names, group.params), weight_decay, lr=lr)
        out += found
        owner += [group.index] * len(found)
    return out, owner
