"""Using a trained model: read a self-contained `model.pt`, its eval view, and test-time augmentation.

TTA views are fixed, not random, and distinct up to their number, `MAX_TTA_VIEWS` = 10: the flips
of the whole eval image and of its four corners (a 90% window, resized back to the image size):

    0 the whole image flipped      1-4 the top-left, top-right, bottom-left, bottom-right corners
    5-8 the same corners flipped   9 the whole image as it is (the plain pass again)

`tta_n` takes the first n (default 5: the flip and the four corners). A sample's views, and so its
TTA prediction, do not depend on the batch it lands in, on its rank or on the number of processes.
As fastai does, the views' softmax probabilities are averaged and blended with the plain pass:
`beta x plain + (1 - beta) x views` (`beta` in [0, 1], 0.25 by default), or, with `use_max`, the
element-wise maximum over the plain pass and the views.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.config import AugmentConfig, ConfigError, ModelConfig
from disttrain.data.augment import DeviceAugment
from disttrain.models.build import WeightsError, build_model

WINDOWS = ((1.0, 0.0, 0.0), (0.9, -1.0, -1.0), (0.9, 1.0, -1.0), (0.9, -1.0, 1.0), (0.9, 1.0, 1.0))
"""(scale, x offset, y offset) of the TTA windows: the whole image, then the top-left, top-right,
bottom-left and bottom-right corners; offsets in units of the room the window leaves."""

TTA_VIEWS = ((0, True), (1, False), (2, False), (3, False), (4, False), (1, True), (2, True), (3, True), (4, True), (0, False))
"""(window, flipped) of TTA view i, in order (see the module docstring)."""

MAX_TTA_VIEWS = len(TTA_VIEWS)

INFERENCE_KEYS = ("image_size", "load_size", "normalize")


@dataclass
class SavedModel:
    """A model.pt: the model in eval mode and what inference needs to feed it."""

    model: nn.Module
    classes: list[str]
    arch: str
    image_size: int
    load_size: int
    mean: list[float]
    std: list[float]
    precision: str | None
    interpolation: str = "bilinear"


def read_model_file(path: str | Path, need_inference_keys: bool = True) -> dict:
    """The contents of a disttrain model.pt, or WeightsError saying what the file is instead
    (`need_inference_keys` False: an older model.pt without sizes and normalization is fine)."""
    path = Path(path).expanduser()
    expected = "expected the model.pt a training run writes in its run dir"
    if path.is_dir():
        what = "a training checkpoint directory" if (path / "meta.json").is_file() or (path / "shared.pt").is_file() else "a directory"
        raise WeightsError(f"{path}: is {what}, not a weights file; {expected}")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; {expected}")
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: is not a torch file (not a zip archive saved by torch.save); {expected}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: torch cannot read it as plain tensors and lists ({type(err).__name__}); {expected}") from err
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: is a bare state dict (tensors only, no class names or image size); {expected}")
    if not isinstance(state, dict) or not {"model", "classes", "arch"} <= set(state):
        raise WeightsError(f"{path}: is not a disttrain model.pt (no 'model', 'classes' and 'arch'); {expected}")
    missing = [key for key in INFERENCE_KEYS if key not in state]
    if missing and need_inference_keys:
        raise WeightsError(f"{path}: written by an older disttrain without {', '.join(missing)}; retrain, or evaluate it "
                           "with --config (the run's config gives the sizes)")
    return state


def saved_network(state: dict, device: torch.device) -> nn.Module:
    """The model of a model.pt's contents (`read_model_file`), on `device`, in eval mode."""
    model = build_model(ModelConfig(name=state["arch"]), num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def load_saved_model(path: str | Path, device: torch.device) -> SavedModel:
    state = read_model_file(path)
    norm = state["normalize"]
    return SavedModel(saved_network(state, device), list(state["classes"]), state["arch"], int(state["image_size"]),
                      int(state["load_size"]), list(norm["mean"]), list(norm["std"]), state.get("precision"),
                      state.get("interpolation", "bilinear"))


def eval_view(image_size: int, mean: list[float], std: list[float], channels_last: bool = True,
              interpolation: str = "bilinear") -> DeviceAugment:
    """The validation view (the presized square resampled to `image_size`, normalized): `view(x, train=False)`."""
    return DeviceAugment(AugmentConfig(), image_size, channels_last=channels_last, mean=mean, std=std, interpolation=interpolation)


def check_tta(tta_n: int, beta: float, n_key: str = "--tta-n", beta_key: str = "--tta-beta") -> None:
    """ConfigError naming the option when the number of views or the blend weight is out of range."""
    if not 1 <= tta_n <= MAX_TTA_VIEWS:
        raise ConfigError(f"{n_key}: must be 1 to {MAX_TTA_VIEWS} (the flips of the whole image and of its four corners), got {tta_n}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"{beta_key}: must be in [0, 1] (the plain pass's weight in the blend), got {beta}")


def tta_view(x: torch.Tensor, index: int) -> torch.Tensor:
    """View `index` (0 to 9) of a normalized eval batch (N, C, H, W): same shape, per sample independent."""
    if not 0 <= index < MAX_TTA_VIEWS:
        raise IndexError(f"TTA view {index}: there are {MAX_TTA_VIEWS} views (0 to {MAX_TTA_VIEWS - 1})")
    window, flip = TTA_VIEWS[index]
    scale, dx, dy = WINDOWS[window]
    if scale == 1.0:
        return x.flip(-1) if flip else x
    theta = torch.tensor([[-scale if flip else scale, 0.0, dx * (1 - scale)], [0.0, scale, dy * (1 - scale)]],
                         dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def outputs(model: nn.Module, x: torch.Tensor, autocast, tta_n: int = 0, beta: float = 0.25,
            use_max: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A model input batch -> (float32 logits of the plain pass, its probabilities, the TTA
    probabilities of views 0 to `tta_n` - 1 or None when `tta_n` is 0): what a run's validation
    counts, `evaluate` counts and `predict` writes, computed the same way for all three."""
    with autocast():
        logits = model(x)
    logits = logits.float()
    plain = logits.softmax(dim=1)
    if tta_n == 0:
        return logits, plain, None
    views = []
    for index in range(tta_n):
        with autocast():
            views.append(model(tta_view(x, index)).float().softmax(dim=1))
    stacked = torch.stack(views)
    if use_max:
        return logits, plain, torch.maximum(stacked.max(dim=0).values, plain)
    return logits, plain, torch.lerp(stacked.mean(dim=0), plain, beta)


def batch_outputs(model: nn.Module, view: DeviceAugment, images: torch.Tensor, autocast, tta_n: int = 0, beta: float = 0.25,
                  use_max: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`outputs` of a uint8 (B, S, S, 3) batch on the device, through the eval `view`."""
    return outputs(model, view(images.permute(0, 3, 1, 2), train=False), autocast, tta_n, beta, use_max)
