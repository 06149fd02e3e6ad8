"""Files that survive a crash of the node, not only of the process, and records that are set aside,
never deleted.

Renames: what a new name points at is on disk before the rename, and the rename is on disk when the
call returns. Without the fsyncs, a filesystem may persist the rename before the data (ext4's
delayed allocation, NFS's write-back): after a power loss the final name then holds an empty or
truncated file."""

from __future__ import annotations

import os
import time
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: str | Path, dst: str | Path) -> None:
    """`os.replace(src, dst)` with `src` (a file, or a directory whose files are synced already)
    flushed first and the rename flushed after (dst's folder)."""
    fsync(src)
    os.replace(src, dst)
    fsync(Path(dst).parent)


def write_text(path: str | Path, text: str) -> None:
    """`text` into `path` through a temporary file, synced, then renamed over it: a kill leaves the
    old file or the new one, never a cut one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    replace(tmp, path)


def superseded_folder(parent: str | Path) -> Path:
    """A new, empty `parent/superseded-<UTC time>/` (`-1`, `-2`, ... within one second) for what a run
    does not continue: moved there, nothing is deleted."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = Path(parent) / f"superseded-{stamp}"
    for n in range(1, 1000):
        if not aside.exists():
            break
        aside = Path(parent) / f"superseded-{stamp}-{n}"
    aside.mkdir()
    return aside
