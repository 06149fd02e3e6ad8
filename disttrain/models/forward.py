"""A model's forward pass on validation batches, the same for a run's validation, `evaluate` and
`predict`: the eval view, test-time augmentation (TTA), and the exact validation sums.

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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from disttrain.config import AugmentConfig, ConfigError
from disttrain.data.augment import DeviceAugment
from disttrain.data.loader import DeviceLoader
from disttrain.metrics import EvalResult, EvalSums

WINDOWS = ((1.0, 0.0, 0.0), (0.9, -1.0, -1.0), (0.9, 1.0, -1.0), (0.9, -1.0, 1.0), (0.9, 1.0, 1.0))
"""(scale, x offset, y offset) of the TTA windows: the whole image, then the top-left, top-right,
bottom-left and bottom-right corners; offsets in units of the room the window leaves."""

TTA_VIEWS = ((0, True), (1, False), (2, False), (3, False), (4, False), (1, True), (2, True), (3, True), (4, True), (0, False))
"""(window, flipped) of TTA view i, in order (see the module docstring)."""

MAX_TTA_VIEWS = len(TTA_VIEWS)

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


def _sync_buffers(accelerator: Accelerator, model: nn.Module) -> None:
    """BatchNorm running stats drift apart after the last step (each rank updates them from its own
    batch); take rank 0's, as a checkpoint would, so every rank evaluates the same model."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, model: nn.Module, loader: DeviceLoader, augment: DeviceAugment, num_classes: int | None = None,
    tta_n: int = 0, tta_beta: float = 0.25, tta_max: bool = False,
) -> EvalResult:
    """Exact validation: every sample once across ranks; loss, accuracy, top-5 and the confusion
    matrix from sums reduced once at the end (`num_classes` enables top-5 and the matrix). With
    `tta_n` > 0 also the TTA loss and accuracy (the table's figures stay the plain pass's).

    Leaves the model in eval mode."""
    model = accelerator.unwrap_model(model)  # plain forward: no DDP collectives per batch
    model.eval()
    _sync_buffers(accelerator, model)
    sums = EvalSums(num_classes, accelerator.device, tta=tta_n > 0)
    for images, labels in loader:
        if not len(labels):  # nothing of the batch decoded (data.decode=gpu: DecodeOnDevice); counted as skipped
            continue
        logits, _, tta = outputs(model, augment(images, train=False), accelerator.autocast, tta_n, tta_beta, tta_max)
        sums.add(logits, labels, tta)
    return sums.result(lambda totals: accelerator.reduce(totals, reduction="sum"), skipped=loader.take_skipped())
