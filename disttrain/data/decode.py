"""Bytes -> RGB image -> presized uint8 CHW tensor. The decoder sits behind `decode_rgb` alone so it
can be swapped (PIL today; torchvision.io / nvJPEG later) without touching the loaders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

# A truncated file must fail loudly, never decode to a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, LA, P, RGBA, CMYK, YCbCr, I;16, I, F) as 8-bit RGB.

    Transparent pixels are composited on white; 16-bit and float images are scaled to 0..255
    (PIL's own conversion would clip them to white).
    """
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif img.mode == "I":  # 16-bit PNGs open as "I"; small values mean 8-bit data
            top = 65535.0 if peak > 255 else 255.0
        else:  # "F": floats in [0, 1] or [0, 255]
            top = 255.0 if peak > 1.0 else 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(source: str | Path | bytes, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode an image file or byte string. Raises on anything undecodable.

    With `draft_size`, JPEGs decode at the smallest DCT scale that still covers that size on the
    shorter side (up to 8x less work for large photos).
    """
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(fp) as img:
        if draft_size is not None and img.format == "JPEG":
            w, h = img.size
            scale = draft_size / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()
        return _to_rgb(img)


def decode_rgb(source: str | Path | bytes, load_size: int) -> Image.Image:
    """The swappable decoder: file or bytes -> RGB PIL image, at least `load_size` on its shorter side
    when the original is (JPEG draft decoding)."""
    return open_image(source, draft_size=load_size)


def presize(img: Image.Image, size: int) -> torch.Tensor:
    """Shorter side to `size`, then a centre square crop: uint8 tensor (3, size, size)."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_presized(source: str | Path | bytes, size: int) -> torch.Tensor:
    """Decode and presize in one call (what a CPU data worker does per sample)."""
    return presize(decode_rgb(source, size), size)


def presize_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """`presize` for a decoded uint8 (3, H, W) tensor on any device: shorter side to `size`
    (antialiased bilinear), centre square crop."""
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    scale = size / min(w, h)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top : top + size, left : left + size]


def decode_jpeg_batch(data: list[torch.Tensor], size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The batched decoder (`data.decode=gpu`): JPEG byte tensors (CPU) -> presized uint8 batch
    (B, 3, size, size) on `device`; nvJPEG on CUDA. A payload the decoder rejects is replaced by
    another image of the same batch (the batch keeps its size) and counted: returns (batch, failures).

    torchvision's decoders are deprecated since 0.29 in favour of TorchCodec; this function is the
    one place to swap when they go."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad payload fails the whole batched call: decode one by one
            images = []
            for payload in data:
                try:
                    images.append(decode_jpeg(payload, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
    good = [image for image in images if image is not None]
    if not good:
        raise ValueError(f"none of the {len(data)} JPEG payloads of a batch could be decoded")
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        out[i] = presize_tensor(image if image is not None else good[i % len(good)], size)
    return out, len(images) - len(good)
