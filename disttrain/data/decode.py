"""Bytes -> RGB pixels -> presized uint8 square, height x width x channels (the layout decoders
produce and channels_last wants; the device reads the batch as NCHW through a permuted view).

The decoder sits behind `decode_rgb` alone so it can be swapped without touching the loaders:
libjpeg-turbo via simplejpeg for JPEGs, PIL for everything else; `decode_jpeg_batch` is the batched
GPU decoder (nvJPEG) for `data.decode=gpu`.

Every path applies the EXIF orientation tag (a phone photo stored sideways with "rotate 90" in its
header comes out upright, as a photo viewer shows it): simplejpeg and nvJPEG ignore EXIF, so
`jpeg_orientation` reads the tag from the JPEG's APP1 segment (a few microseconds) and the decoded
pixels are turned; PIL's path reads it with `Image.getexif`. Training (folders and shards),
`disttrain prepare`, `evaluate` and `predict` all decode here, so they all see the same pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

# A truncated file must fail loudly, never decode to a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}

ORIENTATION_TAG = 0x0112
# EXIF orientation -> (transpose, flip rows, flip columns), applied in that order to the stored pixels:
# the image as a viewer shows it. 1 is as stored; 6 is "rotate 90 degrees clockwise", 8 counter-clockwise.
_ORIENT = {
    1: (False, False, False), 2: (False, False, True), 3: (False, True, True), 4: (False, True, False),
    5: (True, False, False), 6: (True, False, True), 7: (True, True, True), 8: (True, True, False),
}
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI: no length field


def jpeg_orientation(data) -> int:
    """The EXIF orientation (1-8) of JPEG bytes (any bytes-like object), from the Exif APP1 segment;
    1 when there is none or it cannot be read. Reads the headers only (stops at the scan data)."""
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    if bytes(view[:2]) != b"\xff\xd8":
        return 1
    pos, end = 2, len(view)
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return 1
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no header follows
            return 1
        length = int.from_bytes(view[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and bytes(view[pos + 4 : pos + 10]) == b"Exif\x00\x00":
            return _tiff_orientation(bytes(view[pos + 10 : pos + 2 + length]))
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """The orientation entry of a TIFF header's first IFD (EXIF's layout), 1 when absent or malformed."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8 or int.from_bytes(tiff[2:4], order) != 42:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for i in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return 1
        if int.from_bytes(tiff[entry : entry + 2], order) == ORIENTATION_TAG:
            if int.from_bytes(tiff[entry + 2 : entry + 4], order) != 3:  # SHORT, the only type EXIF allows
                return 1
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)  # left-justified in the value field
            return value if value in _ORIENT else 1
    return 1


def orient_array(image: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels (H, W, C) -> the image as EXIF `orientation` says to show it (contiguous)."""
    if orientation not in _ORIENT or orientation == 1:
        return image
    transpose, flip_rows, flip_cols = _ORIENT[orientation]
    if transpose:
        image = image.transpose(1, 0, 2)
    if flip_rows:
        image = image[::-1]
    if flip_cols:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def orient_tensor(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`orient_array` for a (C, H, W) tensor on any device."""
    transpose, flip_rows, flip_cols = _ORIENT.get(orientation, _ORIENT[1])
    if transpose:
        image = image.transpose(-1, -2)
    dims = [d for d, flip in ((-2, flip_rows), (-1, flip_cols)) if flip]
    return image.flip(dims) if dims else image


def _exif_transpose(img: Image.Image) -> Image.Image:
    """A PIL image turned as its EXIF orientation says (PIL's own reading of the tag)."""
    orientation = img.getexif().get(ORIENTATION_TAG, 1)
    if orientation not in _ORIENT or orientation == 1:
        return img
    transpose, flip_rows, flip_cols = _ORIENT[orientation]
    if transpose:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    if flip_rows:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if flip_cols:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


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
    """Open and fully decode an image file or byte string, turned as its EXIF orientation says.
    Raises on anything undecodable.

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
        return _to_rgb(_exif_transpose(img))


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG header, or None when `data` is not a JPEG libjpeg-turbo takes."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return height, width


def decode_rgb(source: str | Path | bytes, load_size: int) -> np.ndarray:
    """The swappable decoder: file or bytes -> RGB uint8 array (H, W, 3), at least `load_size` on its
    shorter side when the original is, upright (EXIF orientation applied).

    JPEGs go straight to libjpeg-turbo (simplejpeg: no PIL image, no extra copy), scaled in the DCT
    when the shorter side is at least twice `load_size`; a JPEG it rejects as damaged (strict mode)
    falls through to PIL, which raises. Every other format (and CMYK JPEGs) goes through PIL."""
    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    size = _jpeg_size(data)
    if size is not None:
        height, width = size
        limits = {"min_height": load_size} if height <= width else {"min_width": load_size}
        scale = {"min_factor": 2.0, **limits} if min(height, width) >= 2 * load_size else {}
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", **scale)
        except ValueError:
            pass  # CMYK, arithmetic coding, damaged data: PIL decides
        else:
            return orient_array(image, jpeg_orientation(data))
    return np.asarray(open_image(data, draft_size=load_size))


def presize(image: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Shorter side to `size` (antialiased bilinear on torch's uint8 kernel), then the centre square:
    uint8 (size, size, 3), written into `out` when given (a slot of a batch buffer)."""
    h, w = image.shape[:2]
    if out is None:
        out = np.empty((size, size, 3), dtype=np.uint8)
    if min(h, w) == size:
        top, left = (h - size) // 2, (w - size) // 2
        out[...] = image[top : top + size, left : left + size]
        return out
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    hwc = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else image.copy())
    # a (1, 3, H, W) view with channels_last strides: torch's uint8 antialiased kernel then stays
    # channels_last, and copying the square into the HWC slot is a plain row copy
    resized = F.interpolate(hwc[None].permute(0, 3, 1, 2), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    torch.from_numpy(out).copy_(resized[0, :, top : top + size, left : left + size].permute(1, 2, 0))
    return out


def load_presized(source: str | Path | bytes, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Decode and presize in one call (what a CPU data worker does per sample): uint8 (size, size, 3)."""
    return presize(decode_rgb(source, size), size, out)


def presize_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """`presize` for a decoded uint8 (3, H, W) tensor on any device: shorter side to `size`
    (antialiased bilinear), centre square crop."""
    h, w = image.shape[-2:]
    scale = size / min(w, h)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        image = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[:, top : top + size, left : left + size]


def decode_jpeg_batch(data: list[bytes | torch.Tensor], size: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The batched decoder (`data.decode=gpu`): JPEG bytes (or 1-D uint8 CPU tensors) -> presized uint8 images
    (D, 3, size, size) on `device`, upright (EXIF orientation applied); nvJPEG on CUDA. Returns the images of
    the D payloads that decoded, in order, and their positions in `data`: a payload the decoder rejects is
    left out (what takes its place, with which label, is the caller's: `DeviceLoader`'s `DecodeOnDevice`).

    torchvision's decoders are deprecated since 0.29 in favour of TorchCodec; this function is the
    one place to swap when they go."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) if isinstance(d, (bytes, bytearray)) else d for d in data]
    # torchvision's CUDA decoder ignores apply_exif_orientation: read the tag here, turn on the device
    orientations = [jpeg_orientation(payload.numpy()) for payload in data]
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
    decoded = [i for i, image in enumerate(images) if image is not None]
    out = torch.empty((len(decoded), 3, size, size), dtype=torch.uint8, device=device)
    for row, i in enumerate(decoded):
        out[row] = presize_tensor(orient_tensor(images[i], orientations[i]), size)
    return out, decoded
