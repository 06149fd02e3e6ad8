"""What a scan checks of each listed file (`data.verify`), and the cache of what it found.

| data.verify | per file                                                     | 1M 8x8 PNGs, see docs/scaling.md |
|-------------|--------------------------------------------------------------|----------------------------------|
| `full`      | decoded (JPEGs at reduced DCT scale): truncation is found    | the slowest                      |
| `header`    | not empty; its first bytes are an image format's signature   | a read of 32 bytes               |
|             | with a non-zero size where the header states one             |                                  |
| `off`       | nothing (listed only)                                        | no file opened                   |

Whatever the scan lets through, the loaders still skip and count a file that fails to decode later
(disttrain/data/loader.py): `header` and `off` trade the early, complete list of bad files for the
start-up time.

The cache: one file per listed folder (`.disttrain-scan.npz` in it when writable, else under the
run dir), holding each file's relative name, size, mtime and the strongest check it passed (or why it
failed). A later scan stats every file and checks again only the files whose size or mtime changed,
the new ones, and those checked less strictly than asked; a file's verdict is never taken from
another file. Written through a temporary file and a rename: a kill leaves the old cache or the new.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from disttrain.data.decode import open_image
from disttrain.data.paths import PathTable
from disttrain.durable import replace

LEVELS = {"off": 0, "header": 1, "full": 2}
CACHE_NAME = ".disttrain-scan.npz"
CHUNK = 2048  # files per task of the scan's pool (a task per file would cost more than a header check)
_FORMAT = 1


def check_full(path: str) -> str | None:
    """None if the file decodes as an image, else a short reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        open_image(path, draft_size=32)
    except Exception as err:  # PIL raises many types; every one means "cannot train on this"
        return f"{type(err).__name__}: {err}".strip()
    return None


def _png(head: bytes) -> str | None:
    if len(head) < 24 or head[12:16] != b"IHDR":
        return "PNG without its IHDR header"
    width, height = struct.unpack(">II", head[16:24])
    return None if width and height else f"PNG of size {width}x{height}"


def _gif(head: bytes) -> str | None:
    width, height = struct.unpack("<HH", head[6:10]) if len(head) >= 10 else (0, 0)
    return None if width and height else f"GIF of size {width}x{height}"


_SIGNATURES: tuple[tuple[bytes, Callable[[bytes], str | None] | None], ...] = (
    (b"\xff\xd8\xff", None),  # JPEG
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"GIF87a", _gif),
    (b"GIF89a", _gif),
    (b"BM", None),
    (b"II*\x00", None),  # TIFF, little-endian
    (b"MM\x00*", None),  # TIFF, big-endian
    (b"P1", None), (b"P2", None), (b"P3", None), (b"P4", None), (b"P5", None), (b"P6", None),  # PBM/PGM/PPM
)


def check_header(path: str) -> str | None:
    """None if the file starts as an image does (see the module docstring), else a short reason."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    if not head:
        return "empty file (0 bytes)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    for signature, detail in _SIGNATURES:
        if head.startswith(signature):
            return detail(head) if detail is not None else None
    return f"not an image: starts with {head[:8]!r}"


CHECKS: dict[int, Callable[[str], str | None]] = {LEVELS["header"]: check_header, LEVELS["full"]: check_full}


class ScanCache:
    """The verdicts of one folder's files (relative names), as read from and written to its cache file."""

    def __init__(self, names: PathTable, size: np.ndarray, mtime: np.ndarray, level: np.ndarray, reasons: dict[int, str]):
        self.names, self.size, self.mtime, self.level, self.reasons = names, size, mtime, level, reasons

    @classmethod
    def read(cls, path: Path) -> "ScanCache | None":
        """The cache at `path`, or None when there is none or it cannot be read (it is rebuilt)."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                if int(stored["format"]) != _FORMAT:
                    return None
                names = PathTable("", stored["blob"], stored["ends"])
                reasons = {int(k): v for k, v in json.loads(str(stored["reasons"])).items()}
                return cls(names, stored["size"], stored["mtime"], stored["level"], reasons)
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):  # cut or foreign: rebuilt
            return None

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, format=np.int64(_FORMAT), blob=self.names.blob, ends=self.names.ends, size=self.size,
                     mtime=self.mtime, level=self.level, reasons=np.array(json.dumps({str(k): v for k, v in self.reasons.items()})))
        replace(tmp, path)

    def same_files(self, names: PathTable) -> bool:
        """Whether `names` are this cache's files in its order (the usual restart), compared in place."""
        return (len(names) == len(self.names) and memoryview(names.ends) == memoryview(self.names.ends)
                and memoryview(names.blob) == memoryview(self.names.blob))

    def matches(self, names: PathTable) -> np.ndarray:
        """For each of `names`, its index in this cache (-1: not in it)."""
        index = {name: i for i, name in enumerate(self.names.names())}
        return np.fromiter((index.get(name, -1) for name in names.names()), dtype=np.int64, count=len(names))


def cache_path(folder: str, fallback: Path | None) -> Path | None:
    """Where `folder`'s cache lives: in it when writable, else under `fallback` (the run dir), named
    by the folder's path; None when neither can be written."""
    if os.access(folder, os.W_OK):
        return Path(folder) / CACHE_NAME
    if fallback is None:
        return None
    digest = hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:16]
    return Path(fallback) / "scan-cache" / f"{digest}.npz"


def _stat_chunk(paths: PathTable, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    size = np.full(stop - start, -1, dtype=np.int64)
    mtime = np.zeros(stop - start, dtype=np.int64)
    for i, path in enumerate(paths.span(start, stop)):
        try:
            st = os.stat(path)
        except OSError:
            continue
        size[i], mtime[i] = st.st_size, st.st_mtime_ns
    return size, mtime


def _check_chunk(paths: PathTable, indices: np.ndarray, check: Callable[[str], str | None]) -> dict[int, str]:
    found = {}
    for i in indices.tolist():
        reason = check(paths[i])
        if reason is not None:
            found[i] = reason
    return found


def _chunks(count: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]


def verify(paths: PathTable, verify: str, workers: int, cache_dir: Path | None = None, use_cache: bool = True) -> dict[int, str]:
    """The files of `paths` (all under one folder, `paths.root`) that fail `verify`'s check: {index:
    reason}. With `use_cache`, the folder's cache is read first and written after (see the module
    docstring); `cache_dir`: where the cache goes when the folder is not writable."""
    level = LEVELS[verify]
    if level == 0 or len(paths) == 0:
        return {}
    where = cache_path(paths.root, cache_dir) if use_cache and paths.root else None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        if where is None:
            found: dict[int, str] = {}
            for part in pool.map(lambda span: _check_chunk(paths, np.arange(*span), CHECKS[level]), _chunks(len(paths))):
                found.update(part)
            return found
        stats = list(pool.map(lambda span: _stat_chunk(paths, *span), _chunks(len(paths))))
        size = np.concatenate([s for s, _ in stats]) if stats else np.zeros(0, dtype=np.int64)
        mtime = np.concatenate([m for _, m in stats]) if stats else np.zeros(0, dtype=np.int64)
        names = PathTable("", paths.blob, paths.ends)
        cached = ScanCache.read(where)
        done = np.zeros(len(paths), dtype=bool)
        checked = np.zeros(len(paths), dtype=np.int8)
        found = {}
        unchanged = False
        if cached is not None:
            if cached.same_files(names):  # no index arrays: a million files cost a few vector compares
                same = (cached.size == size) & (cached.mtime == mtime) & (size >= 0)
                level_of = cached.level
                reasons = cached.reasons
                unchanged = bool(same.all())
            else:
                at = cached.matches(names)
                hit = at >= 0
                same = np.zeros(len(paths), dtype=bool)
                same[hit] = (cached.size[at[hit]] == size[hit]) & (cached.mtime[at[hit]] == mtime[hit]) & (size[hit] >= 0)
                level_of = np.where(hit, cached.level[np.maximum(at, 0)], 0).astype(np.int8)
                now_at = np.full(len(cached.names), -1, dtype=np.int64)  # a cached file's index in `names`
                now_at[at[hit]] = np.flatnonzero(hit)
                reasons = {int(now_at[k]): reason for k, reason in cached.reasons.items() if now_at[k] >= 0}
            for i, reason in reasons.items():
                if same[i]:  # failed before, unchanged since: fails again
                    found[i], done[i], checked[i] = reason, True, level_of[i]
            strong = same & ~done & (level_of >= level)
            done |= strong
            checked[strong] = level_of[strong]
        todo = np.flatnonzero(~done)
        spans = [todo[a:b] for a, b in _chunks(len(todo))]
        for part in pool.map(lambda chunk: _check_chunk(paths, chunk, CHECKS[level]), spans):
            found.update(part)
        checked[todo] = level
    if not (unchanged and len(todo) == 0):  # a restart with nothing changed leaves the cache as it is
        _write_cache(where, ScanCache(names, size, mtime, checked, dict(found)))
    return found


def _write_cache(where: Path, cache: ScanCache) -> None:
    """A cache that cannot be written (a full disk, a folder made read-only meanwhile) costs the next
    start its time, never this one's run."""
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        cache.write(where)
    except OSError:
        pass
