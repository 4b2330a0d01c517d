"""``spiral render``: re-execute a program JSON on a backend and write the canvas as PNG.

Usage::

    spiral render PROGRAM.json --out canvas.png [--backend libmypaint|fast] [--svg out.svg]

The program is the JSON of :mod:`spiral.envs.programs` (an agent's episode, or hand-written).
Paint programs run on the backend named by ``--backend`` (default: the program's
``env.paint.backend``); scene programs run on MuJoCo. ``--svg`` also writes the program as
SVG. Exit status: 0 on success, 2 when the program file is missing or malformed (the message
names the file and the offending entry), 1 when the renderer fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``spiral render``'s arguments."""
    parser.add_argument("program", metavar="PROGRAM.json", help="program JSON file to execute")
    parser.add_argument("--backend", choices=("libmypaint", "fast"), default=None,
                        help="paint renderer (default: the program's env.paint.backend)")
    parser.add_argument("--out", required=True, metavar="CANVAS.png", help="where to write the final canvas")
    parser.add_argument("--svg", default=None, metavar="OUT.svg", help="also write the program as SVG")


def run(args: argparse.Namespace) -> int:
    """Execute the program and write the outputs; returns the exit status."""
    from spiral.envs.programs import execute, load_program, to_svg

    path = Path(args.program)
    try:
        program = load_program(path)
    except FileNotFoundError:
        return _fail(2, f"{path}: no such file")
    except IsADirectoryError:
        return _fail(2, f"{path}: is a directory, not a program JSON file")
    except UnicodeDecodeError:
        return _fail(2, f"{path}: not a text file (expected program JSON)")
    except ValueError as exc:
        return _fail(2, f"{path}: malformed program: {exc}")
    try:
        canvas = execute(program, backend=args.backend)
    except ValueError as exc:
        return _fail(2, f"{path}: {exc}")
    except (OSError, RuntimeError) as exc:
        return _fail(1, f"{path}: rendering failed: {exc}")
    write_png(canvas, args.out)
    if args.svg:
        Path(args.svg).write_text(to_svg(program))
    height, width, channels = canvas.shape
    outputs = f"{args.out}" + (f" and {args.svg}" if args.svg else "")
    print(f"rendered {len(program.steps)} steps ({program.kind}, {width}x{height}x{channels}) to {outputs}")
    return 0


def write_png(canvas: np.ndarray, path: str | Path) -> None:
    """Write a ``[H, W, 1]`` (grayscale) or ``[H, W, 3]`` (RGB) uint8 canvas as a lossless PNG."""
    from PIL import Image

    canvas = np.asarray(canvas)
    if canvas.dtype != np.uint8 or canvas.ndim != 3 or canvas.shape[2] not in (1, 3):
        raise ValueError(f"canvas must be uint8 [H, W, 1] or [H, W, 3], got {canvas.dtype} {canvas.shape}")
    image = Image.fromarray(canvas[..., 0] if canvas.shape[2] == 1 else canvas)  # L or RGB
    image.save(path, format="PNG")


def _fail(status: int, message: str) -> int:
    print(f"spiral render: error: {message}", file=sys.stderr)
    return status
