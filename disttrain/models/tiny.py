"""disttrain's own tiny networks behind `model.name: tiny/<name>`, for runs whose cost must be the
machinery's and not the model's: many ranks on a few CPU cores (benchmarks/scale.py, the many-rank
tests), smoke runs, scheduler tests. `tiny/cnn` is three conv-BN-ReLU stages of 8, 16 and 32
channels (the second and third at stride 2), a global average pool and a linear classifier:
6,418 parameters for 10 classes, any input size, 8 x 8 px by default (data.image_size and
data.load_size when the config does not set them).

There are no pretrained weights: `model.pretrained` may name a state dict or safetensors file
(loaded by name and shape, as for every family), anything else is a ConfigError. Layer groups: the
units are the three stages, the default 3 groups cut before the last one (stride 4).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from disttrain.config import IMAGENET, TIMM, ConfigError, ModelConfig
from disttrain.data.augment import IMAGENET_MEAN, IMAGENET_STD
from disttrain.models.family import InputSize, SplitRule, Unit

PREFIX = "tiny/"
"""`model.name` of a tiny model: `tiny/cnn`."""

OWN_WEIGHTS = "tiny"
"""The family's `weights` keyword: it has none, so `model.pretrained: tiny` is refused like any other name."""

WIDTHS = {"cnn": (8, 16, 32)}
"""The tiny models by name (without the prefix) -> the channels of their three stages."""


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    """stem (3 -> w0), stage1 (w0 -> w1, stride 2), stage2 (w1 -> w2, stride 2), global average pool, fc."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = WIDTHS["cnn"], drop_rate: float = 0.0):
        super().__init__()
        w0, w1, w2 = widths
        self.stem = _stage(3, w0, 1)
        self.stage1 = _stage(w0, w1, 2)
        self.stage2 = _stage(w1, w2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def own_name(name: str) -> str:
    """`tiny/cnn` -> `cnn`."""
    return name[len(PREFIX):]


def _units(model: nn.Module) -> list[Unit]:
    return [("stem",), ("stage1",), ("stage2",)]


SPLIT = SplitRule("tiny", _units, lambda model, units: 2, "disttrain's tiny split", "stem and stage 1 | stage 2")


class TinyFamily:
    """disttrain's tiny networks as `tiny/<name>` (see the module docstring)."""

    name = "tiny"
    prefix = PREFIX
    weights = OWN_WEIGHTS

    def check(self, model: ModelConfig) -> None:
        own = own_name(model.name)
        if own not in WIDTHS:
            close = difflib.get_close_matches(own, list(WIDTHS), n=3)
            hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
            raise ConfigError(f"model.name: {own!r} is not a tiny model{hint}; the tiny models: "
                              f"{', '.join(PREFIX + n for n in WIDTHS)}")
        if model.pretrained is not None and not Path(model.pretrained).expanduser().is_file():
            known = f" (`{model.pretrained}` names another family's weights)" if model.pretrained in (IMAGENET, TIMM) else ""
            raise ConfigError(f"model.pretrained: {model.name} has no pretrained weights{known} and {model.pretrained!r} is "
                              "not a file; give the path of a state dict or safetensors file, or set model.pretrained=null")
        if model.drop_path_rate:
            raise ConfigError(f"model.drop_path_rate: {model.name} has no stochastic depth; set model.drop_path_rate=null")

    def create(self, name: str, num_classes: int, pretrained: str | None,
               drop_rate: float | None = None, drop_path_rate: float | None = None) -> nn.Module:
        return TinyCNN(num_classes, WIDTHS[own_name(name)], drop_rate or 0.0)

    def empty(self, name: str, num_classes: int) -> nn.Module:
        with torch.device("meta"):
            return TinyCNN(num_classes, WIDTHS[own_name(name)])

    def fetch_weights(self, name: str, progress: bool) -> tuple[Path, str]:
        raise ConfigError(f"model.pretrained: {name} has no pretrained weights; set model.pretrained=null or give a file")

    def weights_file(self, name: str) -> Path | None:
        return None

    def fit_head(self, model: nn.Module, skipped: list[str], num_classes: int) -> None:
        """Nothing: a head of another size keeps its fresh initialization."""

    def owns_model(self, model: nn.Module) -> bool:
        return isinstance(model, TinyCNN)

    def classifier_name(self, model: nn.Module) -> str | None:
        return "fc"

    def split_rule(self, model: nn.Module) -> SplitRule:
        return SPLIT

    def normalization(self, name: str, pretrained: str | None) -> tuple[list[float], list[float], str]:
        return list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet's, the default"

    def interpolation(self, name: str) -> tuple[str, str]:
        return "bilinear", "the default"

    def input_size(self, name: str) -> InputSize:
        return InputSize(8, 1.0)


FAMILY = TinyFamily()
