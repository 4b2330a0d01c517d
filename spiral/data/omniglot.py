"""Omniglot handwritten characters (Lake et al., 2015), read from ``dataset.path``.

No registry package ships Omniglot, so the experiment points ``dataset.path`` at a copy of the
official archives. Accepted layouts, tried in this order:

* a directory holding ``images_*.zip`` archives: ``images_background.zip`` and
  ``images_evaluation.zip`` (the full set), or ``images_background_small1.zip`` and
  ``images_background_small2.zip`` (the "minimal" splits). Every archive found is read;
* a single such ``.zip`` file;
* a directory tree of extracted PNGs (``.../<alphabet>/<character>/<drawer>.png``).

Archives can overlap (small1's 2,720 and small2's 3,120 drawings share 1,000, so the two
minimal splits hold 4,840 unique drawings; both are subsets of ``images_background``), so
drawings are deduplicated by the SHA-256 of their pixels. Each drawing is a 105x105 binary
PNG, black strokes on a white background, which is what SPIRAL's canvas looks like; it is
resized to the requested size with Lanczos antialiasing, so thin strokes become grey edges
instead of vanishing.

Order: unique drawings are sorted by ``alphabet/character/file`` and then shuffled with a fixed
seed, so the order never depends on archive layout and the first images (the holdout) span many
alphabets. Labels index the sorted ``alphabet/character`` names.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
from PIL import Image

from spiral.data.cache import DatasetSourceError, PreparedImages, image_to_array

PREPARE_VERSION = 1
"""Bumped whenever the preprocessing below changes, so cached arrays are prepared again."""

ARCHIVE_PATTERN = "images_*.zip"
ORDER_SEED = 0
"""Seed of the fixed shuffle that decides the canonical order (and so the holdout)."""


@dataclass(frozen=True)
class Drawing:
    """One Omniglot drawing: where it came from and its PNG bytes."""

    alphabet: str
    character: str
    file_name: str
    png: bytes

    @property
    def class_name(self) -> str:
        return f"{self.alphabet}/{self.character}"


PATH_HINT = ("set dataset.path (or the SPIRAL_OMNIGLOT_PATH environment variable) to the directory holding "
             "the Omniglot archives (images_background*.zip) or extracted PNGs")


def _resolve(path: str) -> Path:
    if not path:
        raise DatasetSourceError(f"dataset.path is empty: dataset 'omniglot' needs its files; {PATH_HINT}")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DatasetSourceError(f"dataset.path {path!r} does not exist: dataset 'omniglot' needs its files; "
                                 f"{PATH_HINT}")
    return resolved.resolve()


def _archives(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix != ".zip":
            raise DatasetSourceError(f"dataset.path {str(root)!r} is a file but not a .zip archive")
        return [root]
    return sorted(root.glob(ARCHIVE_PATTERN))


def _pngs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png") if p.is_file())


def fingerprint(path: str) -> dict[str, Any]:
    """What identifies the source: the resolved path plus name, size and mtime of every file read."""
    root = _resolve(path)
    files = _archives(root) or _pngs(root)
    if not files:
        raise DatasetSourceError(f"dataset.path {str(root)!r} holds no Omniglot images "
                                 f"({ARCHIVE_PATTERN} archives or PNG files); {PATH_HINT}")
    stats = [(str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns)
             for f in files]
    digest = hashlib.sha256(repr(stats).encode()).hexdigest()
    return {"source": str(root), "files": len(files), "files_digest": digest, "prepare_version": PREPARE_VERSION}


def _drawing(parts: tuple[str, ...], png: bytes, where: str) -> Drawing:
    if len(parts) < 3:
        raise DatasetSourceError(f"{where}: expected <alphabet>/<character>/<file>.png, got {'/'.join(parts)}")
    return Drawing(alphabet=parts[-3], character=parts[-2], file_name=parts[-1], png=png)


def iter_drawings(path: str) -> Iterator[Drawing]:
    """Every drawing under ``dataset.path`` (duplicates included), archives first if any."""
    root = _resolve(path)
    archives = _archives(root)
    if archives:
        for archive in archives:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and info.filename.endswith(".png"):
                        yield _drawing(PurePosixPath(info.filename).parts, zf.read(info), str(archive))
        return
    for png in _pngs(root):
        yield _drawing(png.relative_to(root).parts, png.read_bytes(), str(root))


def unique_drawings(path: str) -> list[tuple[Drawing, np.ndarray]]:
    """Drawings with distinct pixels, each with its ``[105, 105]`` uint8 grayscale pixels, sorted by name."""
    seen: set[bytes] = set()
    unique: list[tuple[Drawing, np.ndarray]] = []
    for drawing in sorted(iter_drawings(path), key=lambda d: (d.class_name, d.file_name)):
        with Image.open(io.BytesIO(drawing.png)) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.uint8)
        digest = hashlib.sha256(pixels.tobytes() + repr(pixels.shape).encode()).digest()
        if digest not in seen:
            seen.add(digest)
            unique.append((drawing, pixels))
    if not unique:
        raise DatasetSourceError(f"dataset.path {path!r} holds no Omniglot PNG drawings")
    return unique


def to_canvas(pixels: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """A grayscale drawing (dark on white) resized with antialiasing to ``[S, S, C]`` uint8."""
    image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.LANCZOS)
    return image_to_array(image, channels)


def prepare(path: str, image_size: int, channels: int, num_images: int = 0) -> PreparedImages:
    """Unique drawings in canonical order (the first ``num_images`` if > 0) with class labels."""
    unique = unique_drawings(path)
    class_names = tuple(sorted({drawing.class_name for drawing, _ in unique}))
    class_index = {name: i for i, name in enumerate(class_names)}
    order = np.random.default_rng(ORDER_SEED).permutation(len(unique))
    if num_images:
        order = order[:num_images]
    images = np.stack([to_canvas(unique[i][1], image_size, channels) for i in order])
    labels = np.array([class_index[unique[i][0].class_name] for i in order], dtype=np.int64)
    return PreparedImages(images=images, labels=labels, label_names=class_names)
