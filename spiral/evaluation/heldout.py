"""The held-out measure of a domain: one number (and its companions) that says how good a policy is.

Each domain has its own measure, on data that training never sees:

* **conditional runs** (strokes, faces, scenes): the mean L2 reconstruction error on the first
  ``learner.eval_episodes`` of the ``dataset.holdout`` images, with actions sampled as the actors
  act (``l2_sampled``) and with each head's most likely value (``l2_greedy``), and both as a
  multiple of the domain's baseline canvas (``ratio_sampled``, ``ratio_greedy``; the blank
  canvas, the empty floor or the mean-intensity canvas, :func:`~spiral.evaluation.reconstruction.domain_baseline`).
  MNIST adds the share of reconstructions the digit classifier reads as the target's digit
  (``digit_match_*``), scenes the per-placement diagnostics (``placements_*``,
  :mod:`spiral.evaluation.placements`);
* **unconditional MNIST**: the digit-feature distance of ``learner.eval_episodes`` paintings to the
  held-out digits (``digit_fid``, :mod:`spiral.evaluation.digit_fid`), and the classifier's mean
  confidence on them;
* **other unconditional runs** (faces, Omniglot, scenes) have none offline: there is no feature
  network for them. :func:`heldout_measure` then returns a report with no measures and says why.

The learner measures this every ``learner.eval_every_updates`` while it trains
(:mod:`learner.evaluation`); ``bench/learning.py`` scores checkpoints after the fact with the
same pieces (:class:`DomainMeasures`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spiral.config import ExperimentConfig
from spiral.data import ImageDataset
from spiral.envs import action_spec_for
from spiral.evaluation.placements import placement_report
from spiral.evaluation.reconstruction import Reconstruction, domain_baseline, reconstruct
from spiral.nets.policy import SpiralPolicy


class DomainMeasures:
    """The held-out measures beside L2 that a conditional domain has.

    MNIST (with labels): ``digit_match``, the share of reconstructions that the digit classifier
    of :mod:`spiral.evaluation.digit_fid` reads as the target's digit (the classifier is trained
    once and cached). Scenes (with the targets' programs): ``placements``, the per-placement
    diagnostics of :mod:`spiral.evaluation.placements`.

    Args:
        cfg: The experiment.
        dataset: Its dataset; the figures are against its first ``len(reconstruction)`` held-out
            images' labels and programs.
    """

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.classifier = None
        if cfg.dataset.name == "mnist" and dataset.holdout_labels is not None:
            from spiral.evaluation.digit_fid import load_or_train_classifier

            self.classifier = load_or_train_classifier(cfg).model
        self.spec = action_spec_for(cfg)

    def __call__(self, reconstruction: Reconstruction, suffix: str = "") -> dict[str, Any]:
        figures: dict[str, Any] = {}
        count = len(reconstruction.canvases)
        if self.classifier is not None and self.dataset.holdout_labels is not None:
            from spiral.evaluation.digit_fid import accuracy

            figures[f"digit_match{suffix}"] = accuracy(self.classifier, reconstruction.canvases,
                                                       self.dataset.holdout_labels[:count])
        if self.dataset.holdout_programs is not None:
            report = placement_report(self.spec, reconstruction.actions, self.dataset.holdout_programs[:count])
            figures[f"placements{suffix}"] = report.as_dict()
        return figures


@dataclass(frozen=True)
class HeldoutReport:
    """One held-out evaluation.

    Attributes:
        measures: Flat ``{name: value}``: ``l2_sampled``, ``l2_greedy``, ``ratio_sampled``,
            ``ratio_greedy``, ``baseline_l2`` and per domain ``digit_match_sampled`` /
            ``_greedy`` or ``placements_<figure>_sampled`` / ``_greedy`` (conditional runs);
            ``digit_fid`` and ``digit_confidence`` (unconditional MNIST); empty when the domain
            has no measure.
        baseline: The name of the domain's baseline canvas (conditional runs), else None.
        episodes: Episodes painted per measure.
        reason: Why there is no measure (None when there is one).
    """

    measures: dict[str, float] = field(default_factory=dict)
    baseline: str | None = None
    episodes: int = 0
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.reason is None

    @property
    def fitness(self) -> float | None:
        """Minus the sampled held-out L2 (PBT's reconstruction fitness), or None without one."""
        value = self.measures.get("l2_sampled")
        return None if value is None else -float(value)


def no_measure_reason(cfg: ExperimentConfig) -> str | None:
    """Why ``cfg``'s domain has no held-out measure, or None when it has one."""
    if cfg.env.conditional or cfg.dataset.name == "mnist":
        return None
    return (f"unconditional {cfg.dataset.name} has no held-out measure offline: no feature network for its "
            f"images (the digit-feature distance is MNIST's)")


class HeldoutSet:
    """What every evaluation of a run compares against, prepared once (it may train the digit classifier).

    Args:
        cfg: The experiment.
        dataset: Its dataset (``dataset.holdout`` images, labels and programs).
        episodes: Episodes per evaluation (``learner.eval_episodes``; conditional runs use the
            first this many held-out images, at most all of them).

    Raises:
        ValueError: a conditional run without held-out images (``dataset.holdout`` 0), or
            unconditional MNIST without them.
    """

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, episodes: int) -> None:
        self.cfg = cfg
        self.reason = no_measure_reason(cfg)
        self.episodes = int(episodes)
        self.targets: np.ndarray | None = None
        self.baseline: tuple[str, float] | None = None
        self.domain: DomainMeasures | None = None
        self.classifier = None
        self.reference: np.ndarray | None = None
        if self.reason is not None:
            return
        if dataset.holdout is None or not len(dataset.holdout):
            raise ValueError("held-out evaluation needs held-out images (dataset.holdout > 0)")
        if cfg.env.conditional:
            self.targets = dataset.holdout[:self.episodes]
            self.episodes = len(self.targets)
            self.baseline = domain_baseline(cfg, self.targets)
            self.domain = DomainMeasures(cfg, dataset)
        else:
            from spiral.evaluation.digit_fid import features, load_or_train_classifier

            self.classifier = load_or_train_classifier(cfg).model
            self.reference = features(self.classifier, dataset.holdout)


def heldout_measure(cfg: ExperimentConfig, policy: SpiralPolicy, holdout: HeldoutSet, seed: int) -> HeldoutReport:
    """Measure ``policy`` on the held-out set (see the module docstring); pure, but for the time it takes.

    Args:
        cfg: The experiment.
        policy: The policy to measure (a copy: it is put in eval mode).
        holdout: The prepared held-out set (:class:`HeldoutSet`).
        seed: Seed of the environments and of action sampling (``learner.eval_seed``): the same
            seed paints the same episodes with the same weights.
    """
    if holdout.reason is not None:
        return HeldoutReport(reason=holdout.reason)
    if holdout.targets is not None:
        assert holdout.baseline is not None and holdout.domain is not None
        baseline_name, baseline = holdout.baseline
        measures: dict[str, float] = {"baseline_l2": baseline}
        for mode, greedy in (("sampled", False), ("greedy", True)):
            reconstruction = reconstruct(cfg, policy, holdout.targets, seed=seed, greedy=greedy)
            measures[f"l2_{mode}"] = reconstruction.mean_l2
            measures[f"ratio_{mode}"] = reconstruction.mean_l2 / baseline if baseline > 0 else float("nan")
            for name, value in holdout.domain(reconstruction).items():
                if isinstance(value, dict):
                    measures.update({f"{name}_{key}_{mode}": float(v) for key, v in value.items() if key != "episodes"})
                else:
                    measures[f"{name}_{mode}"] = float(value)
        return HeldoutReport(measures=measures, baseline=baseline_name, episodes=holdout.episodes)
    from spiral.evaluation.digit_fid import score_paintings
    from spiral.evaluation.sampling import sample_policy

    assert holdout.classifier is not None and holdout.reference is not None
    paintings = sample_policy(cfg, policy, holdout.episodes, seed=seed).canvases
    scored = score_paintings(holdout.classifier, paintings, holdout.reference)
    return HeldoutReport(measures={"digit_fid": float(scored["fid"]), "digit_confidence": float(scored["confidence"])},
                         episodes=holdout.episodes)
