"""On-device augmentation of uint8 batches: per-sample affine matrices, one `grid_sample`, lighting,
normalize, optional random erasing.

The CPU only decodes and presizes; the batch arrives on the device as uint8. Random parameters are
drawn per sample from this rank's own seeded generator (on the CPU, a few numbers per image, so a
seed gives the same draws on any device). Random-resized-crop, flip, rotation, zoom and translation
are composed into one 2x3 matrix per image (output coordinates -> source coordinates, both in
[-1, 1]) and applied by a single resampling to `image_size`: one interpolation, whatever the chain.
For images without an up, `vflip` (a vertical flip) or `dihedral` (one of the 8 symmetries of the
square) joins the same matrix: a signed permutation of the axes, exact at the pixel centres. Their
draws come after all the others and only when they are on, so a run without them draws exactly
what it drew before they existed. The same holds for `augment.policy` (TrivialAugment / RandAugment,
disttrain/data/policy.py): its draws come after every other draw of the batch, and it runs after the
resample, before lighting and normalization, in training only.
The eval path is the same code with the identity matrix (a plain resize of the presized square).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from disttrain.config import AugmentConfig
from disttrain.data.policy import AugmentPolicy

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's ImageNet weights expect (and the default)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _window(n: int, area: list[float], ratio: list[float], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (width, height) as fractions of the side: area in `area`, log-uniform aspect in `ratio`."""
    size = _uniform(n, *area, generator)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator)
    return torch.sqrt(size * torch.exp(log_ratio)).clamp(max=1.0), torch.sqrt(size / torch.exp(log_ratio)).clamp(max=1.0)


SYMMETRIES = torch.tensor([
    [[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],  # identity and the rotations by 90, 180, 270 degrees
    [[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[0, 1], [1, 0]], [[0, -1], [-1, 0]],  # the horizontal, vertical and two diagonal flips
], dtype=torch.float64)
"""The 8 symmetries of the square (the dihedral group) as 2x2 maps of [-1, 1] coordinates (x, y)."""


def apply_symmetry(x: torch.Tensor, index: int) -> torch.Tensor:
    """`SYMMETRIES[index]` applied exactly (no resampling) to square images (..., S, S): what the
    affine resample of that matrix gives at the pixel centres, for TTA views and tests."""
    if index in (1, 3, 6, 7) and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"symmetry {index} swaps the axes: needs square images, got {tuple(x.shape[-2:])}")
    if index < 4:
        return torch.rot90(x, index, dims=(-2, -1)) if index else x
    if index == 4:
        return x.flip(-1)
    if index == 5:
        return x.flip(-2)
    if index == 6:
        return x.transpose(-2, -1)
    if index == 7:
        return x.flip(-2, -1).transpose(-2, -1)
    raise IndexError(f"symmetry {index}: there are {len(SYMMETRIES)} (0 to {len(SYMMETRIES) - 1})")


def _symmetries(n: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 2) per-sample symmetries: any of the 8 with `dihedral`, identity or vertical flip with `vflip`."""
    if cfg.dihedral:
        return SYMMETRIES[torch.randint(len(SYMMETRIES), (n,), generator=generator)]
    vertical = torch.rand(n, generator=generator) < 0.5
    return torch.where(vertical[:, None, None], SYMMETRIES[5], SYMMETRIES[0])


class DeviceAugment:
    """`augment(images_uint8, train=True)` -> normalized float32 batch of `image_size`, channels_last."""

    def __init__(
        self, cfg: AugmentConfig, image_size: int, seed: int = 0, channels_last: bool = True,
        mean: list[float] | None = None, std: list[float] | None = None, interpolation: str = "bilinear",
    ):
        """`mean` / `std`: the normalization (default: cfg's, else ImageNet's). `interpolation`:
        the resample's, `bilinear` or `bicubic` (resolved from cfg's `auto` by the caller).
        `image_size` may be changed between epochs (progressive resizing)."""
        self.cfg = cfg
        self.image_size = image_size
        self.channels_last = channels_last
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"DeviceAugment: interpolation must be bilinear or bicubic, got {interpolation!r}")
        self.interpolation = interpolation
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = list(mean or cfg.mean or IMAGENET_MEAN)
        self.std = list(std or cfg.std or IMAGENET_STD)
        self._mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std).view(1, 3, 1, 1)
        self.policy = AugmentPolicy(cfg.policy, cfg.policy_ops, cfg.policy_magnitude) if cfg.policy != "none" else None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def train_matrices(self, n: int) -> torch.Tensor:
        """(n, 2, 3) affine matrices, random per sample: crop . translate . rotate . zoom . flip
        (. the vflip / dihedral symmetry, when on)."""
        cfg, g = self.cfg, self.generator
        # random-resized-crop: a (w, h) window (fractions of the side) at a random place inside
        w, h = _window(n, cfg.crop_scale, cfg.crop_ratio, g)
        cx = _uniform(n, -1, 1, g) * (1 - w)
        cy = _uniform(n, -1, 1, g) * (1 - h)
        # rotation, zoom and translation, applied to a sample with probability p_affine
        affine = torch.rand(n, generator=g, dtype=torch.float64) < cfg.p_affine
        angle = torch.where(affine, _uniform(n, -cfg.max_rotate, cfg.max_rotate, g), 0.0) * math.pi / 180
        zoom = torch.where(affine, _uniform(n, 1.0, cfg.max_zoom, g), 1.0)
        tx = torch.where(affine, _uniform(n, -cfg.max_translate, cfg.max_translate, g), 0.0) * 2
        ty = torch.where(affine, _uniform(n, -cfg.max_translate, cfg.max_translate, g), 0.0) * 2
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)

        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        # [[w, 0], [0, h]] @ [[cos, -sin], [sin, cos]] @ diag(flip, 1), then the shift
        theta[:, 0, 0] = w * cos * flip
        theta[:, 0, 1] = -w * sin
        theta[:, 1, 0] = h * sin * flip
        theta[:, 1, 1] = h * cos
        theta[:, 0, 2] = cx + tx
        theta[:, 1, 2] = cy + ty
        if cfg.vflip or cfg.dihedral:  # drawn last: the draws above stay those of a run without them
            theta[:, :, :2] = theta[:, :, :2] @ _symmetries(n, cfg, g)
        return theta.float()

    def lighting_params(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (brightness shift, contrast factor, saturation factor); neutral with 1 - p_lighting."""
        cfg, g = self.cfg, self.generator
        on = torch.rand(n, generator=g, dtype=torch.float64) < cfg.p_lighting
        brightness = torch.where(on, _uniform(n, -cfg.brightness, cfg.brightness, g), 0.0)
        contrast = torch.where(on, _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g), 1.0)
        saturation = torch.where(on, _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, g), 1.0)
        return brightness.float(), contrast.float(), saturation.float()

    def erase_boxes(self, n: int) -> torch.Tensor:
        """(n, 4) boxes x0, y0, x1, y1 in [0, 1]; an empty box for samples not erased."""
        g = self.generator
        on = torch.rand(n, generator=g, dtype=torch.float64) < self.cfg.erase_p
        w, h = _window(n, [0.02, 0.33], [0.3, 1 / 0.3], g)
        x0, y0 = _uniform(n, 0, 1, g) * (1 - w), _uniform(n, 0, 1, g) * (1 - h)
        boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)
        return torch.where(on[:, None], boxes, torch.zeros_like(boxes)).float()

    def _resample(self, x: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        n, c, h, w = x.shape
        size = self.image_size
        if theta is None:
            if (h, w) == (size, size):
                return x
            theta = torch.eye(2, 3).expand(n, 2, 3)
        grid = F.affine_grid(theta.to(x.device, x.dtype), [n, c, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode=self.interpolation, padding_mode="reflection", align_corners=False)
        return x.clamp_(0.0, 1.0) if self.interpolation == "bicubic" else x  # bicubic overshoots [0, 1]

    def _lighting(self, x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        brightness, contrast, saturation = (t.to(x.device).view(-1, 1, 1, 1) for t in params)
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = grey + (x - grey) * saturation
        mean = grey.mean(dim=(2, 3), keepdim=True)
        x = mean + (x - mean) * contrast + brightness
        return x.clamp_(0.0, 1.0)

    def _erase(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes.to(x.device)
        size = x.shape[-1]
        coords = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size
        inside_x = (coords[None, :] >= boxes[:, 0:1]) & (coords[None, :] < boxes[:, 2:3])  # (n, W)
        inside_y = (coords[None, :] >= boxes[:, 1:2]) & (coords[None, :] < boxes[:, 3:4])  # (n, H)
        mask = inside_y[:, None, :, None] & inside_x[:, None, None, :]
        return x.masked_fill(mask, 0.0)  # 0 after normalization = the dataset mean

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DeviceAugment expects uint8 (N, 3, H, W) batches, got {images.dtype} {tuple(images.shape)}")
        x = images.float().div_(255.0)
        x = self._resample(x, self.train_matrices(len(x)) if train else None)
        # drawn in the order they always were (matrices, lighting, erasing), the policy's last
        lighting = train and (self.cfg.brightness or self.cfg.contrast or self.cfg.saturation) and self.cfg.p_lighting
        lighting_params = self.lighting_params(len(x)) if lighting else None
        boxes = self.erase_boxes(len(x)) if train and self.cfg.erase_p else None
        if train and self.policy is not None:
            x = self.policy.apply_(x, self.policy.draw(len(x), tuple(x.shape[-2:]), self.generator))
        if lighting_params is not None:
            x = self._lighting(x, lighting_params)
        if self._mean.device != x.device:  # once: no host->device copy per batch
            self._mean, self._std = self._mean.to(x.device), self._std.to(x.device)
        x = (x - self._mean) / self._std
        if boxes is not None:
            x = self._erase(x, boxes)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
