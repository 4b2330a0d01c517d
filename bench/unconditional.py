"""Unconditional runs: do the paintings look like digits (or faces) after 20 minutes on a CPU?

Runs the one-machine system (``spiral up``, default ``experiments/tiny-unconditional.yaml``:
no target image, the discriminator's reward alone) for the longest of ``--minutes``, copies the
learner's newest checkpoint at each of those times, stops the run with SIGINT, then scores each
copy (and, when the run keeps one, ``learner.policy_average_decay``, the moving average of its
weights, as a second row "trained M min, averaged"). Score: the Fréchet distance (FID) between
``--samples`` paintings from fresh noise and the 1,000 held-out real digits
(``dataset.holdout``, never trained on), in the feature space of a small MNIST classifier
trained on the training split (``spiral/evaluation/digit_fid.py``; cached after its first training, its
held-out accuracy is reported). Lower is better. The same run measures two references: an
untrained policy (``torch.manual_seed(cfg.seed)`` then ``build_policy``, the same weights as
``bench/learning.py``'s) and real vs real (held-out against as many training digits: the
floor). Goal: a trained policy's distance <= 1/3 of the untrained one's.

For other datasets (the LFW faces of ``tiny-celeba``) there is no classifier: the distance is
between the images themselves, grey and pooled to 8x8, against the training images, a measure
of layout and tone only, with real against real (half the images against the other half) as
its floor.

Writes into ``--out``: ``fid.json``, ``samples-<name>.png`` (the first 64 paintings of each
policy, ``-average`` for averaged weights, and of the real digits), ``curves.png`` and
``critic_curves.png`` (from the run's ``learner.jsonl`` and ``discriminator.jsonl``), the run
itself under ``run/`` and the copied checkpoints ``policy-<M>min.pt``. The last line printed
is ``fid.json``'s content.

Usage::

    python -m bench.unconditional                        # 20 minutes of training, then scoring
    python -m bench.unconditional --minutes 10 20 --out bench/results/unconditional
    python -m bench.unconditional --evaluate 20=bench/results/unconditional/policy-20min.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


from bench.training_run import bench_experiment, train_and_copy
from spiral.config import ExperimentConfig, experiment_path, load_experiment
from spiral.data import ImageDataset, for_experiment
from spiral.evaluation.digit_fid import (ClassifierSettings, TrainedClassifier, features, frechet_distance,
                                        load_or_train_classifier, score_paintings)
from spiral.nets import build_policy
from spiral.nets.policy import SpiralPolicy
from spiral.runtime.checkpoint import load_checkpoint
from spiral.evaluation.sampling import has_average, policy_from_state, sample_policy
from spiral.evaluation.visualize import image_grid, plot_curves, save_png

GOAL_RATIO = 1 / 3
"""A trained policy's distance should be at most this fraction of the untrained policy's."""
GRID = 64
PIXEL_GRID = 8
"""Outside MNIST, images are compared as grey pixels pooled to this many cells a side."""


def pixel_features(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, C]`` uint8 images as grey, average-pooled to ``PIXEL_GRID`` a side, flattened, in [0, 1]."""
    grey = images.astype(np.float64).mean(axis=-1) / 255.0
    n, h, w = grey.shape
    if h % PIXEL_GRID or w % PIXEL_GRID:
        raise ValueError(f"images of {h}x{w} do not pool to {PIXEL_GRID}x{PIXEL_GRID}")
    pooled = grey.reshape(n, PIXEL_GRID, h // PIXEL_GRID, PIXEL_GRID, w // PIXEL_GRID).mean(axis=(2, 4))
    return pooled.reshape(n, -1)


def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir`` and ``--classifier-epochs``: where the digit classifier is cached, and how it trains."""
    parser.add_argument("--cache-dir", default=None,
                        help="where the digit classifier is cached (default: the dataset cache directory)")
    parser.add_argument("--classifier-epochs", type=int, default=ClassifierSettings.epochs,
                        help=f"epochs of the digit classifier (default {ClassifierSettings.epochs}; "
                             "fewer for quick smoke runs)")


def run_experiment(config: str, seed: int | None) -> ExperimentConfig:
    """A finished run's experiment (a name or a YAML path), with its seed set when ``seed`` is given."""
    cfg = load_experiment(experiment_path(config))
    return cfg if seed is None else dataclasses.replace(cfg, seed=seed)


def classifier_and_reference(cfg: ExperimentConfig, dataset: ImageDataset, cache_dir: str | None,
                             epochs: int) -> tuple[TrainedClassifier, np.ndarray]:
    """The cached (or freshly trained) digit classifier of ``dataset``, and its features of the held-out digits."""
    classifier = load_or_train_classifier(dataset, cache_dir=cache_dir or cfg.dataset.resolved_cache_dir(),
                                          settings=ClassifierSettings(epochs=epochs))
    return classifier, features(classifier.model, dataset.holdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-unconditional")
    parser.add_argument("--minutes", type=float, nargs="+", default=[20.0])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", default="bench/results/unconditional")
    parser.add_argument("--samples", type=int, default=1000, help="episodes painted per policy (default 1000)")
    parser.add_argument("--backend", choices=["libmypaint", "fast"], default=None,
                        help="paint backend for training and evaluation (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=None, help="the experiment's seed (default: the file's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one setting of the experiment, as spiral up --set (repeatable)")
    add_classifier_arguments(parser)
    parser.add_argument("--evaluate", nargs="+", metavar="MINUTES=CHECKPOINT",
                        help="only score these checkpoints (e.g. 20=policy-20min.pt), without training")
    args = parser.parse_args()
    if args.samples < 2:
        parser.error("--samples must be >= 2 (a covariance needs two paintings)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, config_arg = bench_experiment(args.config, out, backend=args.backend, seed=args.seed, overrides=args.overrides)
    if cfg.env.conditional:
        parser.error(f"{args.config}: a conditional experiment; this benchmark scores unconditional runs")
    if args.evaluate:
        copies = {float(m): Path(p) for m, p in (item.split("=", 1) for item in args.evaluate)}
        evaluate(cfg, copies, out, args.samples, args.cache_dir, args.classifier_epochs)
        return
    copies = train_and_copy(config_arg, out, args.minutes, args.actors)

    evaluate(cfg, copies, out, args.samples, args.cache_dir, args.classifier_epochs)


def _paint(cfg: ExperimentConfig, policy: SpiralPolicy, samples: int) -> np.ndarray:
    """``samples`` final canvases of ``policy`` from fresh noise (sampled actions, seed 0)."""
    return sample_policy(cfg, policy, samples, seed=0).canvases


def evaluate(cfg: ExperimentConfig, copies: dict[float, Path], out: Path, samples: int = 1000,
             cache_dir: str | None = None, classifier_epochs: int = ClassifierSettings.epochs) -> dict[str, Any]:
    """Score real digits, an untrained policy and each checkpoint against the held-out digits.

    Each policy paints ``samples`` episodes (actions sampled, as the actors act, from seed 0).
    Every row reports ``fid`` (to the held-out digits), ``classes`` (how many paintings the
    classifier assigns to each digit) and ``confidence`` (its mean top-class probability).
    """
    dataset = for_experiment(cfg)
    digits = cfg.dataset.name == "mnist"  # the digit classifier and its goal; elsewhere grey pixels, no goal
    if digits:
        if len(dataset.holdout) < 2:
            raise SystemExit(f"dataset.holdout is {len(dataset.holdout)}: the distance needs held-out real digits")
        classifier, reference = classifier_and_reference(cfg, dataset, cache_dir, classifier_epochs)
        model = classifier.model

        def score(images: np.ndarray) -> dict[str, Any]:
            return score_paintings(model, images, reference)

        results: dict[str, Any] = {
            "classifier": {"holdout_accuracy": classifier.holdout_accuracy, "train_images": classifier.train_images,
                           "train_seconds": classifier.train_seconds, "cache": str(classifier.path),
                           "from_cache": classifier.from_cache},
            "reference": {"holdout_images": len(dataset.holdout), "dataset": cfg.dataset.name,
                          "backend": cfg.env.paint.backend, "features": "digit classifier"},
        }
        real = dataset.images[:len(dataset.holdout)]  # as many training digits as held-out ones
        results["real vs real"] = score(real)
    else:
        # No classifier for this domain: the Fréchet distance of the images themselves, grey and
        # pooled to PIXEL_GRID x PIXEL_GRID. It sees layout and tone (a face's light oval on a
        # dark ground), not features; the pictures are the measure that counts.
        reference = pixel_features(dataset.images)
        half = len(dataset.images) // 2

        def score(images: np.ndarray) -> dict[str, Any]:
            return {"fid": frechet_distance(pixel_features(images), reference), "samples": len(images)}

        results = {"reference": {"train_images": len(dataset.images), "dataset": cfg.dataset.name,
                                 "backend": cfg.env.paint.backend,
                                 "features": f"grey pixels pooled to {PIXEL_GRID}x{PIXEL_GRID}"}}
        real = dataset.images[:GRID]
        results["real vs real"] = {
            "fid": frechet_distance(pixel_features(dataset.images[:half]), pixel_features(dataset.images[half:])),
            "samples": half}
    save_png(image_grid(real[:GRID], columns=8), out / "samples-real.png")

    torch.manual_seed(cfg.seed)  # the same untrained weights in every run (as bench/learning.py)
    untrained = _paint(cfg, build_policy(cfg), samples)
    results["untrained policy"] = score(untrained)
    save_png(image_grid(untrained[:GRID], columns=8), out / "samples-untrained.png")
    untrained_fid = results["untrained policy"]["fid"]

    for minutes, path in sorted(copies.items()):
        version, state = load_checkpoint(path)
        weights = [("", False)] + ([(", averaged", True)] if has_average(state) else [])
        for label, average in weights:
            canvases = _paint(cfg, policy_from_state(cfg, state, average), samples)
            row = score(canvases)
            row.update(version=version, ratio_to_untrained=row["fid"] / untrained_fid if untrained_fid > 0 else None,
                       meets_goal=(bool(untrained_fid > 0 and row["fid"] <= GOAL_RATIO * untrained_fid)
                                   if digits else None))
            results[f"trained {minutes:g} min{label}"] = row
            suffix = "-average" if average else ""
            save_png(image_grid(canvases[:GRID], columns=8), out / f"samples-{minutes:g}min{suffix}.png")
    results["goal"] = (f"trained fid <= {GOAL_RATIO:.3f} x untrained fid" if digits
                       else "none (MNIST's goal; here the samples are shown)")

    run_dir = out / "run"
    if (run_dir / "learner.jsonl").exists():
        plot_curves(run_dir / "learner.jsonl", ["mean_reward", "reward_critic", "paint_fraction", "mean_entropy",
                                                "grad_norm"], out / "curves.png")
    if (run_dir / "discriminator.jsonl").exists():
        plot_curves(run_dir / "discriminator.jsonl", ["d_real", "d_fake", "wasserstein", "level_penalty", "gp"],
                    out / "critic_curves.png")
    (out / "fid.json").write_text(json.dumps(results, indent=2))

    if digits:
        print(f"digit classifier: held-out accuracy {classifier.holdout_accuracy:.4f} "
              f"({classifier.train_images} training digits{', cached' if classifier.from_cache else ''})")
        print(f"Fréchet distance to {len(dataset.holdout)} held-out {cfg.dataset.name} digits, {samples} paintings "
              f"per policy, {cfg.env.paint.backend} renderer (lower is better)")
    else:
        print(f"Fréchet distance of {results['reference']['features']} to the {len(dataset.images)} training "
              f"{cfg.dataset.name} images, {samples} paintings per policy (lower is better; layout and tone only)")
    print(f"  {'':30s} {'FID':>9s}  {'x untrained':>11s}  {'confidence':>10s}")
    for name, row in results.items():
        if not isinstance(row, dict) or "fid" not in row:
            continue
        ratio = f"{row['fid'] / untrained_fid:11.3f}" if untrained_fid > 0 else f"{'-':>11s}"
        verdict = ""
        if name.startswith("trained") and row["meets_goal"] is not None:
            verdict = "  meets goal" if row["meets_goal"] else "  misses goal"
        confidence = f"{row['confidence']:10.3f}" if "confidence" in row else f"{'-':>10s}"
        print(f"  {name:30s} {row['fid']:9.3f}  {ratio}  {confidence}{verdict}")
    print(f"goal: {results['goal']}; pictures: {out}/samples-*.png")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
