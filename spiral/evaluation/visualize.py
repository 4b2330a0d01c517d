"""Pictures a run leaves behind: sample grids (PNG) and training curves (PNG).

Sample grids put each final canvas next to its target in conditional runs (target left,
render right), so a glance shows whether the agent reconstructs. Curves are read from the
JSON-lines logs the learners write.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 2, background: int = 128) -> np.ndarray:
    """Tile ``[N, H, W, C]`` uint8 images into one ``[rows*(H+pad)+pad, ..., C]`` image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), background, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def pair_grid(renders: np.ndarray, targets: np.ndarray | None, columns: int = 8) -> np.ndarray:
    """Grid of renders; with targets, each cell is (target | render) side by side."""
    if targets is None:
        return image_grid(renders, columns)
    pairs = np.concatenate([targets, renders], axis=2)
    return image_grid(pairs, columns)


def save_png(image: np.ndarray, path: str | Path, scale: int = 2) -> Path:
    """Write a uint8 ``[H, W, C]`` image (C = 1 or 3) as PNG, upscaled by ``scale`` (nearest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image[..., 0] if image.shape[-1] == 1 else image
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def plot_curves(jsonl_path: str | Path, keys: list[str], out_path: str | Path, x_key: str = "update") -> Path:
    """Plot ``keys`` from a JSON-lines log against ``x_key`` into a PNG (one panel per key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(jsonl_path).read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        xs = [r[x_key] for r in rows if key in r]
        ys = [r[key] for r in rows if key in r]
        ax.plot(xs, ys)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x_key)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
