"""Atomic checkpoints: a killed process resumes from the last complete one.

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the final name (rename is atomic on POSIX), and the directory is fsynced so the
rename itself survives a crash. A reader therefore sees either the previous checkpoint or the
new one, never a torn file. Only the newest ``keep`` checkpoints are kept. Functions registered
with :func:`add_checkpoint_listener` are told of each checkpoint once it is complete (the
artifact uploader sends it off the machine, :mod:`spiral.runtime.artifact_uploader`).

Layout: ``DIR/ckpt-<version:012d>.pt``; :func:`latest_checkpoint` picks the highest version
that loads.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch

from spiral.runtime.atomic import atomic_write_bytes

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")
log = logging.getLogger(__name__)

CheckpointListener = Callable[[Path], None]
"""Called with the path of each checkpoint :func:`save_checkpoint` completed, on the writer's thread."""
_listeners: list[CheckpointListener] = []


def add_checkpoint_listener(listener: CheckpointListener) -> None:
    """Call ``listener(path)`` after every checkpoint this process writes (it must return quickly)."""
    _listeners.append(listener)


def remove_checkpoint_listener(listener: CheckpointListener) -> None:
    """Stop calling ``listener``; one never added is ignored."""
    if listener in _listeners:
        _listeners.remove(listener)


def save_checkpoint(directory: Path, version: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Save ``state`` (tensors, numbers, strings, nested dicts) as version ``version``."""
    buffer = io.BytesIO()
    torch.save({"version": int(version), "state": state}, buffer)
    path = Path(directory) / f"ckpt-{int(version):012d}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    for listener in list(_listeners):
        try:
            listener(path)
        except Exception:  # noqa: BLE001 - a listener must never fail the checkpoint it is told of
            log.exception("checkpoint listener %r failed on %s", listener, path)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def checkpoint_version(path: Path) -> int:
    """The version a checkpoint file's name carries (``ckpt-<version>.pt``), without loading it.

    Raises:
        ValueError: the name is not a checkpoint's.
    """
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint file name (ckpt-<12 digits>.pt)")
    return int(match.group(1))


def load_checkpoint(path: Path) -> tuple[int, dict[str, Any]]:
    """``(version, state)`` of one checkpoint file (tensors on the CPU).

    Raises:
        OSError, KeyError, RuntimeError, ValueError: the file is missing or not a checkpoint.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return int(payload["version"]), payload["state"]


def latest_checkpoint(directory: Path) -> tuple[int, dict[str, Any]] | None:
    """``(version, state)`` of the newest checkpoint that loads, or None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - a corrupt file is skipped, the next older one is tried
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
    return None
