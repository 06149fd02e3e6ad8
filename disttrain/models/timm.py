"""timm's model zoo behind `model.name: timm/<name>`: the names, building a model with the data's
classes, timm's pretrained weights from the local Hugging Face cache only (`model.pretrained: timm`),
the model's own preprocessing (`pretrained_cfg`), and its layer units as timm's `group_matcher`
states them: every timm model is one layer-group rule, its units timm's coarse groups (the stem,
then each stage), its head the `pretrained_cfg`'s classifier, and group 1 of the default 3 starts
after the last stage at stride <= 8 by its `feature_info` (an isotropic model, ViT's, is halved
after its stem).

timm (and huggingface_hub's cache lookup) are imported inside the functions that need them, and
only for a timm model: they cost about a second to import, which a torchvision run never pays.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from disttrain.config import IMAGENET, TIMM, ConfigError, ModelConfig
from disttrain.models.family import InputSize, SplitRule, Unit

PREFIX = "timm/"
"""`model.name` of a timm model: `timm/<timm name>`, e.g. `timm/convnext_tiny`, `timm/resnet50.a1_in1k`."""

CACHE_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weights files of a timm repository on the Hugging Face hub, in the order timm prefers them."""


class ZooError(ConfigError):
    """A timm model name or weights that cannot be had; the message names them and the fix (exit 2)."""


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def timm_name(name: str) -> str:
    """`timm/resnet50.a1_in1k` -> `resnet50.a1_in1k` (timm's own name, with its pretrained tag if any)."""
    return name[len(PREFIX):]


def check_name(name: str) -> None:
    """ZooError unless `name` (model.name) is a timm model, with the closest names as a hint."""
    import timm

    own = timm_name(name)
    if not timm.is_model(own):
        close = difflib.get_close_matches(own.split(".")[0], timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        raise ZooError(f"model.name: {own!r} is not a timm model{hint}; `timm.list_models('*pattern*')` lists them")


def pretrained_cfg(name: str) -> dict:
    """timm's `pretrained_cfg` of `name` (its default tag when the name has none): input size,
    interpolation, crop_pct, mean, std, classifier, hf_hub_id, url."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name(name))
    if cfg is None:
        raise ZooError(f"model.name: timm has no pretrained config for {timm_name(name)!r}")
    return cfg.to_dict()


@dataclass(frozen=True)
class Preprocess:
    """What the model's pretrained weights were trained to see."""

    mean: list[float]
    std: list[float]
    image_size: int
    interpolation: str
    """`bilinear` or `bicubic` (the device resample supports these two; timm's `bicubic` and
    `bilinear` map to themselves, anything else to `bilinear`)."""
    crop_pct: float


def preprocess(name: str) -> Preprocess:
    cfg = pretrained_cfg(name)
    interpolation = cfg.get("interpolation") or "bilinear"
    return Preprocess(list(cfg["mean"]), list(cfg["std"]), int(cfg["input_size"][-1]),
                      interpolation if interpolation in ("bilinear", "bicubic") else "bilinear", float(cfg.get("crop_pct") or 0.875))


def cached_weights(name: str) -> Path:
    """The file of `name`'s timm weights in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE), or
    in torch's hub cache for weights timm fetches by URL. Never downloads: ZooError naming the model,
    where it looked and how to fetch the file on a machine with network."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = pretrained_cfg(name)
    own = timm_name(name)
    repo = cfg.get("hf_hub_id")
    looked: list[str] = []
    if repo:
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(CACHE_FILES)
        for filename in names:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots" / "*"
        looked += [str(folder / filename) for filename in names]
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / cfg["url"].rsplit("/", 1)[-1]
        if path.is_file():
            return path
        looked.append(str(path))
    if not looked:
        raise ZooError(f"model.pretrained=timm: timm publishes no pretrained weights for {own}; "
                       "pick a tagged name from `timm.list_pretrained()` or give a state dict file")
    fetch = f"hf download {repo}" if repo else f"python -c \"import timm; timm.create_model('{own}', pretrained=True)\""
    raise ZooError(
        f"model.pretrained=timm: timm's weights of {own} are not in the local cache (looked for {' and '.join(looked)}); "
        f"on a machine with network run `{fetch}` and copy the cache folder here (HF_HOME), or give the weights file's path"
    )


def regularization(drop_rate: float | None, drop_path_rate: float | None) -> dict[str, float]:
    """`timm.create_model`'s keywords for model.drop_rate (the classifier's dropout: timm's
    `drop_rate`, its head dropout) and model.drop_path_rate (its `drop_path_rate`, stochastic depth
    rising linearly to it over the blocks); None: left out, the model's own default."""
    return {key: value for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)) if value is not None}


def create(name: str, num_classes: int, weights: Path | None = None, **regularize: float) -> nn.Module:
    """timm's `name` with a classifier for `num_classes`. `weights`: timm's own pretrained file
    (`cached_weights`), loaded the timm way (its checkpoint filter, strict), then the classifier
    reset for the data's classes (`reset_classifier`). `regularize`: `regularization`'s keywords."""
    import timm

    if weights is None:
        return timm.create_model(timm_name(name), pretrained=False, num_classes=num_classes, **regularize)
    model = timm.create_model(timm_name(name), pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **regularize)
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    return model


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "group_matcher")


def classifier_name(model: nn.Module) -> str:
    """The classifier module the data's classes size (`pretrained_cfg['classifier']`: `fc`,
    `head.fc`, `classifier`, `head`)."""
    name = model.pretrained_cfg.get("classifier")
    if not isinstance(name, str):
        raise ZooError(f"model.name: {type(model).__name__} has {len(name or ())} classifiers {name!r}; "
                       "layer groups need one (pick a model without a distillation head)")
    return name


def units(model: nn.Module, head: str) -> list[Unit]:
    """The body's units in forward order from timm's coarse `group_matcher` (the stem, then each
    stage): each unit the smallest modules holding exactly its parameters. What the matcher leaves
    after the last stage besides the classifier (a final norm, `conv_head`) joins the last unit."""
    from timm.models import group_parameters

    groups = [names for names in group_parameters(model, model.group_matcher(coarse=True)).values()]
    head_params = {f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()}
    out: list[list[str]] = []
    for names in groups:
        rest = [n for n in names if n not in head_params]
        if not rest:
            continue
        if len(rest) < len(names) and out:  # the group the head was left in: after the last stage
            out[-1] += rest
        else:
            out.append(rest)
    return [_modules(model, names) for names in out]


def _modules(model: nn.Module, names: list[str]) -> tuple[str, ...]:
    """Parameter names -> the shortest module (or parameter) names whose parameters are all in `names`, in order."""
    wanted = set(names)
    members: dict[str, None] = {}  # ordered, each once
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            candidate = ".".join(parts[:depth])
            if depth == len(parts):
                member = candidate  # a parameter held directly
                break
            module = model.get_submodule(candidate)
            if all(f"{candidate}.{n}" in wanted for n, _ in module.named_parameters()):
                member = candidate
                break
        members[member] = None
    return tuple(members)


def first_stride_16_unit(model: nn.Module, units_: list[Unit]) -> int:
    """The unit that starts group 1 of the default 3: the one after the last feature stage at
    stride <= 8 (timm's `feature_info`); for an isotropic model (every stage at stride 16 or more,
    ViT's) after the stem and half of the blocks."""
    fine = _fine_stages(model)
    if not fine:  # isotropic
        return 1 + (len(units_) - 1) // 2
    module = fine[-1]
    for index, unit in enumerate(units_):
        if any(m == module or m.startswith(module + ".") or module.startswith(m + ".") for m in unit):
            return min(index + 1, len(units_) - 1)
    return 1 + (len(units_) - 1) // 2


def isotropic(model: nn.Module) -> bool:
    """Every feature stage at stride 16 or more (a ViT's blocks): no stage at stride <= 8 to cut after."""
    return not _fine_stages(model)


def _fine_stages(model: nn.Module) -> list[str]:
    """The modules of `feature_info`'s stages at stride <= 8, in forward order."""
    return [info["module"] for info in getattr(model, "feature_info", []) if info.get("reduction", 32) <= 8]


def empty(name: str, num_classes: int = 2, **regularize: float) -> nn.Module:
    """The timm model on the meta device: shapes only."""
    import timm

    with torch.device("meta"):
        return timm.create_model(timm_name(name), pretrained=False, num_classes=num_classes, **regularize)


@functools.lru_cache(maxsize=None)
def check_regularization(name: str, drop_rate: float | None, drop_path_rate: float | None) -> None:
    """ZooError unless timm's `name` takes model.drop_rate / model.drop_path_rate (built on the meta
    device: a model class without the keyword, timm's vgg's drop_path_rate, raises a TypeError)."""
    regularize = regularization(drop_rate, drop_path_rate)
    if not regularize:
        return
    try:
        empty(name, **regularize)
    except TypeError as err:
        refused = [key for key in regularize if f"'{key}'" in str(err)] or list(regularize)
        raise ZooError(f"model.{refused[0]}: timm's {timm_name(name)} does not take {refused[0]} ({err}); "
                       f"set model.{refused[0]}=null or pick another model") from None


class TimmFamily:
    """timm's models as `timm/<name>` (see the module docstring)."""

    name = "timm"
    prefix = PREFIX
    weights = TIMM

    def check(self, model: ModelConfig) -> None:
        check_name(model.name)
        if model.pretrained == IMAGENET:
            raise ConfigError(f"model.pretrained: `{IMAGENET}` is torchvision's weights; for {model.name} use `{TIMM}` "
                              "(timm's weights from the local Hugging Face cache) or a weights file's path")
        check_regularization(model.name, model.drop_rate, model.drop_path_rate)
        if model.pretrained == TIMM:
            cached_weights(model.name)  # ZooError (a ConfigError) naming the file looked for and how to fetch it
        elif model.pretrained is not None and not Path(model.pretrained).expanduser().is_file():
            raise ConfigError(
                f"model.pretrained: {model.pretrained!r} is not a file; give the path of a state dict or safetensors file, "
                f"`{TIMM}` for timm's weights, or set model.pretrained=null"
            )

    def create(self, name: str, num_classes: int, pretrained: str | None,
               drop_rate: float | None = None, drop_path_rate: float | None = None) -> nn.Module:
        return create(name, num_classes, cached_weights(name) if pretrained == TIMM else None,
                      **regularization(drop_rate, drop_path_rate))

    def empty(self, name: str, num_classes: int) -> nn.Module:
        return empty(name, num_classes)

    def fetch_weights(self, name: str, progress: bool) -> tuple[Path, str]:
        return cached_weights(name), f"timm's weights of {timm_name(name)}"  # never downloaded: the cache or a ZooError

    def weights_file(self, name: str) -> Path | None:
        return None  # `create` loads timm's own weights the timm way

    def fit_head(self, model: nn.Module, skipped: list[str], num_classes: int) -> None:
        """A fresh head as timm makes one for pretrained weights (`reset_classifier`), where the file's did not fit:
        timm's from-scratch init of some families (EfficientNet's, MobileNet's) is scaled for 1000 classes, large logits for 2."""
        if any(name.startswith(classifier_name(model) + ".") for name in skipped):
            model.reset_classifier(num_classes)

    def owns_model(self, model: nn.Module) -> bool:
        return is_timm_model(model)

    def classifier_name(self, model: nn.Module) -> str | None:
        return classifier_name(model)

    def split_rule(self, model: nn.Module) -> SplitRule:
        layout = "the stem and the first half of the blocks | the second half" if isotropic(model) else SplitRule.layout
        return SplitRule("timm", lambda m: units(m, classifier_name(m)), first_stride_16_unit,
                         "timm's group_matcher stages, cut by its feature_info", layout)

    def normalization(self, name: str, pretrained: str | None) -> tuple[list[float], list[float], str]:
        """The `pretrained_cfg`'s, pretrained or not."""
        own = preprocess(name)
        return own.mean, own.std, f"timm's pretrained_cfg of {timm_name(name)}"

    def interpolation(self, name: str) -> tuple[str, str]:
        return preprocess(name).interpolation, f"timm's pretrained_cfg of {timm_name(name)}"

    def input_size(self, name: str) -> InputSize:
        check_name(name)
        own = preprocess(name)
        return InputSize(own.image_size, own.crop_pct)


FAMILY = TimmFamily()
