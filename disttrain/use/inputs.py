"""The files inference reads, and how they are cut into batches and decoded: `disttrain predict`
and `disttrain evaluate` share all of it.

- Listing (once, on the main process, then sent to every rank): files as given, folders searched
  recursively for the suffixes of `--ext` (default `IMAGE_EXTENSIONS`, what the training scan
  takes), hidden files and folders left out, paths sorted by their parts (`list_inputs`); or a
  labelled folder, `<class>/<images>`, labels from the folder names mapped to the model's classes
  (`list_labelled`, with `choose_split` for a folder holding valid/, val/ or test/). A folder is
  walked one directory at a time, its entries sorted by name (files and sub-folders interleaved,
  which is the order of sorting every path by its parts), and the names go straight into a
  `PathTable` (disttrain/data/paths.py: one byte buffer and its end offsets, about 30 bytes a
  file): a million files are listed without a Python object per file, sent to the ranks as two
  arrays, and read by forked decoding workers without copy-on-write growth. Several items on one
  line read as one sequence (`Listing`, a table per folder and per run of files given).
- Batches: batch b is files[b*B:(b+1)*B] whatever the number of processes, and rank r takes a
  contiguous run of whole batches (`rank_batches`; runs differ by at most one batch). So every image
  is computed in the same batch on 1 or N processes (the same floats), and the ranks' results, one
  rank after the other, are in input order.
- Decoding (`batch_loader`): each batch comes as (input indices, uint8 (B, S, S, 3) images or None,
  [(index, reason)] of the files that did not decode). A bad file is left out of its batch, the
  same way on any number of processes; it never raises.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from disttrain.data.decode import IMAGE_EXTENSIONS, load_presized
from disttrain.data.folder import DataError
from disttrain.data.loader import Workers, make_loader
from disttrain.data.paths import PathTable, in_shared_memory

SPLITS = ("valid", "val", "test")
"""The folders `choose_split` looks for, in this order."""


def parse_extensions(text: str | None) -> frozenset[str] | None:
    """`--ext`: comma-separated suffixes (`jpg,.PNG`) -> {".jpg", ".png"}; `*` -> None (every file);
    None -> IMAGE_EXTENSIONS."""
    if text is None:
        return IMAGE_EXTENSIONS
    if text.strip() == "*":
        return None
    suffixes = {"." + part.strip().lower().lstrip(".") for part in text.split(",") if part.strip().lstrip(".")}
    if not suffixes:
        raise DataError(f"--ext {text!r}: no suffix given; e.g. --ext jpg,png (or '*' for every file)")
    return frozenset(suffixes)


def describe_extensions(extensions: frozenset[str] | None) -> str:
    return "every file" if extensions is None else ",".join(sorted(extensions))


class Listing(Sequence):
    """Several `PathTable`s read as one sequence of paths, in order (the items of a `predict` line:
    files as given and folders). Indexing gives str; a slice gives a list."""

    __slots__ = ("tables", "starts")

    def __init__(self, tables: list[PathTable]):
        self.tables = [table for table in tables if len(table)]
        self.starts = np.cumsum([0] + [len(table) for table in self.tables]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"path {index} of {len(self)}")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.tables[part][index - int(self.starts[part])]

    def __iter__(self) -> Iterator[str]:
        for table in self.tables:
            yield from table

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Listing({len(self)} paths in {len(self.tables)} table(s))"


@dataclass
class Inputs:
    """What a job reads: paths (a sequence of str: a `PathTable` or `Listing`, compact for millions
    of files, or a list), their labels for a labelled folder, and how many files of the folders
    searched `--ext` left out."""

    paths: Sequence[str]
    labels: list[int] | list[tuple[int, ...]] | None = None  # multi-label: each image's tag indices
    left_out: int = 0
    folder: str = ""
    """The labelled folder evaluated (list_labelled)."""


def _sorted_entries(folder: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of `folder`'s entries that are not hidden, sorted by name; links are
    followed; a folder that cannot be read has none (as os.walk skips it)."""
    try:
        with os.scandir(folder) as entries:
            found = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                found.append((entry.name, is_dir))
    except OSError:
        return []
    found.sort()
    return found


def _walk(folder: str, prefix: str, extensions: frozenset[str] | None, left_out: list[int]) -> Iterator[str]:
    """The names (`prefix` + the path relative to `folder`) of every file under `folder` whose
    suffix is taken, in the order of their relative path parts (at each folder its entries by name,
    files and sub-folders interleaved; the same as sorting the whole list by parts); each file left
    out by its suffix adds one to `left_out[0]`. Hidden files and folders are skipped; links are
    followed, as the training scan does. One folder's entries are held at a time (a stack of them
    down the current branch), never the whole listing: `PathTable.from_names` takes the names as
    they come."""
    stack = [(folder, prefix, iter(_sorted_entries(folder)))]
    while stack:
        path, rel, entries = stack[-1]
        for name, is_dir in entries:
            if is_dir:
                sub = os.path.join(path, name)
                stack.append((sub, rel + name + os.sep, iter(_sorted_entries(sub))))
                break
            if extensions is not None and os.path.splitext(name)[1].lower() not in extensions:
                left_out[0] += 1
                continue
            yield rel + name
        else:
            stack.pop()


def list_inputs(inputs: list[str], extensions: frozenset[str] | None = IMAGE_EXTENSIONS) -> Inputs:
    """Files as given (whatever their suffix) and the files of folders (recursively, `extensions`
    only), in that order; DataError for a missing path or when nothing is left. One folder: a
    `PathTable` under it; several items: a `Listing` of one table per folder and per run of files."""
    tables: list[PathTable] = []
    given: list[str] = []  # files named on the line: a run of them is one table
    left_out = [0]
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            if given:
                tables.append(PathTable.from_names("", given))
                given = []
            tables.append(PathTable.from_names(str(path), _walk(str(path), "", extensions, left_out)))
        elif path.is_file():
            given.append(str(path))
        else:
            raise DataError(f"{item}: no such file or folder")
    if given:
        tables.append(PathTable.from_names("", given))
    left_out = left_out[0]
    if not sum(len(table) for table in tables):
        other = f" ({left_out} file(s) with other suffixes; --ext takes {describe_extensions(extensions)})" if left_out else ""
        raise DataError(f"no files to predict in {', '.join(inputs)}{other}")
    return Inputs(tables[0] if len(tables) == 1 else Listing(tables), left_out=left_out)


def choose_split(root: str | Path, split: str | None) -> Path:
    """The folder to evaluate: `root/split` when named, else root's valid/, val/ or test/ (the
    first present), else `root` itself (a `<class>/*` folder)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected <class>/<images>, or a folder holding valid/, val/ or test/)")
    if split:
        path = root / split
        if not path.is_dir():
            present = [name for name in SPLITS if (root / name).is_dir()]
            hint = f" ({root} holds {', '.join(present)})" if present else ""
            raise DataError(f"--split {split}: {path} is not a folder{hint}")
        return path
    for name in SPLITS:
        if (root / name).is_dir():
            return root / name
    if (root / "train").is_dir():
        raise DataError(f"{root}: holds train/ but no valid/, val/ or test/ to evaluate; name a folder with --split (e.g. --split train)")
    return root


def list_labelled(folder: Path, classes: list[str], weights: str, extensions: frozenset[str] | None = IMAGE_EXTENSIONS) -> Inputs:
    """The images of `folder/<class>/` (recursively), sorted by path as `list_inputs` sorts a folder,
    labelled by their class folder's index in `classes` (the model's). Files directly in `folder`
    are not labelled and left out. DataError for a class folder the model does not know."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    known = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    if not names:
        raise DataError(f"{folder}: no class folders; expected {folder}/<class>/<images> with the model's classes ({known})")
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise DataError(f"{folder}: class folder(s) {', '.join(unknown)} are not classes of {weights} ({known}); "
                        "remove them, or evaluate a model trained on them")
    index = {name: i for i, name in enumerate(classes)}
    labels, left_out = array("q"), [0]

    def names() -> Iterator[str]:
        for name, is_dir in _sorted_entries(str(folder)):
            if is_dir:
                for found in _walk(str(folder / name), name + os.sep, extensions, left_out):
                    labels.append(index[name])
                    yield found
            elif extensions is not None and os.path.splitext(name)[1].lower() not in extensions:
                left_out[0] += 1

    table = PathTable.from_names(str(folder), names())
    if not len(table):
        raise DataError(f"{folder}: no image files in its class folders (--ext takes {describe_extensions(extensions)})")
    return Inputs(table, labels.tolist(), left_out[0], str(folder))


def share(count: int, world: int, rank: int) -> range:
    """This rank's contiguous part of `count` items (sizes differ by at most one)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def rank_batches(count: int, batch_size: int, world: int, rank: int) -> range:
    """The numbers of this rank's batches: a contiguous run of the ceil(count / batch_size) global
    batches (batch b holds inputs b * batch_size up to (b + 1) * batch_size)."""
    return share(math.ceil(count / batch_size), world, rank)


def _reason(path: str, err: Exception) -> str:
    """One line saying why a file is not an image we can read (no object addresses in it)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError as missing:
        return f"{type(missing).__name__}: {missing.strerror}"
    if isinstance(err, UnidentifiedImageError):
        return "not an image (PIL cannot identify the format)"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class FileImages(Dataset):
    """index -> (index, uint8 (S, S, 3) presized image or None, reason it did not decode)."""

    def __init__(self, paths: Sequence[str], load_size: int):
        self.paths, self.load_size = paths, load_size

    def __len__(self) -> int:
        return len(self.paths)

    def share_paths(self) -> None:
        """The listing in shared memory before the loader's workers start (`make_loader`)."""
        self.paths = in_shared_memory(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            return index, torch.from_numpy(load_presized(path, self.load_size)), ""
        except Exception as err:  # any decoder error means "not an image we can read"
            return index, None, _reason(path, err)


def collate(items):
    """(indices of the images, uint8 (B, S, S, 3) or None when none decoded, [(index, reason)])."""
    good = [(i, img) for i, img, _ in items if img is not None]
    bad = [(i, reason) for i, img, reason in items if img is None]
    images = torch.stack([img for _, img in good]) if good else None
    return [i for i, _ in good], images, bad


class _BatchIndices:
    """The input indices of each of `batches` (a DataLoader batch_sampler)."""

    def __init__(self, batches: range, batch_size: int, count: int):
        self.batches, self.batch_size, self.count = batches, batch_size, count

    def __iter__(self):
        for b in self.batches:
            yield list(range(b * self.batch_size, min(self.count, (b + 1) * self.batch_size)))

    def __len__(self) -> int:
        return len(self.batches)


WORKERS_PAY_OFF = 1000
"""Images a rank must have before its decoding workers pay off: starting one (a fork server that
imports torch and the decoders, disttrain/data/workers.py) costs about 2-3 s on a 2-core machine,
what decoding about 1,000 photos costs; a smaller share is decoded by the rank itself."""


def batch_loader(paths: Sequence[str], batches: range, batch_size: int, load_size: int, workers: Workers, timeout: float,
                 pin_memory: bool = False, pay_off: int = WORKERS_PAY_OFF) -> DataLoader:
    """This rank's batches (`rank_batches`), decoded and presized by `workers.count` processes (0, or
    a share under `pay_off` images: here) on `workers.cores` (the run's planned split), which deliver
    a batch within `timeout` seconds (data.worker_timeout) or the job stops (iterate it through
    `disttrain.data.loader.watched`)."""
    sampler = _BatchIndices(batches, batch_size, len(paths))
    count = 0 if sum(len(batch) for batch in sampler) < pay_off else workers.count
    return make_loader(FileImages(paths, load_size), count, pin_memory, sampler, timeout, collate_fn=collate,
                       worker_cores=workers.cores)
