"""Prepared image arrays and their on-disk cache.

Turning a dataset's source files (a CSV of MNIST digits, Omniglot zips, a directory of CelebA
JPEGs) into uint8 ``[N, H, W, C]`` arrays takes seconds to minutes, and every service that needs
real images (the discriminator learner, actors in conditional runs, evaluation) would otherwise
repeat it. So each dataset is *prepared* once into a cache file and later loads read that file.

A cache file is an uncompressed ``.npz`` holding ``images``, optionally ``labels`` and
``label_names``, and ``key``: the JSON description of everything that determines the arrays
(dataset name, image size, channels, image count, a fingerprint of the source files or package
version, and the preparation code's version). Its file name carries a digest of that key, so a
change to any of them names a different file and triggers a fresh preparation; a file whose
stored key does not match what was asked for is never used.

Files are written atomically (temporary file in the same directory, fsync, rename, directory
fsync): a reader sees either no file or a complete one, even if the writer is killed. An
advisory lock next to the file keeps many processes that start at once (actors of a fresh
experiment) from all preparing the same dataset: the first prepares, the others wait and load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from PIL import Image

from spiral.runtime.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
"""Version of the file layout below; part of every key."""
CACHE_FILE_MODE = 0o644


class MissingPackageError(RuntimeError):
    """A dataset's images ship inside a Python package that is not installed."""


class DatasetSourceError(FileNotFoundError):
    """A dataset's source files (``dataset.path``) are missing or hold no usable images."""


@dataclass(frozen=True)
class PreparedImages:
    """A dataset in its final form: what a cache file holds.

    Attributes:
        images: ``[N, H, W, C]`` uint8, in the dataset's canonical order (the first images are
            the ones a loader sets aside as holdout).
        labels: ``[N]`` int64 class index per image, or None for unlabelled data.
        label_names: the name of each class index (``labels`` indexes into it), or None.
        programs: ``[N, S, K]`` int64, for generated datasets only (``mujoco-scenes``): the
            program that rendered each image, ``S`` steps of the action spec's ``K`` heads. Kept
            for diagnostics (which placements hit a target object), never as an input or a reward.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] | None = None
    programs: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8 or self.images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, H, W, 1|3], got {self.images.dtype} {self.images.shape}")
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if self.label_names is not None and self.labels is None:
            raise ValueError("label_names given without labels")
        if self.programs is not None and (self.programs.ndim != 3 or len(self.programs) != len(self.images)):
            raise ValueError(f"programs must be [{len(self.images)}, steps, heads], got {self.programs.shape}")


def image_to_array(image: Image.Image, channels: int) -> np.ndarray:
    """A PIL image as uint8 ``[H, W, channels]``: 1 channel is luminance (L), 3 is RGB."""
    if channels == 1:
        return np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None]
    if channels == 3:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def cache_key(parts: Mapping[str, Any]) -> str:
    """Canonical JSON of the key parts (sorted keys), the exact string stored in the file."""
    return json.dumps({"cache_format": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)


def cache_file(cache_dir: Path, name: str, image_size: int, channels: int, key: str) -> Path:
    """Where the arrays for ``key`` live: a readable prefix plus a digest of the whole key."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{name}-{image_size}px-{channels}ch-{digest}.npz"


def write_prepared(path: Path, prepared: PreparedImages, key: str) -> None:
    """Write ``prepared`` to ``path`` atomically (temp file + fsync + rename + directory fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"images": prepared.images, "key": np.array(key)}
    if prepared.labels is not None:
        arrays["labels"] = prepared.labels.astype(np.int64)
    if prepared.label_names is not None:
        arrays["label_names"] = np.array(prepared.label_names, dtype=np.str_)
    if prepared.programs is not None:
        arrays["programs"] = prepared.programs.astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue(), mode=CACHE_FILE_MODE)  # the cache is shared by services


def read_prepared(path: Path, key: str) -> PreparedImages | None:
    """The arrays stored at ``path`` if it exists, is readable and was written for ``key``.

    Returns None (and logs why) for a missing, unreadable or foreign file, so the caller prepares
    afresh instead of failing on a damaged cache.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            stored_key = str(stored["key"])
            if stored_key != key:
                log.warning("cache file %s was written for a different key; preparing again", path)
                return None
            labels = stored["labels"] if "labels" in stored.files else None
            names = tuple(str(n) for n in stored["label_names"]) if "label_names" in stored.files else None
            programs = stored["programs"] if "programs" in stored.files else None
            return PreparedImages(images=stored["images"], labels=labels, label_names=names, programs=programs)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("cache file %s is unreadable (%s); preparing again", path, exc)
        return None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``path`` (created if needed) for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_or_prepare(path: Path, key: str, prepare: Callable[[], PreparedImages]) -> tuple[PreparedImages, bool]:
    """Read the arrays for ``key`` from ``path``, preparing and writing them first if needed.

    Args:
        path: the cache file (see :func:`cache_file`).
        key: the full cache key (see :func:`cache_key`).
        prepare: builds the arrays from the source; called at most once, only on a miss.

    Returns:
        The arrays and whether they came from the cache (False: this call prepared them).
    """
    cached = read_prepared(path, key)
    if cached is not None:
        return cached, True
    with _exclusive_lock(path.with_name(path.name + ".lock")):
        cached = read_prepared(path, key)  # Another process may have prepared it while we waited.
        if cached is not None:
            return cached, True
        prepared = prepare()
        write_prepared(path, prepared, key)
        return prepared, False
