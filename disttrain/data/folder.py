"""Scan and validate an image folder once: `root/<train_dir>/<class>/*` and `root/<valid_dir>/<class>/*`.

Classes are train's sub-folders, sorted. Every candidate file is fully decoded at scan time (JPEGs
at reduced DCT scale, which still reads every byte), so a zero-byte, truncated or mislabelled file
is found before training starts rather than crashing a worker at hour three.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from disttrain.data.decode import IMAGE_EXTENSIONS, open_image
from disttrain.errors import UserError


class DataError(UserError):
    """The data on disk cannot be used as it is; the message names the path and the fix."""


@dataclass
class BadFile:
    path: str
    reason: str


Target = Union[int, tuple[int, ...]]
"""A file's label: a class index, or (multi-label) the sorted indices of its classes."""


@dataclass
class Split:
    """One split (train or valid): paths with their targets into `classes` (int labels, or tuples
    of class indices for multi-label data)."""

    name: str
    dir: Path
    paths: list[str]
    labels: list[Target]
    bad: list[BadFile] = field(default_factory=list)
    classes: int = 0
    """The number of classes (the width of a multi-label target)."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multi_label(self) -> bool:
        return bool(self.labels) and isinstance(self.labels[0], tuple)

    def targets(self) -> list[int] | np.ndarray:
        """What a loader yields per sample: the int labels, or a uint8 (N, classes) multi-hot matrix."""
        if not self.multi_label:
            return self.labels
        hot = np.zeros((len(self.labels), self.classes), dtype=np.uint8)
        for row, tags in enumerate(self.labels):
            hot[row, list(tags)] = 1
        return hot


@dataclass
class ImageFolderData:
    classes: list[str]
    train: Split
    valid: Split
    multi_label: bool = False
    """Several labels per image (data.label_delim): sigmoid outputs, binary cross-entropy."""
    listed_bad: list[BadFile] = field(default_factory=list)
    """Files the listing already set aside (rows naming a missing file, names data.label_regex does not match)."""
    split: object | None = None
    """The drawn split (disttrain/data/split.py's SplitRecord) where one was drawn, else None."""

    @property
    def bad(self) -> list[BadFile]:
        return self.listed_bad + self.train.bad + self.valid.bad


def resolve_valid_dir(root: Path, valid_dir: str) -> Path:
    """`auto` -> `valid/` if present, else `val/`; otherwise the named folder, which must exist."""
    if valid_dir == "auto":
        for name in ("valid", "val"):
            if (root / name).is_dir():
                return root / name
        raise DataError(
            f"{root}: no validation folder: expected {root / 'valid'} or {root / 'val'} "
            "(or name it with data.valid_dir=...)"
        )
    path = root / valid_dir
    if not path.is_dir():
        raise DataError(f"data.valid_dir: {path} is not a folder")
    return path


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    return {
        entry.name: Path(entry.path)
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not entry.name.startswith(".")
    }


def _image_files(class_dir: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
    return files


def check_image(path: str | Path) -> str | None:
    """None if the file decodes as an image, else a short reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        open_image(path, draft_size=32)
    except Exception as err:  # PIL raises many types; every one means "cannot train on this"
        return f"{type(err).__name__}: {err}".strip()
    return None


def _list_split(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(path, label) of every candidate image file in a split, classes in order, files sorted."""
    class_dirs = _class_dirs(split_dir)
    candidates: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        if cls in class_dirs:
            candidates += [(p, label) for p in _image_files(class_dirs[cls])]
    return candidates


@dataclass
class FolderListing:
    """The structure of a source, checked but not decoded: classes and candidate files (a class
    folder tree here; a labelled flat folder or a drawn split in disttrain/data/source.py)."""

    classes: list[str]
    train_dir: Path
    valid_dir: Path
    train: list[tuple[Path, Target]]
    valid: list[tuple[Path, Target]]
    multi_label: bool = False
    bad: list[BadFile] = field(default_factory=list)
    """Files set aside while listing (data.bad_files decides: an error, or counted and skipped)."""
    split: object | None = None
    """The drawn split (SplitRecord) where the listing drew one."""


def list_image_folder(root: str | Path, train_dir: str = "train", valid_dir: str | None = "auto") -> FolderListing:
    """Classes (train's sub-folders, sorted) and candidate files of both splits (`valid_dir` None:
    train's alone, for a split drawn from it); raises DataError for a layout a user must fix. Reads
    directories only, no image bytes."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder (it should hold {train_dir}/<class>/ and valid/<class>/)")
    train_path = root / train_dir
    if not train_path.is_dir():
        raise DataError(f"data.train_dir: {train_path} is not a folder")
    valid_path = resolve_valid_dir(root, valid_dir) if valid_dir is not None else train_path

    classes = sorted(_class_dirs(train_path))
    if not classes:
        raise DataError(f"{train_path}: no class folders; expected {train_path}/<class>/<image files>")
    extra = sorted(set(_class_dirs(valid_path)) - set(classes))
    if extra:
        raise DataError(
            f"{valid_path}: class folder(s) {', '.join(extra)} do not exist in {train_path}; "
            "the model can only predict training classes: add them to train or remove them from valid"
        )
    valid = _list_split(valid_path, classes) if valid_dir is not None else []
    return FolderListing(classes, train_path, valid_path, _list_split(train_path, classes), valid)


def _check_split(name: str, split_dir: Path, candidates: list[tuple[Path, Target]], workers: int, classes: int) -> Split:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(check_image, [p for p, _ in candidates], chunksize=64))
    split = Split(name=name, dir=split_dir, paths=[], labels=[], classes=classes)
    for (path, label), reason in zip(candidates, reasons):
        if reason is None:
            split.paths.append(str(path))
            split.labels.append(label)
        else:
            split.bad.append(BadFile(str(path), reason))
    return split


def check_usable(classes: list[str], train_dir: Path, valid_dir: Path, train_labels, valid_count: int) -> None:
    """Every class has a usable training image and the validation split is not empty (a class
    folder tree's rules; disttrain/data/source.py states a flat folder's)."""
    present = set(train_labels)
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise DataError(
            f"{train_dir}: class folder(s) {', '.join(empty)} hold no usable images; add images or remove the folder(s)"
        )
    if valid_count == 0:
        raise DataError(f"{valid_dir}: no usable images in any class folder")


def bad_files_error(bad: list[BadFile]) -> DataError:
    lines = "\n".join(f"  {b.path}: {b.reason}" for b in bad)
    return DataError(
        f"{len(bad)} file(s) are not decodable images:\n{lines}\n"
        "remove or replace them, or set data.bad_files=skip to train without them"
    )


def scan_image_folder(
    root: str | Path, train_dir: str = "train", valid_dir: str = "auto", bad_files: str = "skip", workers: int = 4
) -> ImageFolderData:
    """Scan, validate and label both splits. Raises DataError with every problem a user must fix."""
    listing = list_image_folder(root, train_dir, valid_dir)
    data = scan_listing(listing, bad_files, workers)
    check_usable(listing.classes, listing.train_dir, listing.valid_dir, data.train.labels, len(data.valid))
    return data


def scan_listing(listing: FolderListing, bad_files: str = "skip", workers: int = 4) -> ImageFolderData:
    """Decode-check every candidate file of a listing (any source) and keep the usable ones; with
    `bad_files="error"`, DataError listing every bad file (the listing's own included)."""
    width = len(listing.classes)
    train = _check_split("train", listing.train_dir, listing.train, workers, width)
    valid = _check_split("valid", listing.valid_dir, listing.valid, workers, width)
    if bad_files == "error" and (listing.bad or train.bad or valid.bad):
        raise bad_files_error(listing.bad + train.bad + valid.bad)
    return ImageFolderData(listing.classes, train, valid, listing.multi_label, list(listing.bad), listing.split)


def write_bad_files(bad: list[BadFile], path: str | Path) -> None:
    """`<run dir>/bad_files.txt`: one `path<TAB>reason` line per skipped file (empty when none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{b.path}\t{b.reason}\n" for b in bad))
