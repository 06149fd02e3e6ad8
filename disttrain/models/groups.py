"""Layer groups of any classifier, freezing (`freeze_to`, `train_bn`), the per-group learning
rates of `lr_ratio`, and their optimizer param groups, written once against the model families
(disttrain/models/family.py).

A family states, per model, the body's natural units in forward order (a stem, stages or blocks)
and where the default 3 groups cut them (its `split_rule`: torchvision's per model class as
fastai's splitters, timm's from its `group_matcher`), and names the head (the classifier). With 2
groups the body is one group; with more than 3 the units are cut into body groups of about equal
parameter counts, never inside a unit. Models without a stated split (torchvision's alexnet,
googlenet, inception, squeezenet, shufflenet, mnasnet, maxvit; a network no family built) are cut
at block boundaries into groups of about equal parameter counts, blocks being the children of
`nn.Sequential` / `nn.ModuleList` containers, a module too large for one group split into its
children. The printed header says which rule made the split.

Frozen means `requires_grad=False`: no gradient is ever computed for it, so the optimizer never
sees it (no weight decay, no momentum), and DDP, built per stage from the unwrapped model after the
freezing (see disttrain/train/stages.py), neither expects nor all-reduces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from disttrain.config import ConfigError
from disttrain.models.families import family_of_model
from disttrain.models.family import SplitRule, Unit, last_child_with_parameters, parameter_count
from disttrain.models.optim import decay_groups

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


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


def _count(n: int) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def split_rule(model: nn.Module) -> SplitRule | None:
    """The split its family states for `model`, or None (no family, or none stated for its class)."""
    family = family_of_model(model)
    return family.split_rule(model) if family is not None else None


def head_name(model: nn.Module) -> str:
    """The classifier the data's classes size: the one its family names (timm's `pretrained_cfg`:
    `head.fc`, ...), else the last top-level child holding parameters."""
    family = family_of_model(model)
    name = family.classifier_name(model) if family is not None else last_child_with_parameters(model)
    if name is None:
        raise SplitError(f"model.name: {type(model).__name__} has no top-level module with parameters to use as the head")
    return name


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
        if children and (container or parameter_count(module) > target):
            direct(name + ".", module)
            for child_name, child in children:
                visit(f"{name}.{child_name}", child)
        elif parameter_count(module) > 0:
            blocks.append((name, list(module.named_parameters(prefix=name))))

    direct("", model)
    for name, child in model.named_children():
        if name != head:
            visit(name, child)
    return blocks


def _units(model: nn.Module, head: str, groups: int) -> tuple[list[Unit], SplitRule | None]:
    """The units the body groups are made of: the family's, or (without one) blocks small enough
    for `groups - 1` balanced groups."""
    rule = split_rule(model)
    if rule is not None:
        return rule.units(model), rule
    body = parameter_count(model) - parameter_count(model.get_submodule(head))
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
    units, rule = _units(model, head, groups)
    named = [[pair for member in unit for pair in _named(model, member)] for unit in units]
    units, named = [u for u, n in zip(units, named) if n], [n for n in named if n]  # a unit without parameters adds nothing
    if len(units) < groups - 1:
        kind = "units" if rule else "blocks"
        span = f" ({units[0][0]} .. {units[-1][-1]})" if units else ""
        raise SplitError(
            f"finetune.groups: {groups} is too many for {label}, whose body has {len(units)} {kind} to cut between{span}; "
            f"use 2 to {max(2, len(units) + 1)}"
        )
    if groups == 3 and rule is not None:
        cuts = [rule.cut(model, units)]
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
        if rule is not None:
            raise RuntimeError(f"{label}: the {rule.name} units of its family's split_rule do not cover each parameter once")
        raise SplitError(f"model.name: {label} shares parameters between modules; layer groups need each once")
    return out


def layer_groups_header(name: str, model: nn.Module, groups: int) -> str:
    """The line printed above the groups' `describe()`: the model, finetune.groups and the rule that made the split."""
    stated = split_rule(model)
    if groups == 2:
        rule = "the body | the head"
    elif stated is not None and groups == 3:
        source = stated.source or f"disttrain's stated split for {name}"
        rule = f"{stated.layout} | head, {source}"
    elif stated is not None:
        rule = f"{stated.name}'s {len(stated.units(model))} units in {groups - 1} body groups balanced by parameter count | head"
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
