"""A Fréchet distance for "looks like a digit": how close a set of paintings is to real MNIST.

Unconditional runs have no target to reconstruct, so there is no reconstruction error to
report. What they should learn is to paint images that *look like* the real ones. The standard
measure of that is the Fréchet Inception Distance (FID, Heusel et al. 2017): pass both image
sets through a fixed classifier, fit a Gaussian to each set's penultimate-layer features and
measure the Fréchet (2-Wasserstein) distance between the two Gaussians::

    FD = |mu_a - mu_b|^2 + trace(S_a + S_b - 2 (S_a S_b)^(1/2))

Inception-v3 knows nothing about 64x64 pen strokes on white, so here the feature extractor is a
small CNN trained to classify MNIST digits (:class:`DigitClassifier`, as in the
"MNIST FID" of the GAN literature). Its 128-dimensional penultimate layer encodes what
distinguishes one digit from another (loops, bars, slants), which is exactly what a random
scribble lacks. A lower distance is better; two independent samples of real digits set the
floor (not 0: finite samples differ).

The classifier is trained on the experiment's *training* split only, with a fixed seed, and
checked on the held-out split (``dataset.holdout``): the images the distance compares against
are never seen by the classifier, the discriminator or the policy. Training takes seconds on
one core; :func:`load_or_train_classifier` caches the weights (and their held-out accuracy)
next to the dataset cache, under a name keyed by a digest of the training data and the
classifier's settings, so later evaluations load the same network.

Example::

    cfg = load_experiment("experiments/tiny-unconditional.yaml")
    trained = load_or_train_classifier(cfg)            # trains once, then loads the cache
    real = features(trained.model, for_experiment(cfg).holdout)
    fake = features(trained.model, canvases)           # uint8 [N, 64, 64, 1] paintings
    print(frechet_distance(fake, real), trained.holdout_accuracy)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spiral.runtime.atomic import atomic_write_bytes
from spiral.config import DatasetConfig, ExperimentConfig

__all__ = [
    "CLASSIFIER_FORMAT_VERSION",
    "ClassifierSettings",
    "DigitClassifier",
    "TrainedClassifier",
    "accuracy",
    "classifier_cache_path",
    "features",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "load_or_train_classifier",
    "predict",
    "score_paintings",
    "train_classifier",
]

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT_VERSION = 1
"""Version of the network and of the cache file's layout; part of every cache key."""
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything that decides the trained classifier besides its data (all part of the cache key).

    Attributes:
        input_size: Images are average-pooled to this size before the first conv (64 must be a
            multiple of it); 32 keeps a stroke 1-2 px wide and the convs cheap.
        channels: Output channels of the three 3x3 conv blocks (each followed by 2x2 max-pool).
        feature_dim: Width of the penultimate layer: the features the distance is measured in.
        epochs: Passes over the training images.
        batch_size: Images per Adam step.
        learning_rate: Adam learning rate.
        shift: Training augmentation: each image is shifted by up to this many pixels (at
            ``input_size``) in x and y, so the features tolerate an off-centre digit. 0 disables.
        seed: Seed of the initial weights, the batch order and the shifts.
    """

    input_size: int = 32
    channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 2e-3
    shift: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_size < 8 or self.input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8 (three 2x2 pools), got {self.input_size}")
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ValueError(f"channels must be three positive widths, got {self.channels}")
        if self.feature_dim < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("feature_dim, epochs and batch_size must be >= 1")
        if self.learning_rate <= 0 or self.shift < 0:
            raise ValueError("learning_rate must be > 0 and shift >= 0")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the channel tuple as a list)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


class DigitClassifier(nn.Module):
    """A small CNN that classifies digits painted dark on white, with a feature layer.

    Input: uint8 (or float in [0, 255]) ``[N, H, W, 1]`` images as the project stores them.
    They are inverted to ink in [0, 1] (white paper = 0), average-pooled to
    ``settings.input_size``, then pass three conv(3x3)-ReLU-maxpool(2) blocks, a linear
    feature layer with ReLU (:meth:`features`) and a linear layer to the 10 class logits.
    """

    def __init__(self, settings: ClassifierSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or ClassifierSettings()
        c1, c2, c3 = self.settings.channels
        self.convs = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        spatial = self.settings.input_size // 8
        self.feature = nn.Linear(c3 * spatial * spatial, self.settings.feature_dim)
        self.head = nn.Linear(self.settings.feature_dim, NUM_CLASSES)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, H, W, 1]`` pixels in [0, 255] -> ``[N, 1, s, s]`` ink in [0, 1]."""
        if images.ndim != 4 or images.shape[-1] != 1:
            raise ValueError(f"images must be [N, H, W, 1], got {list(images.shape)}")
        ink = 1.0 - images.permute(0, 3, 1, 2).float() / 255.0
        size = self.settings.input_size
        if ink.shape[-1] != size or ink.shape[-2] != size:
            if ink.shape[-1] % size or ink.shape[-2] % size:
                ink = F.interpolate(ink, size=(size, size), mode="area")
            else:
                ink = F.avg_pool2d(ink, (ink.shape[-2] // size, ink.shape[-1] // size))
        return ink

    def embed(self, ink: torch.Tensor) -> torch.Tensor:
        """Prepared ``[N, 1, s, s]`` ink -> ``[N, feature_dim]`` penultimate features."""
        return F.relu(self.feature(self.convs(ink).flatten(1)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, H, W, 1]`` pixels -> ``[N, feature_dim]`` features (the FID space)."""
        return self.embed(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, H, W, 1]`` pixels -> ``[N, 10]`` class logits."""
        return self.head(self.features(images))


@dataclass
class TrainedClassifier:
    """A trained :class:`DigitClassifier` and how well it does.

    Attributes:
        model: The network, in eval mode.
        holdout_accuracy: Fraction of the held-out images it classifies correctly (NaN when
            it was trained without a held-out set).
        train_images: Training images it saw.
        train_seconds: Wall time training took (of the run that trained it, for a cached one).
        path: The cache file it was loaded from or written to (None when not cached).
        from_cache: True when this call loaded an existing cache file.
    """

    model: DigitClassifier
    holdout_accuracy: float
    train_images: int
    train_seconds: float
    path: Path | None = None
    from_cache: bool = False


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"images must be [N, H, W, 1] grayscale, got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images))


def _shifted(ink: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``ink`` rolled by its own random offset in [-shift, shift] (padded with paper)."""
    if shift == 0:
        return ink
    padded = F.pad(ink, (shift, shift, shift, shift))
    n, _, h, w = ink.shape
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    rows = (torch.arange(h)[None, :] + offsets[:, :1])[:, :, None]  # [n, h, 1]
    cols = (torch.arange(w)[None, :] + offsets[:, 1:])[:, None, :]  # [n, 1, w]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray,
                     settings: ClassifierSettings | None = None,
                     holdout_images: np.ndarray | None = None,
                     holdout_labels: np.ndarray | None = None) -> TrainedClassifier:
    """Train a :class:`DigitClassifier` with Adam from a fixed seed.

    The same images, labels and settings give the same weights (on the same torch build and
    thread count). About 15-20 s for 4,000 images and the default 6 epochs on one CPU core.

    Args:
        train_images: uint8 ``[N, H, W, 1]`` training digits (dark on white).
        train_labels: ``[N]`` integer classes in 0..9.
        settings: Network and training settings (default :class:`ClassifierSettings`).
        holdout_images: Optional images never trained on, to measure the accuracy on.
        holdout_labels: Their classes.

    Returns:
        The trained classifier (eval mode) and its held-out accuracy.

    Raises:
        ValueError: malformed images or labels.
    """
    settings = settings or ClassifierSettings()
    images = _as_tensor(train_images)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"train_labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    if len(images) == 0:
        raise ValueError("no training images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}")
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = DigitClassifier(settings)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    steps_per_epoch = (len(images) + settings.batch_size - 1) // settings.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate,
                                                   total_steps=settings.epochs * steps_per_epoch)
    with torch.no_grad():
        ink = model.prepare(images)  # prepared once: pooling 64x64 inputs every epoch is wasted work
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            logits = model.head(model.embed(_shifted(ink[batch], settings.shift, generator)))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    seconds = time.perf_counter() - started
    held_out = float("nan")
    if holdout_images is not None and holdout_labels is not None and len(holdout_images):
        held_out = accuracy(model, holdout_images, holdout_labels)
    log.info("digit classifier: %d images, %d epochs, %.1f s, held-out accuracy %.4f",
             len(images), settings.epochs, seconds, held_out)
    return TrainedClassifier(model=model, holdout_accuracy=held_out, train_images=len(images),
                             train_seconds=seconds)


@torch.no_grad()
def predict(model: DigitClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities ``[N, 10]`` (float64) of uint8 ``[N, H, W, 1]`` images."""
    model.eval()
    tensor = _as_tensor(images)
    out = [F.softmax(model(tensor[i:i + batch_size]), dim=-1) for i in range(0, len(tensor), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, NUM_CLASSES))


def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` whose most likely class is their label."""
    return float((predict(model, images).argmax(axis=1) == np.asarray(labels)).mean())


@torch.no_grad()
def features(model: DigitClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features ``[N, D]`` (float64) of uint8 ``[N, H, W, 1]`` images, batched, no grad."""
    model.eval()
    tensor = _as_tensor(images)
    out = [model.features(tensor[i:i + batch_size]) for i in range(0, len(tensor), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, model.settings.feature_dim))


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


def _digest(settings: ClassifierSettings, train_images: np.ndarray, train_labels: np.ndarray,
            holdout_images: np.ndarray | None, holdout_labels: np.ndarray | None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CLASSIFIER_FORMAT_VERSION, "settings": settings.as_dict(),
                              "torch": torch.__version__.split("+")[0]}, sort_keys=True).encode())
    for array in (train_images, train_labels, holdout_images, holdout_labels):
        if array is None:
            digest.update(b"none")
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def classifier_cache_path(cache_dir: str | Path, digest: str) -> Path:
    """Where the classifier with cache key ``digest`` lives under ``cache_dir``."""
    return Path(cache_dir) / f"digit-classifier-v{CLASSIFIER_FORMAT_VERSION}-{digest[:16]}.pt"


def _read_cache(path: Path, digest: str, settings: ClassifierSettings) -> TrainedClassifier | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("digest") != digest:
            log.warning("%s: cache key mismatch, retraining", path)
            return None
        model = DigitClassifier(settings)
        model.load_state_dict(state["model"])
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is retrained, not fatal
        log.warning("%s: unreadable classifier cache (%s), retraining", path, exc)
        return None
    model.eval()
    return TrainedClassifier(model=model, holdout_accuracy=float(state["holdout_accuracy"]),
                             train_images=int(state["train_images"]), train_seconds=float(state["train_seconds"]),
                             path=path, from_cache=True)


def _write_cache(path: Path, digest: str, trained: TrainedClassifier) -> None:
    buffer = io.BytesIO()
    torch.save({"digest": digest, "settings": trained.model.settings.as_dict(),
                "model": trained.model.state_dict(), "holdout_accuracy": trained.holdout_accuracy,
                "train_images": trained.train_images, "train_seconds": trained.train_seconds}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_or_train_classifier(source: Any, cache_dir: str | Path | None = None,
                             settings: ClassifierSettings | None = None) -> TrainedClassifier:
    """The digit classifier of a dataset: loaded from its cache file, or trained and cached.

    The classifier trains on the dataset's training split (``images``, ``labels``) and is
    scored on its held-out split (``holdout``, ``holdout_labels``), which it never sees. The
    cache file's name carries a digest of both splits, the settings, the network version and
    the torch version, so any change trains a fresh one; the file is written atomically.

    Args:
        source: An :class:`~spiral.config.ExperimentConfig` (its dataset at its image size),
            a :class:`~spiral.config.DatasetConfig` (64x64 grayscale), or an already loaded
            :class:`spiral.data.ImageDataset`.
        cache_dir: Directory of the cache file; default the dataset's cache directory
            (``dataset.cache_dir``, ``$SPIRAL_CACHE`` or ``~/.cache/spiral``).
        settings: Network and training settings (default :class:`ClassifierSettings`).

    Raises:
        ValueError: the dataset has no labels or is not grayscale.
    """
    from spiral.data import ImageDataset, load_dataset

    settings = settings or ClassifierSettings()
    if isinstance(source, ExperimentConfig):
        default_dir = source.dataset.resolved_cache_dir()
        dataset = load_dataset(source)
    elif isinstance(source, DatasetConfig):
        default_dir = source.resolved_cache_dir()
        dataset = load_dataset(source)
    elif isinstance(source, ImageDataset):
        default_dir = DatasetConfig().resolved_cache_dir()
        dataset = source
    else:
        raise TypeError(f"expected an ExperimentConfig, DatasetConfig or ImageDataset, got {type(source).__name__}")
    if dataset.labels is None:
        raise ValueError(f"dataset {dataset.name!r} has no labels to train a digit classifier on")
    if dataset.image_shape[-1] != 1:
        raise ValueError(f"the digit classifier reads grayscale images, dataset {dataset.name!r} has "
                         f"{dataset.image_shape[-1]} channels")
    holdout_labels = dataset.holdout_labels if len(dataset.holdout) else None
    holdout = dataset.holdout if holdout_labels is not None else None
    digest = _digest(settings, dataset.images, dataset.labels, holdout, holdout_labels)
    path = classifier_cache_path(default_dir if cache_dir is None else cache_dir, digest)
    cached = _read_cache(path, digest, settings)
    if cached is not None:
        return cached
    trained = train_classifier(dataset.images, dataset.labels, settings, holdout, holdout_labels)
    _write_cache(path, digest, trained)
    trained.path = path
    return trained


# ---------------------------------------------------------------------------------------------
# The distance
# ---------------------------------------------------------------------------------------------


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``[N, D]`` features (N >= 2)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim == 1:
        feats = feats[:, None]
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {list(feats.shape)}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def _trace_sqrt_product_eigh(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """``trace((S_a S_b)^(1/2))`` via symmetric eigen-decompositions (always real).

    ``S_a S_b`` is similar to ``S_a^(1/2) S_b S_a^(1/2)``, which is symmetric positive
    semi-definite, so the trace is the sum of the square roots of its (clipped) eigenvalues.
    """
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    inner = root_a @ sigma_b @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray,
                                eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians ``N(mu_a, sigma_a)`` and ``N(mu_b, sigma_b)``.

    ``|mu_a - mu_b|^2 + trace(S_a + S_b - 2 (S_a S_b)^(1/2))``. The matrix square root is
    :func:`scipy.linalg.sqrtm`, as in the reference FID code: a singular product (fewer samples
    than dimensions) is retried with ``eps`` added to both diagonals, and the tiny imaginary
    parts round-off leaves are dropped. Should the root come out with a large imaginary part
    anyway, the trace is taken from symmetric eigen-decompositions instead, which is exact for
    positive semi-definite covariances.
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu_a.shape}, {mu_b.shape}; "
                         f"covariances {sigma_a.shape}, {sigma_b.shape}")
    from scipy import linalg

    diff = mu_a - mu_b
    with warnings.catch_warnings():  # singular products are expected (dead ReLU units) and handled below
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(root).all():
            offset = np.eye(len(sigma_a)) * eps
            root = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    trace_root: float
    if np.iscomplexobj(root):
        scale = max(1.0, float(np.abs(np.diagonal(root).real).max(initial=0.0)))
        if np.isfinite(root).all() and np.abs(np.diagonal(root).imag).max(initial=0.0) <= 1e-3 * scale:
            trace_root = float(np.trace(root).real)
        else:
            trace_root = _trace_sqrt_product_eigh(sigma_a, sigma_b)
    elif np.isfinite(root).all():
        trace_root = float(np.trace(root))
    else:
        trace_root = _trace_sqrt_product_eigh(sigma_a, sigma_b)
    distance = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_root)
    return max(distance, 0.0)  # round-off can leave -1e-12 for identical sets


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N_a, D]`` and ``[N_b, D]``.

    0 for identical sets, symmetric in its arguments; lower means the sets are more alike.

    Raises:
        ValueError: fewer than 2 rows in a set, or different feature widths.
    """
    mu_a, sigma_a = gaussian_stats(feats_a)
    mu_b, sigma_b = gaussian_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: {mu_a.shape[0]} and {mu_b.shape[0]}")
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b)


def score_paintings(model: DigitClassifier, images: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How digit-like a set of paintings is, as the benchmarks report it.

    Args:
        model: The digit classifier.
        images: uint8 ``[N, H, W, 1]`` paintings (N >= 2).
        reference: ``features(model, real_digits)``, the held-out digits' features.

    Returns:
        ``fid`` (the Fréchet distance of the paintings' features to ``reference``), ``classes``
        (how many paintings the classifier assigns to each digit), ``confidence`` (its mean
        top-class probability) and ``samples`` (N).
    """
    probs = predict(model, images)
    return {"fid": frechet_distance(features(model, images), reference),
            "classes": np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES).tolist(),
            "confidence": float(probs.max(axis=1).mean()), "samples": len(images)}
