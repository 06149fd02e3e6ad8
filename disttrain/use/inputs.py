"""The files inference reads, and how they are cut into batches and decoded: `disttrain predict`
and `disttrain evaluate` share all of it.

- Listing (once, on the main process, then sent to every rank): files as given, folders searched
  recursively for the suffixes of `--ext` (default `IMAGE_EXTENSIONS`, what the training scan
  takes), hidden files and folders left out, paths sorted (`list_inputs`); or a labelled folder,
  `<class>/<images>`, labels from the folder names mapped to the model's classes (`list_labelled`,
  with `choose_split` for a folder holding valid/, val/ or test/).
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
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from disttrain.data.decode import IMAGE_EXTENSIONS, load_presized
from disttrain.data.folder import DataError
from disttrain.data.loader import Workers, make_loader

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


@dataclass
class Inputs:
    """What a job reads: paths (str), their labels for a labelled folder, and how many files of the
    folders searched `--ext` left out."""

    paths: list[str]
    labels: list[int] | list[tuple[int, ...]] | None = None  # multi-label: each image's tag indices
    left_out: int = 0
    folder: str = ""
    """The labelled folder evaluated (list_labelled)."""


def _walk(folder: Path, extensions: frozenset[str] | None) -> tuple[list[tuple[tuple[str, ...], str]], int]:
    """((relative path parts, path) of every file under `folder` whose suffix is taken, sorted), and
    the number of files left out by their suffix. Hidden files and folders are skipped; links are
    followed, as the training scan does."""
    found, left_out = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder).parts
        for name in filenames:
            if name.startswith("."):
                continue
            if extensions is not None and os.path.splitext(name)[1].lower() not in extensions:
                left_out += 1
                continue
            found.append(((*rel, name), os.path.join(dirpath, name)))
    found.sort()
    return found, left_out


def list_inputs(inputs: list[str], extensions: frozenset[str] | None = IMAGE_EXTENSIONS) -> Inputs:
    """Files as given (whatever their suffix) and the files of folders (recursively, `extensions`
    only), in that order; DataError for a missing path or when nothing is left."""
    paths: list[str] = []
    left_out = 0
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found, skipped = _walk(path, extensions)
            paths.extend(p for _, p in found)
            left_out += skipped
        elif path.is_file():
            paths.append(str(path))
        else:
            raise DataError(f"{item}: no such file or folder")
    if not paths:
        other = f" ({left_out} file(s) with other suffixes; --ext takes {describe_extensions(extensions)})" if left_out else ""
        raise DataError(f"no files to predict in {', '.join(inputs)}{other}")
    return Inputs(paths, left_out=left_out)


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
    found, left_out = _walk(folder, extensions)
    index = {name: i for i, name in enumerate(classes)}
    labelled = [(path, index[parts[0]]) for parts, path in found if len(parts) > 1]
    if not labelled:
        raise DataError(f"{folder}: no image files in its class folders (--ext takes {describe_extensions(extensions)})")
    return Inputs([p for p, _ in labelled], [label for _, label in labelled], left_out, str(folder))


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

    def __init__(self, paths: list[str], load_size: int):
        self.paths, self.load_size = paths, load_size

    def __len__(self) -> int:
        return len(self.paths)

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


def batch_loader(paths: list[str], batches: range, batch_size: int, load_size: int, workers: Workers, timeout: float,
                 pin_memory: bool = False, pay_off: int = WORKERS_PAY_OFF) -> DataLoader:
    """This rank's batches (`rank_batches`), decoded and presized by `workers.count` processes (0, or
    a share under `pay_off` images: here) on `workers.cores` (the run's planned split), which deliver
    a batch within `timeout` seconds (data.worker_timeout) or the job stops (iterate it through
    `disttrain.data.loader.watched`)."""
    sampler = _BatchIndices(batches, batch_size, len(paths))
    count = 0 if sum(len(batch) for batch in sampler) < pay_off else workers.count
    return make_loader(FileImages(paths, load_size), count, pin_memory, sampler, timeout, collate_fn=collate,
                       worker_cores=workers.cores)
