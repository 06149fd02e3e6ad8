"""A model's forward pass on validation batches, the same for a run's validation, `evaluate` and
`predict`: the eval view, test-time augmentation (TTA), and the exact validation sums.

TTA views are fixed, not random, and distinct up to their number, `MAX_TTA_VIEWS` = 10 in each of
two sets. `flips` (the default, for photos with an up): the flips of the whole eval image and of its
four corners (a 90% window, resized back to the image size):

    0 the whole image flipped      1-4 the top-left, top-right, bottom-left, bottom-right corners
    5-8 the same corners flipped   9 the whole image as it is (the plain pass again)

`dihedral` (for images without an up: a model trained with augment.vflip or augment.dihedral, whose
model.pt says `tta_views: dihedral`): the 7 symmetries of the square other than the identity, exact
(no resampling), then the centre's 90% window:

    0 flipped left-right   1 flipped upside down   2 rotated by 180 degrees
    3-4 rotated by 90 and 270 degrees (counterclockwise, as torch.rot90)
    5-6 flipped about the main (top-left to bottom-right) and the other diagonal
    7 the centre window    8 the centre window flipped about the diagonal
    9 the whole image as it is (the plain pass again)

`tta_n` takes the first n (default 5: the flip and the four corners; or the two flips and the
three rotations). A sample's views, and so its
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
from disttrain.data.augment import SYMMETRIES, DeviceAugment, apply_symmetry
from disttrain.data.loader import DeviceLoader
from disttrain.metrics import EvalResult
from disttrain.multilabel import MultiLabelResult
from disttrain.task import Task

SINGLE_LABEL = Task()

WINDOWS = ((1.0, 0.0, 0.0), (0.9, -1.0, -1.0), (0.9, 1.0, -1.0), (0.9, -1.0, 1.0), (0.9, 1.0, 1.0), (0.9, 0.0, 0.0))
"""(scale, x offset, y offset) of the TTA windows: the whole image, then the top-left, top-right,
bottom-left and bottom-right corners, and the centre; offsets in units of the room the window leaves."""

TTA_VIEWS = {
    "flips": ((0, 4), (1, 0), (2, 0), (3, 0), (4, 0), (1, 4), (2, 4), (3, 4), (4, 4), (0, 0)),
    "dihedral": ((0, 4), (0, 5), (0, 2), (0, 1), (0, 3), (0, 6), (0, 7), (5, 0), (5, 6), (0, 0)),
}
"""Per view set, (window, symmetry: an index of disttrain.data.augment.SYMMETRIES) of TTA view i, in
order (see the module docstring)."""

MAX_TTA_VIEWS = max(len(views) for views in TTA_VIEWS.values())


def tta_views_of(augment: AugmentConfig) -> str:
    """The view set for a model trained with `augment`: `dihedral` when its images have no up."""
    return "dihedral" if augment.dihedral or augment.vflip else "flips"


def _views(views: str) -> tuple[tuple[int, int], ...]:
    if views not in TTA_VIEWS:
        raise ValueError(f"TTA views {views!r}: must be one of {', '.join(TTA_VIEWS)} (model.pt's tta_views)")
    return TTA_VIEWS[views]


def eval_view(image_size: int, mean: list[float], std: list[float], channels_last: bool = True,
              interpolation: str = "bilinear") -> DeviceAugment:
    """The validation view (the presized square resampled to `image_size`, normalized): `view(x, train=False)`."""
    return DeviceAugment(AugmentConfig(), image_size, channels_last=channels_last, mean=mean, std=std, interpolation=interpolation)


def check_tta(tta_n: int, beta: float, n_key: str = "--tta-n", beta_key: str = "--tta-beta", views: str = "flips") -> None:
    """ConfigError naming the option when the number of views (of the set `views`) or the blend
    weight is out of range."""
    count = len(_views(views))
    what = "the flips of the whole image and of its four corners" if views == "flips" else "the symmetries of the whole image and its centre"
    if not 1 <= tta_n <= count:
        raise ConfigError(f"{n_key}: must be 1 to {count} ({what}), got {tta_n}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"{beta_key}: must be in [0, 1] (the plain pass's weight in the blend), got {beta}")


def tta_view(x: torch.Tensor, index: int, views: str = "flips") -> torch.Tensor:
    """View `index` (0 to 9) of the set `views` of a normalized eval batch (N, C, H, W; square for
    `dihedral`): same shape, per sample independent (the whole image's symmetries keep its memory format)."""
    table = _views(views)
    if not 0 <= index < len(table):
        raise IndexError(f"TTA view {index}: there are {len(table)} views (0 to {len(table) - 1})")
    window, symmetry = table[index]
    scale, dx, dy = WINDOWS[window]
    if scale == 1.0:
        view = apply_symmetry(x, symmetry)  # exact; a rotation or diagonal flip is a strided view: copied into x's format
        keep = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return view if view is x else view.contiguous(memory_format=keep)
    (a, b), (c, d) = SYMMETRIES[symmetry].tolist()
    theta = torch.tensor([[scale * a, scale * b, dx * (1 - scale)], [scale * c, scale * d, dy * (1 - scale)]],
                         dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def outputs(model: nn.Module, x: torch.Tensor, autocast, tta_n: int = 0, beta: float = 0.25,
            use_max: bool = False, views: str = "flips", task: Task = SINGLE_LABEL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A model input batch -> (float32 logits of the plain pass, its probabilities, the TTA
    probabilities of views 0 to `tta_n` - 1 of the set `views`, or None when `tta_n` is 0): what a run's validation
    counts, `evaluate` counts and `predict` writes, computed the same way for all three. The
    probabilities are the `task`'s: softmax, or each tag's sigmoid (multi-label), and so are the
    views' that are averaged."""
    with autocast():
        logits = model(x)
    logits = logits.float()
    plain = task.probabilities(logits)
    if tta_n == 0:
        return logits, plain, None
    passes = []
    for index in range(tta_n):
        with autocast():
            passes.append(task.probabilities(model(tta_view(x, index, views)).float()))
    stacked = torch.stack(passes)
    if use_max:
        return logits, plain, torch.maximum(stacked.max(dim=0).values, plain)
    return logits, plain, torch.lerp(stacked.mean(dim=0), plain, beta)


def batch_outputs(model: nn.Module, view: DeviceAugment, images: torch.Tensor, autocast, tta_n: int = 0, beta: float = 0.25,
                  use_max: bool = False, views: str = "flips", task: Task = SINGLE_LABEL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`outputs` of a uint8 (B, S, S, 3) batch on the device, through the eval `view`."""
    return outputs(model, view(images.permute(0, 3, 1, 2), train=False), autocast, tta_n, beta, use_max, views, task)


def _sync_buffers(accelerator: Accelerator, model: nn.Module) -> None:
    """BatchNorm running stats drift apart after the last step (each rank updates them from its own
    batch); take rank 0's, as a checkpoint would, so every rank evaluates the same model."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, model: nn.Module, loader: DeviceLoader | None, augment: DeviceAugment, task: Task = SINGLE_LABEL,
    tta_n: int = 0, tta_beta: float = 0.25, tta_max: bool = False, tta_views: str = "flips",
) -> EvalResult | MultiLabelResult:
    """Exact validation: every sample once across ranks; the `task`'s sums (disttrain/task.py):
    loss, accuracy, top-5 and the confusion matrix reduced once at the end (`task.classes`
    enables top-5 and the matrix), or the multi-label metrics. No loader (data.valid_pct=0): the
    figures are NaN. With
    `tta_n` > 0 also the TTA loss and accuracy of that many views of the set `tta_views` (the
    table's figures stay the plain pass's).

    Leaves the model in eval mode."""
    model = accelerator.unwrap_model(model)  # plain forward: no DDP collectives per batch
    model.eval()
    _sync_buffers(accelerator, model)
    sums = task.sums(accelerator.device, tta=tta_n > 0)
    for images, labels in loader if loader is not None else ():
        if not len(labels):  # nothing of the batch decoded (data.decode=gpu: DecodeOnDevice); counted as skipped
            continue
        logits, _, tta = outputs(model, augment(images, train=False), accelerator.autocast, tta_n, tta_beta, tta_max, tta_views, task)
        sums.add(logits, labels, tta)
    skipped = loader.take_skipped() if loader is not None else 0
    return sums.result(lambda totals: accelerator.reduce(totals, reduction="sum"), skipped=skipped)
