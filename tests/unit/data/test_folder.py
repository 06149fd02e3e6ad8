import io

import numpy as np
import pytest
from PIL import Image

from conftest import make_folder, write_image
from disttrain.data.decode import load_presized, open_image
from disttrain.data.folder import DataError, scan_image_folder, write_bad_files


def _bad_files(cls_dir):
    """The three kinds of bad file the scan must catch, written into `cls_dir`."""
    cls_dir.mkdir(parents=True, exist_ok=True)
    (cls_dir / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (cls_dir / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (cls_dir / "notes.jpg").write_text("this is a text file, not a photo\n")
    return {"empty.jpg", "truncated.jpg", "notes.jpg"}


def test_scan_finds_classes_sorted_and_labels(tmp_path):
    make_folder(tmp_path, {"train": {"zebra": 3, "ant": 2, "moth": 1}, "valid": {"ant": 1, "zebra": 2}})
    (tmp_path / "train" / "ant" / "readme.txt").write_text("ignored: not an image extension")
    data = scan_image_folder(tmp_path)
    assert data.classes == ["ant", "moth", "zebra"]
    assert sorted(data.train.labels) == [0, 0, 1, 2, 2, 2]
    assert sorted(data.valid.labels) == [0, 2, 2]
    assert data.valid.dir.name == "valid" and not data.bad


def test_auto_valid_dir_accepts_val(tmp_path):
    make_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    assert scan_image_folder(tmp_path).valid.dir.name == "val"


def test_missing_valid_dir_is_an_error(tmp_path):
    make_folder(tmp_path, {"train": {"a": 2}})
    with pytest.raises(DataError, match=r"no validation folder.*valid.*val"):
        scan_image_folder(tmp_path)


def test_bad_files_are_skipped_counted_and_listed(tmp_path):
    make_folder(tmp_path, {"train": {"a": 3, "b": 3}, "valid": {"a": 1, "b": 1}})
    names = _bad_files(tmp_path / "train" / "a")
    (tmp_path / "valid" / "b" / "zero.png").write_bytes(b"")
    data = scan_image_folder(tmp_path, bad_files="skip")
    assert {p.rsplit("/", 1)[1] for p in (b.path for b in data.train.bad)} == names
    assert len(data.bad) == 4 and len(data.train) == 6 and len(data.valid) == 2
    assert all(b.reason for b in data.bad)
    write_bad_files(data.bad, tmp_path / "run" / "bad_files.txt")
    lines = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert len(lines) == 4 and any("empty file (0 bytes)" in line for line in lines)


def test_bad_files_error_reports_all_at_once(tmp_path):
    make_folder(tmp_path, {"train": {"a": 3}, "valid": {"a": 1}})
    names = _bad_files(tmp_path / "train" / "a")
    with pytest.raises(DataError) as err:
        scan_image_folder(tmp_path, bad_files="error")
    message = str(err.value)
    assert message.startswith("3 file(s) are not decodable images")
    assert all(name in message for name in names) and "data.bad_files=skip" in message


def test_valid_class_missing_from_train(tmp_path):
    make_folder(tmp_path, {"train": {"a": 2}, "valid": {"a": 1, "ghost": 1}})
    with pytest.raises(DataError, match=r"ghost do not exist in .*train"):
        scan_image_folder(tmp_path)


def test_empty_class_is_an_error(tmp_path):
    make_folder(tmp_path, {"train": {"a": 2}, "valid": {"a": 1}})
    (tmp_path / "train" / "b").mkdir()
    _bad_files(tmp_path / "train" / "c")  # only bad files: empty after the skip
    with pytest.raises(DataError, match=r"class folder\(s\) b, c hold no usable images"):
        scan_image_folder(tmp_path)


def test_no_images_at_all(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "valid").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        scan_image_folder(tmp_path / "nowhere")


def _write_mode(path, mode, size=(40, 30), seed=0):
    """A random image in any PIL mode, including those `write_image` does not make (LA, 1, I, F)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "LA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8), "LA")
    elif mode == "1":
        img = Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    elif mode == "I":  # 32-bit signed integers holding 16-bit data (what 16-bit scanners write)
        img = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32), "I")
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32), "F")
    else:
        return write_image(path, size=size, mode=mode, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.mark.parametrize(
    "mode, suffix",
    [("RGB", "jpg"), ("L", "png"), ("LA", "png"), ("RGBA", "png"), ("P", "gif"), ("CMYK", "jpg"), ("I;16", "png"),
     ("1", "png"), ("1", "tif"), ("I", "tif"), ("F", "tif"), ("RGB", "bmp"), ("RGBA", "webp")],
)
def test_every_common_mode_becomes_rgb(tmp_path, mode, suffix):
    path = _write_mode(tmp_path / "train" / "a" / f"x.{suffix}", mode)
    with Image.open(path) as stored:
        assert stored.mode == mode or (mode, stored.mode) == ("I;16", "I"), f"the file is {stored.mode}, not {mode}"
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    pixels = load_presized(path, 16)
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)
    assert np.ptp(pixels) > 0, "a random image must not decode to one flat colour"
    # and the scan accepts it as a training image
    _write_mode(tmp_path / "valid" / "a" / f"x.{suffix}", mode)
    data = scan_image_folder(tmp_path)
    assert len(data.train) == 1 and not data.bad


def test_la_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 2), dtype=np.uint8)  # black, fully transparent
    arr[0, 0] = [10, 255]  # opaque dark grey
    arr[0, 1] = [0, 128]  # half-transparent black over white: mid grey
    Image.fromarray(arr, "LA").save(tmp_path / "la.png")
    rgb = np.asarray(open_image(tmp_path / "la.png")).astype(int)
    assert rgb[0, 0].tolist() == [10, 10, 10] and rgb[3, 3].tolist() == [255, 255, 255]
    assert np.abs(rgb[0, 1] - 127).max() <= 1


def test_mode_1_is_black_and_white(tmp_path):
    arr = np.zeros((4, 8), dtype=bool)
    arr[:, :4] = True
    Image.fromarray(arr).save(tmp_path / "bits.png")
    rgb = np.asarray(open_image(tmp_path / "bits.png"))
    assert (rgb[:, :4] == 255).all() and (rgb[:, 4:] == 0).all()


@pytest.mark.parametrize(
    "mode, high, low, expected",
    [
        ("I", 65535, 32768, (255, 128)),  # 16-bit data in a 32-bit image: scaled by 65535, not clipped at 255
        ("I", 200, 100, (200, 100)),  # 8-bit data in a 32-bit image: kept
        ("F", 1.0, 0.5, (255, 128)),  # floats in [0, 1]: scaled by 255
        ("F", 255.0, 100.0, (255, 100)),  # floats in [0, 255]: kept
    ],
)
def test_32_bit_int_and_float_images_are_scaled_not_clipped(tmp_path, mode, high, low, expected):
    arr = np.full((4, 8), low, dtype=np.int32 if mode == "I" else np.float32)
    arr[:, :4] = high
    Image.fromarray(arr, mode).save(tmp_path / "deep.tif")
    with Image.open(tmp_path / "deep.tif") as stored:
        assert stored.mode == mode
    rgb = np.asarray(open_image(tmp_path / "deep.tif"))
    assert (rgb[:, :4] == expected[0]).all() and (rgb[:, 4:] == expected[1]).all(), (rgb[0, 0], rgb[0, 4])


def test_16_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    arr[:, :4] = 65535
    Image.fromarray(arr).save(tmp_path / "deep.png")
    rgb = np.asarray(open_image(tmp_path / "deep.png"))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 7].tolist() == [128, 128, 128]


def test_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)  # black, fully transparent
    arr[0, 0] = [10, 20, 30, 255]  # one opaque pixel
    Image.fromarray(arr, "RGBA").save(tmp_path / "alpha.png")
    rgb = np.asarray(open_image(tmp_path / "alpha.png"))
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[3, 3].tolist() == [255, 255, 255]


def test_presize_keeps_the_centre_square(tmp_path):
    arr = np.zeros((40, 120, 3), dtype=np.uint8)  # wide: left third red, middle green, right blue
    arr[:, :40, 0] = 255
    arr[:, 40:80, 1] = 255
    arr[:, 80:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_presized(tmp_path / "wide.png", 20)
    assert out.shape == (20, 20, 3)
    inner = out[:, 1:-1]  # the edge columns may blend with the neighbouring band (bilinear)
    assert inner[..., 1].min() == 255 and inner[..., 0].max() == 0 and inner[..., 2].max() == 0


def test_large_jpeg_is_drafted_but_never_below_load_size(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(1600, 1200))
    out = load_presized(path, 224)
    assert out.shape == (224, 224, 3)
    small = open_image(path, draft_size=224)
    assert min(small.size) >= 224 and small.size[0] < 1600


def test_real_photos_scan(hymenoptera):
    data = scan_image_folder(hymenoptera)
    assert data.classes == ["ants", "bees"]
    assert len(data.train) + len(data.train.bad) == 245 and len(data.valid) + len(data.valid.bad) == 153
