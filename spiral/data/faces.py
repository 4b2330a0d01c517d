"""Face datasets: CelebA (the paper's) from ``dataset.path``, and LFW from scikit-image.

**CelebA** (Liu et al., 2015) is read from a directory of the aligned-and-cropped JPEGs
(``img_align_celeba``, 202,599 images of 178x218); no registry package ships it. Images are
taken in file-name order (the first ``dataset.num_images`` if > 0). Each is centre-cropped to
the square whose side is 140/178 of its shorter side (the 140x140 square around the face
centre for aligned CelebA, common DCGAN practice: it drops most of the background and hair)
and resized to the requested size with Lanczos antialiasing. JPEG decoding uses the decoder's
draft mode (DCT-domain downscaling) whenever the crop stays at least as large as the output,
which makes preparing the full set several times faster.

**LFW** is the stand-in for CelebA in tests and on the CPU profile: scikit-image ships 100
real Labeled Faces in the Wild crops inside its wheel (``skimage.data.lfw_subset()``, 25x25
grayscale; entries 100-199 are non-face patches and are not used). They are scaled up to the
requested size (bicubic); for 3 channels the gray value is replicated, so the images are
colour-typed but gray, which exercises the colour code paths without pretending to colour data.
"""

from __future__ import annotations

import math
import os
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spiral.data.cache import DatasetSourceError, MissingPackageError, PreparedImages, image_to_array

PREPARE_VERSION = 1
"""Bumped whenever the preprocessing below changes, so cached arrays are prepared again."""

CELEBA_CROP_FRACTION = 140 / 178
"""Side of the centre crop as a fraction of the shorter image side (140 px for aligned CelebA)."""
CELEBA_SUBDIR = "img_align_celeba"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

LFW_PACKAGE = "skimage"
LFW_DISTRIBUTION = "scikit-image"
LFW_NUM_FACES = 100


# ---------------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------------


def celeba_directory(path: str) -> Path:
    """The directory of CelebA images: ``dataset.path`` itself or its ``img_align_celeba``."""
    if not path:
        raise DatasetSourceError("dataset.path is empty: dataset 'celeba' needs the directory of aligned "
                                 "CelebA JPEGs (img_align_celeba)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetSourceError(f"dataset.path {path!r} is not a directory: dataset 'celeba' needs the "
                                 "directory of aligned CelebA JPEGs (img_align_celeba)")
    nested = root / CELEBA_SUBDIR
    return (nested if nested.is_dir() else root).resolve()


def celeba_files(path: str, num_images: int = 0) -> list[Path]:
    """Image files in name order, the first ``num_images`` if > 0."""
    directory = celeba_directory(path)
    names = sorted(entry.name for entry in _scan(directory))
    if not names:
        raise DatasetSourceError(f"dataset.path {str(directory)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if num_images:
        names = names[:num_images]
    return [directory / name for name in names]


def _scan(directory: Path) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as entries:
        return [e for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]


def celeba_fingerprint(path: str, num_images: int = 0) -> dict[str, Any]:
    """What identifies the source: the directory, its mtime and the files that will be read."""
    directory = celeba_directory(path)
    files = celeba_files(path, num_images)
    return {"source": str(directory), "dir_mtime_ns": directory.stat().st_mtime_ns, "files": len(files),
            "first": files[0].name, "last": files[-1].name, "prepare_version": PREPARE_VERSION}


def centre_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` centre square of side ``CELEBA_CROP_FRACTION * min(w, h)``."""
    side = max(1, round(min(width, height) * CELEBA_CROP_FRACTION))
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def celeba_image(file: Path, image_size: int, channels: int) -> np.ndarray:
    """One CelebA file centre-cropped and resized to ``[S, S, C]`` uint8."""
    with Image.open(file) as image:
        width, height = image.size
        left, _, right, _ = centre_crop_box(width, height)
        side = right - left
        if image.format == "JPEG" and side > image_size:
            # Decode at the smallest DCT scale that keeps the crop >= image_size pixels.
            factor = image_size / side
            image.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor)))
        image = image.convert("RGB")
        box = centre_crop_box(*image.size)
        face = image.crop(box).resize((image_size, image_size), Image.LANCZOS)
    return image_to_array(face, channels)


def prepare_celeba(path: str, image_size: int, channels: int, num_images: int = 0) -> PreparedImages:
    """The first ``num_images`` (0 = all) CelebA images, cropped and resized; no labels."""
    files = celeba_files(path, num_images)
    images = np.empty((len(files), image_size, image_size, channels), np.uint8)
    for i, file in enumerate(files):
        try:
            images[i] = celeba_image(file, image_size, channels)
        except OSError as exc:
            raise DatasetSourceError(f"dataset.path: cannot read image {file}: {exc}") from exc
    return PreparedImages(images=images)


# ---------------------------------------------------------------------------------------------
# LFW (scikit-image)
# ---------------------------------------------------------------------------------------------


def _require_scikit_image() -> None:
    if find_spec(LFW_PACKAGE) is None:
        raise MissingPackageError(
            f"dataset 'lfw' reads the {LFW_NUM_FACES} LFW faces shipped in the '{LFW_DISTRIBUTION}' package, "
            f"which is not installed; install it with: pip install {LFW_DISTRIBUTION} (or pip install -e '.[data]')")


def lfw_fingerprint() -> dict[str, Any]:
    """What identifies the source: the scikit-image version."""
    _require_scikit_image()
    try:
        package_version = version(LFW_DISTRIBUTION)
    except PackageNotFoundError:
        package_version = "unknown"
    return {"source": f"{LFW_DISTRIBUTION} lfw_subset", "package_version": package_version,
            "prepare_version": PREPARE_VERSION}


def lfw_faces() -> np.ndarray:
    """The 100 LFW faces as float ``[100, 25, 25]`` in [0, 1] (1 = white)."""
    _require_scikit_image()
    from skimage import data as skimage_data

    faces = np.asarray(skimage_data.lfw_subset()[:LFW_NUM_FACES], dtype=np.float64)
    if faces.ndim != 3 or len(faces) != LFW_NUM_FACES:
        raise ValueError(f"skimage.data.lfw_subset() returned an unexpected shape {faces.shape}")
    return faces


def prepare_lfw(image_size: int, channels: int, num_images: int = 0) -> PreparedImages:
    """The LFW faces (the first ``num_images`` if > 0) scaled up to ``[N, S, S, C]`` uint8."""
    faces = lfw_faces()
    if num_images:
        faces = faces[:num_images]
    gray = np.clip(np.rint(faces * 255.0), 0, 255).astype(np.uint8)
    images = np.stack([
        image_to_array(Image.fromarray(face, mode="L").resize((image_size, image_size), Image.BICUBIC), channels)
        for face in gray])
    return PreparedImages(images=images)
