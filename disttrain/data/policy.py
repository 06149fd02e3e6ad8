"""TrivialAugment and RandAugment on the device (`augment.policy: trivial | rand`): each sample draws
its own operations and magnitudes, and the batch runs one batched kernel per operation kind present.

The 14 operations and their magnitude ranges are torchvision's (TrivialAugmentWide's wide ranges,
RandAugment's at magnitude M of 31 bins); docs/augmentation.md tables them. The draws are a few
numbers per sample from the caller's CPU generator, so a seed gives the same draws on any device
and looking at which kinds are present never waits for the device. The images are float in [0, 1],
(N, C, H, W), on any device, and stay in [0, 1]. For each kind present, its samples are picked by
`index_select`, transformed by one call with per-sample magnitudes, and written back by
`index_copy_`: the work grows with the operation kinds, never with a loop over samples.

Differences from torchvision, on purpose: the geometric operations resample bilinearly (torchvision's
policies default to nearest; on float images bilinear loses less), with torchvision's fill of 0
(black) outside the image. Posterize, solarize and equalize act on the 8-bit value of each pixel
(round(x * 255)), so a uint8 image gives exactly torchvision's uint8 result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

NUM_BINS = 31
"""Magnitude bins, as torchvision's: bin 0 is no change, bin 30 the range's far end."""

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
"""The operations, torchvision's 14 of TrivialAugmentWide and RandAugment, in its order."""


@dataclass(frozen=True)
class OpRange:
    """One operation's magnitude over the bins: `low` at bin 0 to `high` at bin 30, linear between."""

    low: float = 0.0
    """The magnitude at bin 0."""
    high: float = 0.0
    """The magnitude at bin 30 (for `per_side`: a fraction of the image's side along the operation's axis)."""
    signed: bool = False
    """A random sign per sample (shears, translations, rotation, the four enhancements)."""
    per_side: bool = False
    """`high` scales with the image (RandAugment's translation: 150/331 of the side)."""
    unit: str = ""
    """What the magnitude is, for the docs."""


_NONE = OpRange(unit="-")


def _ranges(shear: float, translate: OpRange, rotate: float, enhance: float, posterize_bits: int) -> dict[str, OpRange]:
    return {
        "Identity": _NONE,
        "ShearX": OpRange(0.0, shear, True, unit="shear factor (tan of the angle), about the top edge"),
        "ShearY": OpRange(0.0, shear, True, unit="shear factor (tan of the angle), about the left edge"),
        "TranslateX": translate,
        "TranslateY": translate,
        "Rotate": OpRange(0.0, rotate, True, unit="degrees, about the centre"),
        "Brightness": OpRange(0.0, enhance, True, unit="factor - 1 (blend with black)"),
        "Color": OpRange(0.0, enhance, True, unit="factor - 1 (blend with the grey image)"),
        "Contrast": OpRange(0.0, enhance, True, unit="factor - 1 (blend with the mean grey)"),
        "Sharpness": OpRange(0.0, enhance, True, unit="factor - 1 (blend with the 3x3 smoothed image)"),
        "Posterize": OpRange(8.0, float(posterize_bits), unit="bits kept of 8 (rounded)"),
        "Solarize": OpRange(255.0, 0.0, unit="threshold on the 8-bit value"),
        "AutoContrast": _NONE,
        "Equalize": _NONE,
    }


RANGES = {
    "trivial": _ranges(0.99, OpRange(0.0, 32.0, True, unit="pixels (truncated to whole pixels)"), 135.0, 0.99, 2),
    "rand": _ranges(0.3, OpRange(0.0, 150.0 / 331.0, True, per_side=True, unit="pixels, 150/331 of the side at bin 30 (truncated)"),
                    30.0, 0.9, 4),
}
"""Per policy, each operation's range: TrivialAugmentWide's (`trivial`) and RandAugment's (`rand`)."""


@dataclass(frozen=True)
class PolicyDraws:
    """The per-sample draws of one batch: `ops[i, j]` is the j-th operation of sample i (an index
    into OPS), `magnitudes[i, j]` its signed magnitude in the operation's unit. CPU tensors."""

    ops: torch.Tensor
    """(n, k) int64: k = 1 for TrivialAugment, `policy_ops` for RandAugment."""
    magnitudes: torch.Tensor
    """(n, k) float64."""

    def select(self, index: torch.Tensor | slice) -> PolicyDraws:
        """The draws of some samples (to apply them alone, as a test does)."""
        return PolicyDraws(self.ops[index], self.magnitudes[index])


def magnitudes(policy: str, ops: torch.Tensor, bins: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The unsigned magnitude of each `ops` entry at its (float) `bins`: torchvision's value at an
    integer bin, linear between bins. `size` is the (height, width) the operations see."""
    table = RANGES[policy]
    low = torch.tensor([table[name].low for name in OPS], dtype=torch.float64)[ops]
    high = torch.tensor([table[name].high for name in OPS], dtype=torch.float64)
    for axis, name in ((1, "TranslateX"), (0, "TranslateY")):
        if table[name].per_side:
            high[OPS.index(name)] *= size[axis]
    value = low + (high[ops] - low) * bins.double() / (NUM_BINS - 1)
    return torch.where(ops == OPS.index("Posterize"), value.round(), value)


class AugmentPolicy:
    """`policy.draw(n, size, generator)` then `policy.apply_(x, draws)`: TrivialAugment (`trivial`)
    or RandAugment (`rand`, `num_ops` operations per sample at `magnitude`)."""

    def __init__(self, name: str, num_ops: int = 2, magnitude: float = 9.0):
        if name not in RANGES:
            raise ValueError(f"augment.policy: must be one of none, {', '.join(RANGES)}, got {name!r}")
        if name == "rand" and (num_ops < 1 or not 0 <= magnitude <= NUM_BINS - 1):
            raise ValueError(f"RandAugment needs augment.policy_ops >= 1 and augment.policy_magnitude in [0, {NUM_BINS - 1}], "
                             f"got {num_ops!r} and {magnitude!r}")
        self.name = name
        self.num_ops = 1 if name == "trivial" else num_ops
        self.magnitude = magnitude

    def draw(self, n: int, size: tuple[int, int], generator: torch.Generator) -> PolicyDraws:
        """Per sample: its operations (uniform over the 14, with replacement), each one's bin
        (TrivialAugment: uniform over the 31; RandAugment: `magnitude`) and sign. Always the same
        number of draws for a given n, whatever is drawn."""
        shape = (n, self.num_ops)
        ops = torch.randint(len(OPS), shape, generator=generator)
        if self.name == "trivial":
            bins = torch.randint(NUM_BINS, shape, generator=generator).double()
        else:
            bins = torch.full(shape, float(self.magnitude), dtype=torch.float64)
        negative = torch.randint(2, shape, generator=generator).bool()
        signed = torch.tensor([RANGES[self.name][name].signed for name in OPS])[ops]
        value = magnitudes(self.name, ops, bins, size)
        value = torch.where(signed & negative, -value, value)
        translate = (ops == OPS.index("TranslateX")) | (ops == OPS.index("TranslateY"))
        return PolicyDraws(ops, torch.where(translate, value.trunc(), value))  # whole pixels, as torchvision's int()

    def apply_(self, x: torch.Tensor, draws: PolicyDraws, kernels: Mapping[str, Callable] | None = None) -> torch.Tensor:
        """`x` (N, C, H, W) float in [0, 1], transformed in place and returned: for each operation
        slot in turn, one call of `kernels[op](samples, magnitudes)` per operation kind present
        (Identity: none). `kernels`: KERNELS, or wrapped ones (a test counts the calls)."""
        kernels = KERNELS if kernels is None else kernels
        if draws.ops.shape != (len(x), self.num_ops):
            raise ValueError(f"AugmentPolicy: draws for {tuple(draws.ops.shape)} (samples, operations), "
                             f"a batch of {len(x)} with {self.num_ops} per sample")
        for slot in range(draws.ops.shape[1]):
            ops = draws.ops[:, slot]
            for kind in ops.unique().tolist():  # on the CPU: no wait on the device
                if OPS[kind] == "Identity":
                    continue
                chosen = (ops == kind).nonzero().squeeze(1)
                index = chosen.to(x.device, non_blocking=True)
                magnitude = draws.magnitudes[chosen, slot].to(x.device, x.dtype, non_blocking=True)
                x.index_copy_(0, index, kernels[OPS[kind]](x.index_select(0, index), magnitude))
        return x


# -- the kernels: (m, C, H, W) float in [0, 1] and (m,) magnitudes -> (m, C, H, W) in [0, 1] ---------


def _per_sample(magnitude: torch.Tensor) -> torch.Tensor:
    return magnitude.view(-1, 1, 1, 1)


def _warp(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tx: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
          ty: torch.Tensor) -> torch.Tensor:
    """One bilinear resample of the batch by per-sample maps from output to source coordinates in
    [-1, 1] (affine_grid's): source x = a x + b y + tx, source y = c x + d y + ty. Fill 0 outside."""
    theta = torch.stack([torch.stack([a, b, tx], -1), torch.stack([c, d, ty], -1)], -2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0.0, 1.0)


def shear_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x' = x + m y about the top edge (torchvision's shear about the corner, centre=[0, 0])."""
    one, zero, r = torch.ones_like(m), torch.zeros_like(m), x.shape[-2] / x.shape[-1]
    return _warp(x, one, m * r, m * r, zero, one, zero)


def shear_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """y' = y + m x about the left edge."""
    one, zero, r = torch.ones_like(m), torch.zeros_like(m), x.shape[-1] / x.shape[-2]
    return _warp(x, one, zero, zero, m * r, one, m * r)


def translate_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The content moves right by m pixels."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _warp(x, one, zero, -2 * m / x.shape[-1], zero, one, zero)


def translate_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The content moves down by m pixels."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _warp(x, one, zero, zero, zero, one, -2 * m / x.shape[-2])


def rotate(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise by m degrees about the centre (torchvision's rotate)."""
    angle = m * (math.pi / 180)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(m)
    h, w = x.shape[-2:]
    return _warp(x, cos, -sin * (h / w), zero, sin * (w / h), cos, zero)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(m, 1, H, W) luma, torchvision's weights."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor x + (1 - factor) other (factor > 1 pushes away from `other`), clamped to [0, 1]."""
    f = _per_sample(factor)
    return (f * x + (1 - f) * other).clamp_(0.0, 1.0)


def brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(1 + m)).clamp_(0.0, 1.0)


def color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grey(x), 1 + m)


def contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True), 1 + m)


def sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Blend with the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, the border pixels
    kept as they are (PIL's and torchvision's)."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    inner = x[..., 1:-1, 1:-1]
    # the kernel is the 3x3 mean (x 9/13) plus 4/13 of the centre: a pooling, faster than a grouped conv
    smooth = F.avg_pool2d(x, 3, stride=1).mul_(9 / 13).add_(inner, alpha=4 / 13)
    out = x.clone()
    out[..., 1:-1, 1:-1] = smooth.sub_(inner).mul_(_per_sample(-m)).add_(inner).clamp_(0.0, 1.0)  # x + (1 - f)(smooth - x)
    return out


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit value of each pixel, as floats (exact integers)."""
    return x.mul(255).round_()


def posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Keep the top m bits of the 8-bit value (uint8 & mask, as floor(v / 2^(8-m)) 2^(8-m))."""
    step = _per_sample(torch.exp2(8 - m))
    return _bytes(x).div_(step).floor_().mul_(step / 255)


def solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above the threshold m (on the 8-bit scale)."""
    return torch.where(x >= _per_sample(m) / 255, 1 - x, x)


def autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to [0, 1] (a constant channel is kept)."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - low
    flat = span <= 0
    stretched = (x - torch.where(flat, 0.0, low)) / torch.where(flat, 1.0, span)
    return stretched.clamp_(0.0, 1.0)


def equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Histogram equalization of each channel's 8-bit values, PIL's lookup table (torchvision's
    equalize): a 256-bin histogram per (sample, channel) by one scatter_add, its cumulative sum, the
    step (pixels other than the brightest value's, / 255); a channel with step 0 is kept."""
    shape = x.shape
    values = _bytes(x).long().flatten(2)  # (m, C, H W)
    hist = torch.zeros(*values.shape[:2], 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, values, hist.new_ones(1).expand_as(values))
    cumulative = hist.cumsum(2)
    brightest = hist.gather(2, cumulative.argmax(2, keepdim=True))  # the count of the largest value present
    step = (values.shape[2] - brightest) // 255
    lut = ((cumulative[..., :-1] + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], dim=2)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))  # step 0: the identity
    return (lut.to(x.dtype) / 255).gather(2, values).view(shape)  # one lookup, straight to floats


KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y, "Rotate": rotate,
    "Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness, "Posterize": posterize,
    "Solarize": solarize, "AutoContrast": autocontrast, "Equalize": equalize,
}
"""The batched kernel of each operation but Identity."""
