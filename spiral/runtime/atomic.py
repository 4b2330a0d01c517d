"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Write to a temporary file in the same directory, fsync it, rename it over the target, and
fsync the directory so the rename itself survives a crash. Used for checkpoints, the dataset
cache and the PBT controller's state (this module imports no torch, so light services can use it).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or creation in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this process and thread."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + directory fsync).

    A reader sees the old file or the complete new one, even if the writer is killed midway;
    a failed write leaves no temporary file behind. ``mode``: the file's permission bits
    (default: what the umask gives).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
