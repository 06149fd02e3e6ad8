"""On-device augmentation of uint8 batches: per-sample affine matrices, one `grid_sample`, normalize.

The CPU only decodes and presizes; the batch arrives on the device as uint8. Random parameters are
drawn per sample from this rank's own seeded generator (on the CPU, so a seed gives the same draws
on any device), composed into one 2x3 affine matrix per image and applied by a single resampling
to `image_size`. Today the matrix holds the resize and a horizontal flip; crop, rotation, zoom and
lighting compose into the same matrix / the same pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disttrain.config import AugmentConfig


class DeviceAugment:
    """`augment(images_uint8, train=True)` -> normalized float32 batch of `image_size`, channels_last."""

    def __init__(self, cfg: AugmentConfig, image_size: int, seed: int = 0, channels_last: bool = True):
        self.cfg = cfg
        self.image_size = image_size
        self.channels_last = channels_last
        self.generator = torch.Generator().manual_seed(seed)
        self._mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std).view(1, 3, 1, 1)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def train_matrices(self, n: int) -> torch.Tensor:
        """(n, 2, 3) affine matrices in normalized coordinates, random per sample."""
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        if self.cfg.flip:
            flips = torch.rand(n, generator=self.generator) < 0.5
            theta[:, 0, 0] = torch.where(flips, -1.0, 1.0)
        return theta

    def _resample(self, x: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        n, c, h, w = x.shape
        size = self.image_size
        if theta is None:
            if (h, w) == (size, size):
                return x
            theta = torch.eye(2, 3).expand(n, 2, 3)
        grid = F.affine_grid(theta.to(x.device, x.dtype), [n, c, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DeviceAugment expects uint8 (N, 3, H, W) batches, got {images.dtype} {tuple(images.shape)}")
        x = images.float().div_(255.0)
        theta = self.train_matrices(len(x)) if train else None
        x = self._resample(x, theta)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
