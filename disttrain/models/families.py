"""The model families disttrain knows, and which one a `model.name` or a built network belongs to.
A new family: its module (disttrain/models/family.py says what it holds) and one entry in FAMILIES."""

from __future__ import annotations

from torch import nn

from disttrain.models import timm, tiny, torchvision
from disttrain.models.family import Family

FAMILIES: tuple[Family, ...] = (torchvision.FAMILY, timm.FAMILY, tiny.FAMILY)


def family_of(name: str) -> Family:
    """The family of `model.name`: the one whose prefix is the longest that `name` starts with
    (`timm/<name>` -> timm; a name without another family's prefix -> torchvision)."""
    return max((family for family in FAMILIES if name.startswith(family.prefix)), key=lambda family: len(family.prefix))


def family_of_model(model: nn.Module) -> Family | None:
    """The family whose network `model` is, or None (a network no family built)."""
    return next((family for family in FAMILIES if family.owns_model(model)), None)
