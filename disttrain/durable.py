"""Renames that survive a crash of the node, not only of the process: what a new name points at is on
disk before the rename, and the rename is on disk when the call returns. Without the fsyncs, a
filesystem may persist the rename before the data (ext4's delayed allocation, NFS's write-back): after
a power loss the final name then holds an empty or truncated file."""

from __future__ import annotations

import os
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
