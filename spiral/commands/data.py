"""``spiral data``: prepare, describe and picture the real-image datasets.

* ``spiral data prepare NAME`` prepares a dataset into the cache (a no-op when it is cached
  already) and prints the image count, shape, cache file and time taken. Run it once before
  starting services (an init container in Kubernetes) so they start by reading the cache.
* ``spiral data info NAME`` says where the cache file is, whether it exists and, if it does,
  what it holds (splits, shape, pixel statistics, classes). It never prepares.
* ``spiral data grid NAME --out grid.png`` writes a grid of images as PNG (README pictures,
  checking a new dataset path by eye).

Image size, channels, scene layout and seed come from ``--config EXPERIMENT`` when given (as the
services would load the dataset), else from the flags and their defaults; ``--path``,
``--cache-dir``, ``--num-images`` and ``--holdout`` override the experiment's dataset section.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass

import numpy as np

from spiral.config import ConfigError, DatasetConfig, SceneConfig, experiment_path, load_experiment
from spiral.data import (
    DATASET_NAMES,
    DatasetSourceError,
    ImageDataset,
    MissingPackageError,
    cache_path,
    load_dataset,
)

DEFAULT_CHANNELS = {"mnist": 1, "omniglot": 1, "lfw": 1, "celeba": 3, "mujoco-scenes": 3}
"""Channels used without ``--config`` or ``--channels``: colour for colour datasets."""


@dataclass(frozen=True)
class DatasetRequest:
    """Everything :func:`spiral.data.load_dataset` needs, resolved from the command line."""

    dataset: DatasetConfig
    image_size: int
    channels: int
    scene: SceneConfig | None
    seed: int
    use_environment: bool = True
    """Whether $SPIRAL_OMNIGLOT_PATH may override dataset.path (not when --path is given)."""


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=DATASET_NAMES, help="dataset name")
    parser.add_argument("--config", help="experiment name (experiments/NAME.yaml) or YAML path to take "
                                         "image size, channels, scene and seed from")
    parser.add_argument("--path", help="dataset.path: the dataset's files (omniglot, celeba); for omniglot it "
                                       "takes precedence over $SPIRAL_OMNIGLOT_PATH")
    parser.add_argument("--cache-dir", help="dataset.cache_dir (default $SPIRAL_CACHE or ~/.cache/spiral)")
    parser.add_argument("--num-images", type=int, help="dataset.num_images: use at most this many (0 = all)")
    parser.add_argument("--holdout", type=int, help="dataset.holdout: images set aside for evaluation")
    parser.add_argument("--image-size", type=int, help="image height and width (default: experiment's, or 64)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB "
                                                                     "(default: experiment's, or the dataset's)")
    parser.add_argument("--seed", type=int, help="seed of rendered scenes (default: experiment's, or 0)")


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare``, ``info`` and ``grid`` actions and their flags."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="prepare a dataset into the cache")
    _add_dataset_flags(prepare)
    info = actions.add_parser("info", help="show a dataset's cache file and what it holds")
    _add_dataset_flags(info)
    grid = actions.add_parser("grid", help="write a grid of dataset images as PNG")
    _add_dataset_flags(grid)
    grid.add_argument("--out", required=True, help="PNG file to write")
    grid.add_argument("--count", type=int, default=64, help="images in the grid")
    grid.add_argument("--columns", type=int, default=8, help="images per row")
    grid.add_argument("--split", choices=("train", "holdout"), default="train",
                      help="train: a random sample (--sample-seed); holdout: the first holdout images")
    grid.add_argument("--sample-seed", type=int, default=0, help="seed of the random training sample")
    grid.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the PNG")


def resolve_request(args: argparse.Namespace) -> DatasetRequest:
    """Combine ``--config`` (if any) with the explicit flags into one :class:`DatasetRequest`."""
    experiment = load_experiment(experiment_path(args.config)) if args.config else None
    if experiment is not None and experiment.dataset.name == args.name:
        dataset = experiment.dataset
    else:
        dataset = DatasetConfig(name=args.name)
    overrides = {"path": args.path, "cache_dir": args.cache_dir, "num_images": args.num_images,
                 "holdout": args.holdout}
    dataset = dataclasses.replace(dataset, **{k: v for k, v in overrides.items() if v is not None})
    image_size = args.image_size or (experiment.env.image_size if experiment else 64)
    channels = args.channels or (experiment.image_channels if experiment else DEFAULT_CHANNELS[args.name])
    seed = args.seed if args.seed is not None else (experiment.seed if experiment else 0)
    scene = experiment.env.mujoco if experiment else None
    return DatasetRequest(dataset=dataset, image_size=image_size, channels=channels, scene=scene, seed=seed,
                          use_environment=args.path is None)


def _load(request: DatasetRequest) -> ImageDataset:
    return load_dataset(request.dataset, image_size=request.image_size, channels=request.channels,
                        scene=request.scene, seed=request.seed, use_environment=request.use_environment)


def _summary(dataset: ImageDataset) -> str:
    h, w, c = dataset.image_shape
    total = len(dataset.images) + len(dataset.holdout)
    return (f"{total} images ({len(dataset.images)} train + {len(dataset.holdout)} holdout) "
            f"of {h}x{w}x{c} {dataset.images.dtype}")


def _megabytes(dataset: ImageDataset) -> str:
    if dataset.cache_path is None or not dataset.cache_path.exists():
        return "?"
    return f"{dataset.cache_path.stat().st_size / 1e6:.1f} MB"


def _prepare(request: DatasetRequest) -> int:
    start = time.perf_counter()
    dataset = _load(request)
    seconds = time.perf_counter() - start
    verb = "already prepared (cache hit)" if dataset.from_cache else "prepared"
    print(f"{dataset.name}: {verb}: {_summary(dataset)}")
    print(f"  cache file: {dataset.cache_path} ({_megabytes(dataset)})")
    print(f"  time: {seconds:.2f} s")
    return 0


def _info(request: DatasetRequest) -> int:
    path = cache_path(request.dataset, request.image_size, request.channels, request.scene, request.seed,
                      use_environment=request.use_environment)
    print(f"{request.dataset.name}: cache file {path}")
    if not path.exists():
        print(f"  not prepared yet: run `spiral data prepare {request.dataset.name}` with the same flags")
        return 0
    dataset = _load(request)
    pixels = np.concatenate([dataset.holdout, dataset.images]).astype(np.float64)
    print(f"  {_summary(dataset)} ({_megabytes(dataset)})")
    print(f"  pixel mean {pixels.mean():.1f}, std {pixels.std():.1f}, "
          f"dark (< 128) {100 * (pixels < 128).mean():.1f}%")
    if dataset.labels is not None:
        names = dataset.label_names or ()
        print(f"  labelled: {len(np.unique(dataset.labels))} classes in train"
              + (f" of {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""))
    return 0


def _grid(request: DatasetRequest, args: argparse.Namespace) -> int:
    from spiral.evaluation.visualize import image_grid, save_png

    if args.count < 1 or args.columns < 1 or args.scale < 1:
        raise ValueError("--count, --columns and --scale must be >= 1")
    dataset = _load(request)
    if args.split == "holdout":
        if len(dataset.holdout) == 0:
            raise ValueError("the holdout split is empty (dataset.holdout = 0)")
        images = dataset.holdout[:args.count]
    else:
        images = dataset.sample(np.random.default_rng(args.sample_seed), args.count)
    out = save_png(image_grid(images, columns=args.columns), args.out, scale=args.scale)
    print(f"{dataset.name}: wrote {len(images)} {args.split} images to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one ``spiral data`` action; errors in the request print one line and return 2."""
    try:
        request = resolve_request(args)
        if args.action == "prepare":
            return _prepare(request)
        if args.action == "info":
            return _info(request)
        return _grid(request, args)
    except (ConfigError, DatasetSourceError, MissingPackageError, ValueError, FileNotFoundError) as exc:
        print(f"spiral data {args.action}: error: {exc}", file=sys.stderr)
        return 2
