"""What a model family is to disttrain: the one small interface every family source (torchvision's
zoo in disttrain/models/torchvision.py, timm's in disttrain/models/timm.py) implements, so that
building, weights, preprocessing, layer groups and the config checks are written once against it.

A new family is one module holding a class with these members and an instance of it, plus one
line in disttrain/models/families.py's list. Nothing outside its module knows its names or tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from torch import nn

from disttrain.config import ModelConfig
from disttrain.errors import UserError

Unit = tuple[str, ...]
"""A natural unit of a body: the names of its modules and directly held parameters, in forward order."""


class WeightsError(UserError):
    """A weights file that does not fit the model; the message names the file and the fix."""


@dataclass(frozen=True)
class SplitRule:
    """How a family's model is cut into layer groups (disttrain/models/groups.py applies it)."""

    name: str
    """The rule's name in the printed header (`resnet`, `timm`)."""
    units: Callable[[nn.Module], list[Unit]]
    """The body's natural units in forward order; every body parameter is in exactly one."""
    cut: Callable[[nn.Module, list[Unit]], int]
    """The index of the unit that starts group 1 of the default 3 groups."""
    source: str | None = None
    """Whose split the 3 groups are (None: disttrain's stated split), for the printed header."""
    layout: str = "stride <= 8 | stride 16 and 32"
    """What the 2 body groups of the default 3 hold, for the printed header."""


@dataclass(frozen=True)
class InputSize:
    """The input a family's model expects when the config does not say: data.image_size, and the
    crop_pct that gives data.load_size (image_size / crop_pct)."""

    image_size: int
    crop_pct: float


class Family(Protocol):
    """One source of models, picked by `model.name` (disttrain/models/families.py's `family_of`)."""

    name: str
    """The family's name: model.pt's `family`, the lines printed about it."""
    prefix: str
    """What a `model.name` of this family starts with (`timm/`; torchvision's is empty: every name
    no other family's prefix claims)."""
    weights: str
    """The `model.pretrained` keyword of the family's own pretrained weights (`imagenet`, `timm`)."""

    def check(self, model: ModelConfig) -> None:
        """ConfigError unless `model.name` exists in this family and `model.pretrained` fits it."""

    def create(self, name: str, num_classes: int, pretrained: str | None,
               drop_rate: float | None = None, drop_path_rate: float | None = None) -> nn.Module:
        """The network with a classifier for `num_classes`; with the family's own weights where
        `pretrained` names them and the family loads them itself (`weights_file` is None); with
        model.drop_rate / model.drop_path_rate where given (None: the architecture's own)."""

    def empty(self, name: str, num_classes: int) -> nn.Module:
        """The network on the meta device: shapes only, no memory, no initialization cost."""

    def fetch_weights(self, name: str, progress: bool) -> tuple[Path, str]:
        """Where the family's own weights of `name` are, made local first where the family downloads
        them (run by the main process alone), and what they are, for the line the run prints."""

    def weights_file(self, name: str) -> Path | None:
        """Where the family's own weights of `name` are, for disttrain to load by name and shape;
        None where `create` loads them."""

    def fit_head(self, model: nn.Module, skipped: list[str], num_classes: int) -> None:
        """After a weights file was loaded with `skipped` tensors left as initialized: make the head right."""

    def owns_model(self, model: nn.Module) -> bool:
        """Whether `model` is one of this family's networks."""

    def classifier_name(self, model: nn.Module) -> str | None:
        """The classifier module the data's classes size (None: the model has none to name)."""

    def split_rule(self, model: nn.Module) -> SplitRule | None:
        """The family's layer-group split of `model`, or None where it states none for its class."""

    def normalization(self, name: str, pretrained: str | None) -> tuple[list[float], list[float], str]:
        """(mean, std, where they come from) of the weights `pretrained` names, before a weights
        file's own and augment.mean/std (disttrain/models/build.py's `normalization`)."""

    def interpolation(self, name: str) -> tuple[str, str]:
        """(`bilinear` or `bicubic`, where it comes from): the resample the weights expect."""

    def input_size(self, name: str) -> InputSize | None:
        """The input size the model expects, or None where the config's defaults apply."""


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def last_child_with_parameters(model: nn.Module) -> str | None:
    """The last top-level child holding parameters: the classifier of a plain classification network."""
    with_params = [name for name, child in model.named_children() if parameter_count(child) > 0]
    return with_params[-1] if with_params else None
