"""A listing of a million files held compactly: `PathTable` keeps paths as one byte buffer and an
array of end offsets under a common root (about 30 bytes a file for ImageNet's names, against about
150 for a Python list of str and 300 for one of Path), and pickles as two arrays (what the main
process broadcasts to the other ranks). Loader workers start from a fork server and receive their
dataset pickled: `share_memory()` moves a table's arrays into shared memory first, so each worker
gets a handle to them, not a copy (disttrain/data/loader.py's `make_loader` does it).

`Files` pairs a PathTable with the targets (an int array, or a list of tag tuples for multi-label
data) and reads as the sequence of `(Path, target)` pairs a listing's users iterate.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

_ENCODING, _ERRORS = "utf-8", "surrogateescape"  # any name the filesystem holds round-trips
_CHUNK = 65536  # names encoded at a time


def _encode(text: str) -> bytes:
    return text.encode(_ENCODING, _ERRORS)


class PathTable(Sequence):
    """Paths `root/<relative>` as one uint8 buffer of the relative names and their end offsets.
    Indexing gives str; iteration gives every path in order."""

    __slots__ = ("root", "blob", "ends")

    def __init__(self, root: str, blob: np.ndarray, ends: np.ndarray):
        self.root = root
        """The common prefix (a folder, without a trailing separator), or "" for absolute names."""
        self.blob = blob
        self.ends = ends

    @classmethod
    def from_names(cls, root: str | Path, names: Iterable[str]) -> "PathTable":
        """`names` relative to `root` (one buffer; a generator is consumed once, a chunk at a time)."""
        parts: list[bytes] = []
        lengths: list[np.ndarray] = []
        items = iter(names)
        for chunk in iter(lambda: list(itertools.islice(items, _CHUNK)), []):
            data = "".join(chunk).encode(_ENCODING, _ERRORS)
            sizes = np.fromiter(map(len, chunk), dtype=np.int64, count=len(chunk))
            if len(data) != int(sizes.sum()):  # some name is not ASCII: its bytes outnumber its characters
                sizes = np.fromiter((len(_encode(name)) for name in chunk), dtype=np.int64, count=len(chunk))
            parts.append(data)
            lengths.append(sizes)
        root = str(root)
        return cls(root.rstrip(os.sep) if root not in ("", os.sep) else root, np.frombuffer(b"".join(parts), dtype=np.uint8),
                   np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, dtype=np.int64))

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path], root: str | Path | None = None) -> "PathTable":
        """Full paths, held relative to `root` when every one lies under it, else whole."""
        paths = [str(p) for p in paths]
        if root is not None:
            prefix = str(root).rstrip(os.sep) + os.sep
            if all(p.startswith(prefix) for p in paths):
                return cls.from_names(str(root), (p[len(prefix):] for p in paths))
        return cls.from_names("", paths)

    def __len__(self) -> int:
        return len(self.ends)

    def name(self, index: int) -> str:
        """The path relative to `root`."""
        start = int(self.ends[index - 1]) if index > 0 else 0
        return self.blob[start:int(self.ends[index])].tobytes().decode(_ENCODING, _ERRORS)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"path {index} of {len(self)}")
        name = self.name(index)
        return os.path.join(self.root, name) if self.root else name

    def __iter__(self) -> Iterator[str]:
        return self.span(0, len(self))

    def span(self, first: int, stop: int, relative: bool = False) -> Iterator[str]:
        """The paths `first` to `stop` - 1 (relative to `root` with `relative`), in order: one decode
        per path, no per-path lookup."""
        begin = int(self.ends[first - 1]) if first > 0 else 0
        data = self.blob[begin:int(self.ends[stop - 1]) if stop > first else begin].tobytes()
        prefix = "" if relative or not self.root else self.root if self.root == os.sep else self.root + os.sep
        start = 0
        for end in (self.ends[first:stop] - begin).tolist():
            yield prefix + data[start:end].decode(_ENCODING, _ERRORS)
            start = end

    def names(self) -> Iterator[str]:
        """Every path relative to `root`, in order."""
        return self.span(0, len(self), relative=True)

    def take(self, indices) -> "PathTable":
        """The paths at `indices` (a boolean mask, or increasing indices), in order, under the same root:
        one byte mask over the buffer (a byte per byte of the names), no index arrays 8x its size."""
        chosen = np.asarray(indices)
        if chosen.dtype != bool:
            if chosen.size > 1 and not bool(np.all(chosen[1:] > chosen[:-1])):
                raise ValueError("PathTable.take keeps the table's order: give a mask or increasing indices")
            keep = np.zeros(len(self), dtype=bool)
            keep[chosen.astype(np.int64)] = True
            chosen = keep
        lengths = np.diff(self.ends, prepend=0)
        return PathTable(self.root, self.blob[np.repeat(chosen, lengths)], np.cumsum(lengths[chosen]))

    @classmethod
    def concat(cls, first: "PathTable", second: "PathTable") -> "PathTable":
        """`first`'s paths then `second`'s (both under the same root)."""
        if first.root != second.root:
            raise ValueError(f"cannot join paths under {first.root!r} and {second.root!r}")
        shift = first.ends[-1] if len(first.ends) else 0
        return cls(first.root, np.concatenate([first.blob, second.blob]), np.concatenate([first.ends, second.ends + shift]))

    def nbytes(self) -> int:
        """What the table holds in memory (its two arrays)."""
        return self.blob.nbytes + self.ends.nbytes

    def __eq__(self, other) -> bool:
        if not isinstance(other, PathTable):
            return NotImplemented
        if self.root == other.root:
            return np.array_equal(self.ends, other.ends) and np.array_equal(self.blob, other.blob)
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"PathTable({len(self)} paths under {self.root or '/'!r}, {self.nbytes()} bytes)"

    def share_memory(self) -> "PathTable":
        """This table with its arrays in shared memory (itself when they are there already): pickled
        to a process started from the fork server, it sends handles to them, not a copy."""
        if isinstance(self, _SharedPathTable):
            return self
        blob = torch.empty(len(self.blob), dtype=torch.uint8).share_memory_()
        ends = torch.empty(len(self.ends), dtype=torch.int64).share_memory_()
        blob.numpy()[:] = self.blob
        ends.numpy()[:] = self.ends
        return _SharedPathTable(self.root, blob, ends)


class _SharedPathTable(PathTable):
    """A PathTable whose arrays are views of shared-memory tensors, pickled as those tensors."""

    __slots__ = ("tensors",)

    def __init__(self, root: str, blob: torch.Tensor, ends: torch.Tensor):
        super().__init__(root, blob.numpy(), ends.numpy())
        self.tensors = (blob, ends)

    def __reduce__(self):
        return _SharedPathTable, (self.root, *self.tensors)


class Files(Sequence):
    """A listing part: paths with their targets, read as `(Path, target)` pairs. Single-label
    targets are an int64 array; multi-label ones a list of tag-index tuples."""

    __slots__ = ("paths", "targets")

    def __init__(self, paths: PathTable, targets):
        self.paths = paths
        self.targets = targets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        return Path(self.paths[index]), _target(self.targets[index])

    def __iter__(self):
        for path, target in zip(self.paths, self.targets):
            yield Path(path), _target(target)

    def __eq__(self, other) -> bool:
        if isinstance(other, (Files, list)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __add__(self, other) -> list:
        """The pairs of both, as a list (a listing's train + valid, for a look at all of them)."""
        return [*self, *other]

    def take(self, indices) -> "Files":
        indices = _indices(indices)
        if isinstance(self.targets, np.ndarray):
            targets = self.targets[indices]
        else:
            targets = [self.targets[i] for i in indices.tolist()]
        return Files(self.paths.take(indices), targets)

    def labels(self) -> list:
        """The targets as Python values (ints or tuples)."""
        return self.targets.tolist() if isinstance(self.targets, np.ndarray) else list(self.targets)


def _indices(indices) -> np.ndarray:
    indices = np.asarray(indices)
    return np.flatnonzero(indices) if indices.dtype == bool else indices.astype(np.int64, copy=False)


def _target(value):
    return int(value) if isinstance(value, np.integer) else value


def targets_array(targets: Sequence) -> np.ndarray | list:
    """Int targets as one int64 array; tag tuples (multi-label) stay a list."""
    if len(targets) and isinstance(targets[0], tuple):
        return list(targets)
    return np.asarray(targets, dtype=np.int64)


def in_shared_memory(paths):
    """A PathTable's listing moved to shared memory (`PathTable.share_memory`); any other sequence
    of paths as it is."""
    return paths.share_memory() if isinstance(paths, PathTable) else paths
