"""Scan and validate an image folder once: `root/<train_dir>/<class>/*` and `root/<valid_dir>/<class>/*`.

Classes are train's sub-folders, sorted. Each candidate file is checked at scan time as
`data.verify` says (disttrain/data/verify.py: fully decoded by default, so a zero-byte, truncated
or mislabelled file is found before training starts rather than crashing a worker at hour three),
through a cache that checks again only what changed. Listings and splits hold their paths compactly
(disttrain/data/paths.py): a million files cost tens of MB per rank, not GBs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from disttrain.data.decode import IMAGE_EXTENSIONS
from disttrain.data.paths import Files, PathTable, targets_array
from disttrain.data.verify import verify
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
    """One split (train or valid): paths with their targets into `classes` (an int64 array of
    labels, or a list of tuples of class indices for multi-label data)."""

    name: str
    dir: Path
    paths: PathTable
    labels: np.ndarray | list[tuple[int, ...]]
    bad: list[BadFile] = field(default_factory=list)
    classes: int = 0
    """The number of classes (the width of a multi-label target)."""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def multi_label(self) -> bool:
        return len(self.labels) > 0 and isinstance(self.labels[0], tuple)

    def targets(self) -> np.ndarray:
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


def _image_names(split_dir: Path, class_dir: str):
    """The relative names (`<class>/<sub>/<file>`) of a class folder's image files: a folder's
    files (sorted) before its sub-folders (sorted); hidden ones skipped, links followed."""
    base = len(str(split_dir)) + 1
    for dirpath, dirnames, filenames in os.walk(split_dir / class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        prefix = dirpath[base:] + os.sep
        filenames.sort()
        for name in filenames:
            dot = name.rfind(".")  # as os.path.splitext, which a million calls make slow
            if dot > 0 and name[0] != "." and name[dot:].lower() in IMAGE_EXTENSIONS:
                yield prefix + name


def _list_split(split_dir: Path, classes: list[str]) -> Files:
    """Every candidate image file of a split with its label, classes in order, files sorted."""
    class_dirs = _class_dirs(split_dir)
    labels: list[np.ndarray] = []
    counts = [0]

    def names():
        for label, cls in enumerate(classes):
            if cls in class_dirs:
                before = counts[0]
                for name in _image_names(split_dir, cls):
                    counts[0] += 1
                    yield name
                labels.append(np.full(counts[0] - before, label, dtype=np.int64))

    paths = PathTable.from_names(split_dir, names())
    return Files(paths, np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))


@dataclass
class FolderListing:
    """The structure of a source, checked but not decoded: classes and candidate files (a class
    folder tree here; a labelled flat folder or a drawn split in disttrain/data/source.py)."""

    classes: list[str]
    train_dir: Path
    valid_dir: Path
    train: Files
    """The training candidates, read as (Path, target) pairs."""
    valid: Files
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
    valid = _list_split(valid_path, classes) if valid_dir is not None else Files(PathTable.from_names(valid_path, []), targets_array([]))
    return FolderListing(classes, train_path, valid_path, _list_split(train_path, classes), valid)


def _checked(name: str, split_dir: Path, files: Files, found: dict[int, str], classes: int) -> Split:
    """The split of `files` without those `found` failed the check."""
    if found:
        keep = np.ones(len(files), dtype=bool)
        keep[list(found)] = False
        kept = files.take(keep)
    else:
        kept = files
    bad = [BadFile(files.paths[i], reason) for i, reason in sorted(found.items())]
    return Split(name=name, dir=split_dir, paths=kept.paths, labels=kept.targets, bad=bad, classes=classes)


def check_usable(classes: list[str], train_dir: Path, valid_dir: Path, train_labels, valid_count: int) -> None:
    """Every class has a usable training image and the validation split is not empty (a class
    folder tree's rules; disttrain/data/source.py states a flat folder's)."""
    present = set(np.unique(np.asarray(train_labels, dtype=np.int64)).tolist())
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
    root: str | Path, train_dir: str = "train", valid_dir: str = "auto", bad_files: str = "skip", workers: int = 4,
    verify: str = "full", cache_dir: Path | None = None, use_cache: bool = True,
) -> ImageFolderData:
    """Scan, validate and label both splits. Raises DataError with every problem a user must fix."""
    listing = list_image_folder(root, train_dir, valid_dir)
    data = scan_listing(listing, bad_files, workers, verify, cache_dir, use_cache)
    check_usable(listing.classes, listing.train_dir, listing.valid_dir, data.train.labels, len(data.valid))
    return data


def scan_listing(listing: FolderListing, bad_files: str = "skip", workers: int = 4, verify_level: str = "full",
                 cache_dir: Path | None = None, use_cache: bool = True) -> ImageFolderData:
    """Check every candidate file of a listing (any source) as `verify_level` says (data.verify:
    full | header | off) and keep the usable ones; with `bad_files="error"`, DataError listing every
    bad file (the listing's own included). `use_cache`: read and write each folder's scan cache
    (data.scan_cache; `cache_dir`, the run dir, holds it where the folder cannot be written)."""
    width = len(listing.classes)
    train_paths, valid_paths = listing.train.paths, listing.valid.paths
    if train_paths.root == valid_paths.root and len(valid_paths):  # one folder (a drawn split): one cache
        both = verify(PathTable.concat(train_paths, valid_paths), verify_level, workers, cache_dir, use_cache)
        cut = len(train_paths)
        found_train = {i: r for i, r in both.items() if i < cut}
        found_valid = {i - cut: r for i, r in both.items() if i >= cut}
    else:
        found_train = verify(train_paths, verify_level, workers, cache_dir, use_cache)
        found_valid = verify(valid_paths, verify_level, workers, cache_dir, use_cache)
    train = _checked("train", listing.train_dir, listing.train, found_train, width)
    valid = _checked("valid", listing.valid_dir, listing.valid, found_valid, width)
    if bad_files == "error" and (listing.bad or train.bad or valid.bad):
        raise bad_files_error(listing.bad + train.bad + valid.bad)
    return ImageFolderData(listing.classes, train, valid, listing.multi_label, list(listing.bad), listing.split)


def write_bad_files(bad: list[BadFile], path: str | Path) -> None:
    """`<run dir>/bad_files.txt`: one `path<TAB>reason` line per skipped file (empty when none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{b.path}\t{b.reason}\n" for b in bad))
