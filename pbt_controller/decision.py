"""Population-based training's decision rule: exploit by truncation, explore by perturbation.

Pure functions (no I/O, no clock, no global randomness): every random choice comes from the
``random.Random`` passed in, so the same records, reporter, configuration and seed always give
the same :class:`Decision`.

Concepts (Jaderberg et al. 2017, "Population Based Training of Neural Networks"):

* **Hyperparameters** tuned here are the policy learner's ``learning_rate`` and
  ``entropy_cost`` (:data:`HYPERPARAMETER_NAMES`); each member starts from values sampled
  log-uniformly in the configured ranges (:func:`sample_hyperparameters`).
* **Ready** (:func:`ready`): a member takes part in selection once it has reported and has made
  at least ``ready_updates`` updates since its hyperparameters or weights last changed
  (its start, or its last exploit). An unready reporter always continues.
* **Exploit by truncation** (:func:`decide`): the ``n`` ready, reported members are ranked by
  fitness (higher is better; ties go to the lower member index, so the order is total and
  deterministic). With ``k = max(1, floor(truncation_fraction * n))`` for ``n >= 2`` (and no
  selection at all for ``n < 2``), a reporter among the bottom ``k`` copies a donor chosen
  uniformly from the top ``k``. Because the configuration keeps ``truncation_fraction <= 0.5``,
  ``k <= n / 2`` and the two groups never overlap. A population of one always continues.
* **Explore** (:func:`explore`): the copied hyperparameters are perturbed independently: each is
  resampled log-uniformly from its range with probability ``resample_probability``, otherwise
  multiplied by one of ``perturb_factors`` (default 0.8 or 1.2) chosen uniformly. Results are
  **clipped to the configured range**: the ranges say which values are sane (a learning rate
  far above the range diverges), so repeated ×1.2 steps must not walk out of them. The cost is
  that the search never leaves the ranges; widen them to search further.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from spiral.config import PBTConfig

HYPERPARAMETER_NAMES: tuple[str, ...] = ("learning_rate", "entropy_cost")
"""The hyperparameters PBT tunes, by the names used in reports and directives."""

CONTINUE = "continue"
EXPLOIT = "exploit"


def hyperparameter_ranges(cfg: PBTConfig) -> dict[str, tuple[float, float]]:
    """Name -> (low, high) of every tuned hyperparameter, from the ``pbt`` configuration."""
    return {"learning_rate": (float(cfg.learning_rate_range[0]), float(cfg.learning_rate_range[1])),
            "entropy_cost": (float(cfg.entropy_cost_range[0]), float(cfg.entropy_cost_range[1]))}


@dataclass
class MemberRecord:
    """What the controller knows about one population member.

    Attributes:
        member: Member index (0 .. population_size - 1).
        fitness: Last reported fitness (higher is better); 0 before the first report.
        reported: Whether the member has reported at least once.
        updates: The member's own update count at its last report.
        updates_at_last_change: Its update count when its weights or hyperparameters last
            changed (start, first adoption of its sampled hyperparameters, or an exploit).
        hyperparameters: The hyperparameters the member must train with (the controller's
            truth: sampled at start, replaced by the explored donor's on exploit).
        policy_version: Its policy parameter version at its last report.
        exploits: How many times it copied a donor.
    """

    member: int
    hyperparameters: dict[str, float]
    fitness: float = 0.0
    reported: bool = False
    updates: int = 0
    updates_at_last_change: int = 0
    policy_version: int = 0
    exploits: int = 0


@dataclass(frozen=True)
class Decision:
    """The answer to one report.

    Attributes:
        action: ``"continue"`` or ``"exploit"``.
        donor: Member to copy (exploit only, else None).
        hyperparameters: What the reporter trains with from now on (exploit: the donor's,
            explored; continue: its current ones).
        reason: One sentence for logs.
        donor_hyperparameters: The donor's hyperparameters before exploring (exploit only).
    """

    action: str
    donor: int | None
    hyperparameters: dict[str, float]
    reason: str
    donor_hyperparameters: dict[str, float] = field(default_factory=dict)


def _log_uniform(low: float, high: float, rng: random.Random) -> float:
    if low == high:
        return low
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def sample_hyperparameters(cfg: PBTConfig, rng: random.Random) -> dict[str, float]:
    """Initial hyperparameters of a member: each log-uniform in its configured range."""
    return {name: _log_uniform(low, high, rng) for name, (low, high) in hyperparameter_ranges(cfg).items()}


def explore(hyperparameters: Mapping[str, float], cfg: PBTConfig, rng: random.Random) -> dict[str, float]:
    """Perturb ``hyperparameters``: per name, resample with probability ``resample_probability``,
    else multiply by a factor drawn uniformly from ``perturb_factors``; clip to the range.

    Names outside :data:`HYPERPARAMETER_NAMES` are not tuned and pass through unchanged.
    """
    ranges = hyperparameter_ranges(cfg)
    out: dict[str, float] = {}
    for name in sorted(hyperparameters):
        value = float(hyperparameters[name])
        if name not in ranges:
            out[name] = value
            continue
        low, high = ranges[name]
        if rng.random() < cfg.resample_probability:
            value = _log_uniform(low, high, rng)
        else:
            value = value * float(rng.choice(list(cfg.perturb_factors)))
        out[name] = min(high, max(low, value))
    return out


def ready(record: MemberRecord, cfg: PBTConfig) -> bool:
    """Whether ``record`` takes part in selection: reported, and at least ``ready_updates``
    updates made since its last change."""
    return record.reported and record.updates - record.updates_at_last_change >= cfg.ready_updates


def truncation_size(n: int, fraction: float) -> int:
    """Size ``k`` of the top and bottom groups among ``n`` ranked members.

    ``0`` when ``n < 2`` (nobody to copy from), else ``max(1, floor(fraction * n))`` capped at
    ``n // 2`` so the groups never overlap.
    """
    if n < 2:
        return 0
    return min(n // 2, max(1, math.floor(fraction * n + 1e-9)))


def rank(records: Sequence[MemberRecord]) -> list[MemberRecord]:
    """``records`` best first: by fitness descending, ties by member index ascending."""
    return sorted(records, key=lambda r: (-r.fitness, r.member))


def decide(records: Mapping[int, MemberRecord] | Sequence[MemberRecord], reporter: int, cfg: PBTConfig,
           rng: random.Random) -> Decision:
    """Decide what ``reporter`` does after its report (its record must already hold the report).

    Raises:
        KeyError: ``reporter`` is not among ``records``.
    """
    by_member = dict(records) if isinstance(records, Mapping) else {r.member: r for r in records}
    me = by_member[reporter]
    current = dict(me.hyperparameters)
    if len(by_member) < 2:
        return Decision(CONTINUE, None, current, "population of one")
    if not ready(me, cfg):
        return Decision(CONTINUE, None, current,
                        f"not ready: {me.updates - me.updates_at_last_change} of {cfg.ready_updates} updates "
                        f"since the last change")
    ranked = rank([r for r in by_member.values() if ready(r, cfg)])
    k = truncation_size(len(ranked), cfg.truncation_fraction)
    if k == 0:
        return Decision(CONTINUE, None, current, f"only {len(ranked)} ready member(s)")
    position = [r.member for r in ranked].index(reporter)
    if position < len(ranked) - k:
        return Decision(CONTINUE, None, current,
                        f"rank {position + 1} of {len(ranked)} ready members is above the bottom {k}")
    top = [r for r in ranked[:k] if r.member != reporter]
    donor = top[rng.randrange(len(top))]
    explored = explore(donor.hyperparameters, cfg, rng)
    return Decision(EXPLOIT, donor.member, explored,
                    f"rank {position + 1} of {len(ranked)} (fitness {me.fitness:.6g}) is in the bottom {k}; "
                    f"copying member {donor.member} (fitness {donor.fitness:.6g}) from the top {k}",
                    donor_hyperparameters=dict(donor.hyperparameters))
