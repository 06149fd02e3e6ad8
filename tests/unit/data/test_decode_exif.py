"""EXIF orientation: every decoding path (libjpeg-turbo, PIL, the batched torchvision decoder)
turns the stored pixels the way PIL's own `ImageOps.exif_transpose` does, for all 8 orientations."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from disttrain.data.decode import decode_jpeg_batch, decode_rgb, jpeg_orientation, load_presized, open_image, presize, presize_tensor

STORED = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)  # no symmetry: every turn differs


def _encoded(orientation: int | None, fmt: str = "JPEG") -> bytes:
    """STORED as `fmt` (JPEG: quality 100, no chroma subsampling; WebP lossless) with that EXIF orientation tag."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    options = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(STORED).save(out, format=fmt, exif=exif.tobytes(), **options)
    return out.getvalue()


def _upright(data: bytes) -> np.ndarray:
    """What PIL shows: the reference."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _turned_like_pil(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`pixels` as PIL's exif_transpose shows them with that tag (through a lossless PNG): each
    decoder's own pixels turned, so no test depends on two JPEG decoders agreeing to the bit."""
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG", exif=exif.tobytes())
    return _upright(out.getvalue())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_is_applied_like_pil_on_every_path(tmp_path, orientation):
    from torchvision.io import decode_jpeg

    data, plain = _encoded(orientation), _encoded(None)
    assert jpeg_orientation(data) == orientation
    expected = _upright(data)
    assert expected.shape == ((24, 16, 3) if orientation >= 5 else (16, 24, 3))
    if orientation != 1:
        assert not np.array_equal(expected, _upright(plain)), "the tag must change the picture"
    path, stored = tmp_path / "photo.jpg", tmp_path / "stored.jpg"
    path.write_bytes(data)
    stored.write_bytes(plain)
    turned = _turned_like_pil(decode_rgb(stored, 16), orientation)  # libjpeg-turbo (simplejpeg)
    assert np.array_equal(decode_rgb(path, 16), turned)
    assert np.array_equal(load_presized(path, 12), presize(turned, 12))  # what the folder and shard readers deliver
    assert np.array_equal(np.asarray(open_image(data)), expected)  # PIL (prepare, and formats other than JPEG)
    batch, decoded = decode_jpeg_batch([data, torch.frombuffer(bytearray(data), dtype=torch.uint8)], 12, torch.device("cpu"))
    with warnings.catch_warnings():  # torchvision's decoders are deprecated (decode_jpeg_batch says so once, for the library)
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = decode_jpeg(torch.frombuffer(bytearray(plain), dtype=torch.uint8)).permute(1, 2, 0).numpy()  # torchvision's own pixels
    reference = presize_tensor(torch.from_numpy(_turned_like_pil(raw, orientation).copy()).permute(2, 0, 1), 12)
    assert decoded == [0, 1] and torch.equal(batch[0], reference) and torch.equal(batch[1], reference)  # the data.decode=gpu path


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_the_pil_path_applies_it_too(fmt):
    """Formats other than JPEG decode through PIL (a PNG's eXIf chunk, a WebP's EXIF)."""
    data = _encoded(6, fmt)
    assert np.array_equal(decode_rgb(data, 16), _upright(data))
    assert np.array_equal(decode_rgb(data, 16), np.rot90(STORED, k=-1))  # 6: turned 90 degrees clockwise


def test_headers_without_a_usable_tag_mean_as_stored():
    plain = _encoded(None)
    assert jpeg_orientation(plain) == 1 and jpeg_orientation(b"not a jpeg") == 1 and jpeg_orientation(b"\xff\xd8") == 1
    assert jpeg_orientation(_encoded(9)) == 1  # out of range: ignored, as PIL ignores it
    tagged = _encoded(6)
    start = tagged.index(b"Exif\x00\x00")
    assert jpeg_orientation(tagged[: start + 12]) == 1  # cut inside the EXIF block
    assert jpeg_orientation(np.frombuffer(tagged, dtype=np.uint8)) == 6  # any bytes-like object
