"""The live status line of ``spiral up``, scraped from the services' Prometheus endpoints.

:func:`take_snapshot` reads every process's ``/metrics`` of a
:class:`~spiral.commands.layout.Layout` (:func:`scrape`) into a :class:`StatusSnapshot`;
:func:`format_status` turns two snapshots into one line: environment steps/s, learner and
discriminator updates/s, policy lag, replay fill, and per-member gauges (reward and, in
conditional runs, the reconstruction error; a population shows the mean and the best member),
and, once a learner reached its budget, how many members are done (:func:`all_done` is when
``spiral up`` ends).
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from spiral.commands.layout import Layout

RUN_DONE_METRIC = "spiral_run_done"
"""The gauge a process sets to 1 once its member reached its budget (:mod:`spiral.runtime.budget`)."""
DONE_ROLES = ("learner", "discriminator")
"""The roles that must all be done for the run to be over (actors idle after their learner)."""


def scrape(url: str, timeout: float = 1.0) -> dict[str, float]:
    """Sum every sample of each metric name at a Prometheus endpoint (labels dropped)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL we built
            text = response.read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


@dataclass
class StatusSnapshot:
    """System-wide figures at one moment.

    Attributes:
        time: ``time.monotonic()`` of the scrape.
        totals: Each metric summed over every process (counters: system totals).
        maxima: Each metric's largest per-process value (versions, lag).
        learner_gauges: Per member, the metrics of that member's policy learner process (its
            gauges, e.g. the mean episode reward, belong to that member alone).
        done: Per learner and discriminator process (by name), whether it says it is done
            (``spiral_run_done``; False while it does not answer).
    """

    time: float
    totals: dict[str, float]
    maxima: dict[str, float]
    learner_gauges: dict[int, dict[str, float]] = field(default_factory=dict)
    done: dict[str, bool] = field(default_factory=dict)

    def member_values(self, name: str) -> list[float]:
        """``name`` of each member's learner that reports it, in member order."""
        return [gauges[name] for _, gauges in sorted(self.learner_gauges.items()) if name in gauges]


def take_snapshot(layout: Layout) -> StatusSnapshot:
    totals: dict[str, float] = {}
    maxima: dict[str, float] = {}
    learner_gauges: dict[int, dict[str, float]] = {}
    done: dict[str, bool] = {}
    for spec in layout.processes:
        scraped = scrape(spec.metrics_url)
        if spec.role == "learner" and scraped:
            learner_gauges[spec.member] = scraped
        if spec.role in DONE_ROLES:
            done[spec.name] = scraped.get(RUN_DONE_METRIC, 0.0) >= 1
        for name, value in scraped.items():
            totals[name] = totals.get(name, 0.0) + value
            maxima[name] = max(maxima.get(name, value), value)
    return StatusSnapshot(time.monotonic(), totals, maxima, learner_gauges, done)


def all_done(snapshot: StatusSnapshot) -> bool:
    """Whether every learner and discriminator of the system says it is done (``spiral up`` then ends)."""
    return bool(snapshot.done) and all(snapshot.done.values())


def _per_member(label: str, values: list[float], fmt: str, best: Callable[[Sequence[float]], float]) -> str:
    """``label MEAN`` for one member; ``label MEAN (mean of K, best B)`` for a population."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{label} {mean:{fmt}}"
    return f"{label} {mean:{fmt}} (mean of {len(values)}, best {best(values):{fmt}})"


def format_status(prev: StatusSnapshot, cur: StatusSnapshot, elapsed: float) -> str:
    """One line: rates between two snapshots plus the current gauges.

    Rates are system totals (all members' counters summed); the reward and reconstruction L2
    are per-member gauges, so a population shows their mean over members and the best member.
    """
    dt = max(1e-6, cur.time - prev.time)

    def rate(name: str) -> float:
        return max(0.0, cur.totals.get(name, 0.0) - prev.totals.get(name, 0.0)) / dt

    parts = [
        f"t={elapsed:6.0f}s",
        f"env {rate('spiral_actor_env_steps_total'):7.0f} steps/s",
        f"learner {rate('spiral_learner_updates_total'):5.2f} upd/s (v{cur.maxima.get('spiral_learner_parameter_version', 0):.0f})",
        f"disc {rate('spiral_discriminator_updates_total'):5.2f} upd/s",
        f"lag {cur.maxima.get('spiral_actor_policy_lag_versions', 0):.0f}",
    ]
    capacity = cur.totals.get("spiral_replay_capacity_items", 0.0)
    if capacity:
        parts.append(f"replay {100 * cur.totals.get('spiral_replay_size_items', 0.0) / capacity:3.0f}%")
    rewards = cur.member_values("spiral_learner_episode_reward")
    if rewards:
        parts.append(_per_member("reward", rewards, "+.3f", max))
    l2 = [value for value in cur.member_values("spiral_learner_reconstruction_l2") if value]
    if l2:
        parts.append(_per_member("l2", l2, ".4f", min))
    members_done = cur.member_values(RUN_DONE_METRIC)
    if any(members_done):
        parts.append(f"done {sum(1 for value in members_done if value >= 1)}/{len(cur.learner_gauges)}")
    return " | ".join(parts)
