"""The digit FID (``spiral/evaluation/digit_fid.py``) and the unconditional benchmark that reports it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.training import PolicyTrainer
from spiral.runtime.checkpoint import checkpoint_version, save_checkpoint
from spiral.config import DatasetConfig, load_experiment
from spiral.data import ImageDataset, load_dataset
from spiral.evaluation.digit_fid import (
    ClassifierSettings,
    features,
    frechet_distance,
    frechet_distance_from_stats,
    load_or_train_classifier,
    predict,
)
from spiral.nets import build_policy

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
UNCONDITIONAL = REPO / "experiments" / "tiny-unconditional.yaml"
FAST = ClassifierSettings(epochs=3, batch_size=16)


# -- the distance ------------------------------------------------------------------------------


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(loc=0.5, size=(150, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) > 1.0


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 3.0, -2.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))  # 5 + (4 + 1 + 0)
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    assert expected == pytest.approx(10.0)


def test_frechet_distance_of_one_dimensional_feature_sets() -> None:
    # [0, 2]: mean 1, unbiased variance 2; [1, 5]: mean 3, variance 8.
    # FD = (1 - 3)^2 + 2 + 8 - 2 * sqrt(16) = 6.
    assert frechet_distance(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])) == pytest.approx(6.0)
    assert frechet_distance(np.array([0.0, 2.0]), np.array([1.0, 5.0])) == pytest.approx(6.0)


def test_frechet_distance_survives_singular_covariances_and_rejects_bad_input() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32))  # fewer samples than dimensions
    a[:, 0] = 0.0  # a dead unit
    distance = frechet_distance(a, b)
    assert np.isfinite(distance) and distance > 0
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :5])


# -- the classifier and its cache --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_mnist() -> ImageDataset:
    """300 real training digits and 200 held-out ones (the project's cached 64x64 MNIST)."""
    full = load_dataset(DatasetConfig(name="mnist", holdout=200))
    assert full.labels is not None and full.holdout_labels is not None
    return ImageDataset(name="mnist", images=full.images[:300], labels=full.labels[:300],
                        holdout=full.holdout, holdout_labels=full.holdout_labels)


def test_classifier_trains_caches_and_reloads(small_mnist: ImageDataset, tmp_path: Path) -> None:
    first = load_or_train_classifier(small_mnist, cache_dir=tmp_path, settings=FAST)
    assert not first.from_cache and first.path is not None and first.path.parent == tmp_path
    assert first.path.is_file() and list(tmp_path.glob(".*tmp*")) == []  # written atomically
    assert first.train_images == 300
    assert 0.3 < first.holdout_accuracy <= 1.0  # 3 epochs on 300 digits: well above chance (0.1)

    feats = features(first.model, small_mnist.holdout[:50])
    assert feats.shape == (50, FAST.feature_dim) and feats.dtype == np.float64
    assert np.isfinite(feats).all()
    probs = predict(first.model, small_mnist.holdout[:50])
    assert probs.shape == (50, 10) and np.allclose(probs.sum(axis=1), 1.0)

    second = load_or_train_classifier(small_mnist, cache_dir=tmp_path, settings=FAST)
    assert second.from_cache and second.path == first.path
    assert second.holdout_accuracy == first.holdout_accuracy
    np.testing.assert_array_equal(features(second.model, small_mnist.holdout[:50]), feats)

    changed = load_or_train_classifier(small_mnist, cache_dir=tmp_path,
                                       settings=ClassifierSettings(epochs=3, batch_size=16, seed=1))
    assert not changed.from_cache and changed.path != first.path
    assert len(list(tmp_path.glob("digit-classifier-*.pt"))) == 2


def test_classifier_cache_is_keyed_by_the_training_data(small_mnist: ImageDataset, tmp_path: Path) -> None:
    subset = ImageDataset(name="mnist", images=small_mnist.images[:100], labels=small_mnist.labels[:100],
                          holdout=small_mnist.holdout[:50], holdout_labels=small_mnist.holdout_labels[:50])
    other = ImageDataset(name="mnist", images=small_mnist.images[100:200], labels=small_mnist.labels[100:200],
                         holdout=small_mnist.holdout[:50], holdout_labels=small_mnist.holdout_labels[:50])
    a = load_or_train_classifier(subset, cache_dir=tmp_path, settings=FAST)
    b = load_or_train_classifier(other, cache_dir=tmp_path, settings=FAST)
    assert not b.from_cache and a.path != b.path
    a.path.write_bytes(b"not a checkpoint")  # a damaged cache file is retrained, not fatal
    again = load_or_train_classifier(subset, cache_dir=tmp_path, settings=FAST)
    assert not again.from_cache and again.holdout_accuracy == a.holdout_accuracy


def test_unlabelled_data_is_refused(small_mnist: ImageDataset, tmp_path: Path) -> None:
    unlabelled = ImageDataset(name="x", images=small_mnist.images[:10], holdout=small_mnist.holdout[:10])
    with pytest.raises(ValueError, match="no labels"):
        load_or_train_classifier(unlabelled, cache_dir=tmp_path)


def test_unconditional_experiment_holds_out_a_thousand_digits() -> None:
    cfg = load_experiment(UNCONDITIONAL)
    assert not cfg.env.conditional and cfg.dataset.holdout == 1000
    assert cfg.learner.reward.temporal_credit and cfg.learner.reward.discriminator_weight == 0.05
    assert cfg.learner.reward.l2_weight == 0


# -- the benchmark -----------------------------------------------------------------------------


def test_unconditional_bench_scores_a_checkpoint_against_both_references(tmp_path: Path) -> None:
    cfg = load_experiment(UNCONDITIONAL, overrides={"learner": {"policy_average_decay": 0.99}})
    torch.manual_seed(1)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    path = save_checkpoint(tmp_path / "learner", 5, {"trainer": trainer.state_dict()})
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bench.unconditional", "--out", str(out), "--samples", "32", "--backend", "fast",
         "--cache-dir", str(tmp_path / "cache"), "--classifier-epochs", "1", "--evaluate", f"20={path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"classifier", "real vs real", "untrained policy", "trained 20 min", "trained 20 min, averaged",
            "goal"} <= set(figures)
    assert 0 < figures["classifier"]["holdout_accuracy"] <= 1
    trained = figures["trained 20 min"]
    assert trained["version"] == 5 and trained["samples"] == 32 and sum(trained["classes"]) == 32
    assert trained["ratio_to_untrained"] == pytest.approx(trained["fid"] / figures["untrained policy"]["fid"])
    assert figures["real vs real"]["fid"] < figures["untrained policy"]["fid"]  # random strokes are no digits
    assert json.loads((out / "fid.json").read_text()) == figures
    for name in ("samples-real.png", "samples-untrained.png", "samples-20min.png", "samples-20min-average.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert "held-out accuracy" in result.stdout and "x untrained" in result.stdout


def test_average_trail_bench_rebuilds_the_learners_average_from_its_checkpoints(tmp_path: Path) -> None:
    decay = 0.9
    cfg = load_experiment(UNCONDITIONAL, overrides={"learner": {"policy_average_decay": decay}})
    torch.manual_seed(2)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    trail = tmp_path / "trail"
    for version in (10, 20, 30):  # three "updates" of the weights, one checkpoint after each
        with torch.no_grad():
            for parameter in trainer.policy.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        trainer.average.update_parameters(trainer.policy)
        save_checkpoint(trail, version, {"trainer": trainer.state_dict()})

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from average_trail import trail_averages
    finally:
        sys.path.remove(str(REPO / "bench"))
    paths = sorted(trail.glob("ckpt-*.pt"))
    assert [checkpoint_version(p) for p in paths] == [10, 20, 30]
    rebuilt, undecayed = trail_averages(paths, [decay, 0.0])  # one checkpoint per update here
    for name, value in trainer.average.module.state_dict().items():
        torch.testing.assert_close(rebuilt[name], value.float())
    for name, value in trainer.policy.state_dict().items():  # decay 0: the last weights
        torch.testing.assert_close(undecayed[name], value.float())

    out = tmp_path / "out" / "trail.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.average_trail", "--config", str(UNCONDITIONAL), "--trail", str(trail),
         "--up-to", "20", "--decays", "0.5", "--samples", "16", "--backend", "fast",
         "--cache-dir", str(tmp_path / "cache"), "--classifier-epochs", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["version"] == 20 and figures["checkpoints"] == 2 and figures["spacing"] == 10
    assert set(figures["rows"]) == {"untrained", "trained", "learner's average", "trail average 0.5"}
    for row in figures["rows"].values():
        assert row["fid"] > 0 and sum(row["classes"]) == 16
    assert figures["rows"]["untrained"]["ratio_to_untrained"] == pytest.approx(1.0)
    assert json.loads(out.read_text()) == figures


def test_rerender_brush_bench_scores_the_same_programs_in_each_brush(tmp_path: Path) -> None:
    cfg = load_experiment(UNCONDITIONAL, overrides={"learner": {"policy_average_decay": 0.9}})
    torch.manual_seed(3)
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    path = save_checkpoint(tmp_path / "learner", 7, {"trainer": trainer.state_dict()})
    out = tmp_path / "out" / "rerender.json"
    command = [sys.executable, "-m", "bench.rerender_brush", "--config", str(UNCONDITIONAL), "--checkpoint", str(path),
               "--samples", "16", "--cache-dir", str(tmp_path / "cache"), "--classifier-epochs", "1",
               "--out", str(out), "--brushes"]
    result = subprocess.run(command + ["classic/dry_brush", "classic/pen"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["version"] == 7 and figures["trained_with"] == "classic/dry_brush"
    assert set(figures["rows"]) == {"untrained", "trained", "averaged"}
    for row in figures["rows"].values():
        assert set(row) == {"classic/dry_brush", "classic/pen"}
        assert all(sum(cell["classes"]) == 16 for cell in row.values())
        assert row["classic/dry_brush"]["fid"] != row["classic/pen"]["fid"]  # other ink, other features
    for brush in ("classic/dry_brush", "classic/pen"):
        assert figures["rows"]["untrained"][brush]["ratio_to_untrained"] == pytest.approx(1.0)
        assert (out.parent / f"rerender-trained-{brush.replace('/', '-')}.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.read_text()) == figures

    missing = subprocess.run(command + ["classic/no_such_brush"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "no brush 'classic/no_such_brush'" in missing.stderr
