"""Layer groups of any torchvision classifier, freezing (`freeze_to`, `train_bn`) and the per-group
learning rates of `lr_ratio`.

Groups follow the forward order: body groups cut at block boundaries with roughly equal parameter
counts, then the head (the last top-level module holding parameters: `fc`, `classifier`, `heads`,
`head`) as the last group. Blocks are the children of plain `nn.Sequential` / `nn.ModuleList`
containers (ResNet's BasicBlocks, MobileNet's and EfficientNet's inverted residuals, ViT's encoder
blocks), and a module too large for one group is split into its children.

Frozen means `requires_grad=False`: no gradient is ever computed for it, so the optimizer never
sees it (no weight decay, no momentum), and DDP, built per stage from the unwrapped model after the
freezing (see run.py), neither expects nor all-reduces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


class SplitError(ValueError):
    """The model cannot be cut into the asked number of groups; the message names the key."""


@dataclass
class LayerGroup:
    index: int
    blocks: list[str] = field(default_factory=list)
    """Names of the blocks (modules, or `name.param` for parameters held directly) in forward order."""
    params: list[nn.Parameter] = field(default_factory=list)
    head: bool = False

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


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head_name(model: nn.Module) -> str:
    """The last top-level child holding parameters: the classifier the data's classes size."""
    with_params = [name for name, child in model.named_children() if _size(child) > 0]
    if not with_params:
        raise SplitError(f"{type(model).__name__} has no top-level module with parameters to use as the head")
    return with_params[-1]


def _blocks(model: nn.Module, head: str, target: float) -> list[tuple[str, list[nn.Parameter]]]:
    """The body in forward order as (name, parameters) blocks, none larger than `target` unless it
    has no children to split into."""
    blocks: list[tuple[str, list[nn.Parameter]]] = []

    def direct(prefix: str, module: nn.Module) -> None:
        for name, param in module.named_parameters(recurse=False):  # e.g. ViT's class_token, pos_embedding
            blocks.append((f"{prefix}{name}", [param]))

    def visit(name: str, module: nn.Module) -> None:
        children = list(module.named_children())
        container = type(module) in (nn.Sequential, nn.ModuleList)
        if children and (container or _size(module) > target):
            direct(name + ".", module)
            for child_name, child in children:
                visit(f"{name}.{child_name}", child)
        elif _size(module) > 0:
            blocks.append((name, list(module.parameters())))

    direct("", model)
    for name, child in model.named_children():
        if name != head:
            visit(name, child)
    return blocks


def split_layer_groups(model: nn.Module, groups: int) -> list[LayerGroup]:
    """`groups` layer groups: `groups - 1` body groups with roughly equal parameter counts (cut at
    block boundaries), then the head. Every parameter is in exactly one group."""
    head = head_name(model)
    head_module = getattr(model, head)
    body_total = _size(model) - _size(head_module)
    blocks = _blocks(model, head, body_total / max(1, groups - 1))
    if len(blocks) < groups - 1:
        raise SplitError(
            f"finetune.groups: {type(model).__name__}'s body has {len(blocks)} blocks, too few for {groups - 1} body "
            f"groups; use finetune.groups <= {len(blocks) + 1}"
        )
    sizes = [sum(p.numel() for p in params) for _, params in blocks]
    cuts = _balanced_cuts(sizes, groups - 1)
    out = []
    for g, (start, end) in enumerate(zip([0, *cuts], [*cuts, len(blocks)])):
        part = blocks[start:end]
        out.append(LayerGroup(g, [name for name, _ in part], [p for _, params in part for p in params]))
    out.append(LayerGroup(groups - 1, [head], list(head_module.parameters()), head=True))
    seen = [id(p) for group in out for p in group.params]
    if len(seen) != len(set(seen)) or len(seen) != len(list(model.parameters())):
        raise SplitError(f"{type(model).__name__}: shared or unreachable parameters; layer groups need each once")
    return out


def _balanced_cuts(sizes: list[int], parts: int) -> list[int]:
    """`parts - 1` cut positions (block indices) so the parts' sums come closest to equal, each
    part at least one block: every cut at the boundary whose running sum is nearest to k/parts of
    the total, after the previous cut and leaving a block for each later part."""
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
    """Optimizer param groups, per layer group with trainable parameters: its matrices/kernels with
    weight decay, then its norm weights and biases (1-d) without, both at the group's LR. Returns
    them and, per param group, the layer group it belongs to."""
    out, owner = [], []
    for group, lr in zip(groups, lrs):
        decay = [p for p in group.params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in group.params if p.requires_grad and p.ndim <= 1]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "weight_decay": wd, "lr": lr})
                owner.append(group.index)
    return out, owner
