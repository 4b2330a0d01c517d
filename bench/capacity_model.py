"""The capacity model: a system's frames/s, policy lag and network bytes for N actors, from measured costs.

Pure arithmetic (measuring the costs and checking the predictions is :mod:`bench.capacity`).
Every process of the system is single-threaded where it spends its CPU (``OMP_NUM_THREADS=1``
in the manifests, one torch thread per role under ``spiral up`` on a small machine), so each
one is described by what it costs per frame:

* an actor spends ``actor_cpu_per_frame`` CPU-seconds per environment step (policy forward,
  render, encoding its unroll and renders, fetching parameters);
* the policy learner spends ``learner_cpu_per_frame`` per frame it trains on (decoding and
  queueing unrolls, the V-trace update, serving parameters);
* the replay buffer spends ``replay_cpu_per_frame`` per frame of renders inserted;
* the discriminator learner spends ``discriminator_cpu_per_frame``: it trains on samples of the
  replay, which its rate limiter (``replay.samples_per_insert``) ties to the renders inserted.
  It never holds the actors back (inserts do not wait on samples): where it lacks CPU it
  samples less, so it competes for shared cores but bounds nothing.

Two placements:

* **quotas** (Kubernetes, and the manifest harness): every pod has its own CPU slice (a CFS
  quota). An actor pod makes ``actor_slice / actor_cpu_per_frame`` frames/s, the learner
  consumes at most ``learner_slice / learner_cpu_per_frame``, and the system makes the smaller
  of N actors' sum and the learner's (or the replay buffer's) ceiling: back-pressure holds the
  actors to what the learner takes;
* **shared cores** (``spiral up`` on one machine): every process competes for the same cores,
  which the kernel shares max-min fairly between runnable threads. The system's frames/s is
  the largest F at which every process's need at F (actors ``F * actor_cpu_per_frame / N``
  each, the learner ``F * learner_cpu_per_frame``, the replay buffer ``F * replay_cpu_per_frame``)
  fits under the fair share's water level, with the discriminator taking its share as well.
  Each process uses at most one core (one thread).

The policy lag (versions) is the learner's updates/s times how old an unroll's parameters are
when it is trained on: half a refresh period on average, plus the unroll's own acting time, plus
its wait in the learner's queue (a full queue once the learner is the bottleneck).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Costs:
    """What one configuration costs on one machine, each figure measured (:mod:`bench.capacity`)."""

    config: str
    actor_cpu_per_frame: float
    """CPU-seconds an actor spends per environment step."""
    learner_cpu_per_frame: float
    """CPU-seconds the policy learner spends per frame it trains on."""
    replay_cpu_per_frame: float
    """CPU-seconds the replay buffer spends per frame the actors make."""
    discriminator_cpu_per_frame: float
    """CPU-seconds the discriminator learner spends per frame the actors make."""
    frames_per_update: int
    """Frames in one policy update's batch (``learner.batch_size * unroll_length``)."""
    frames_per_unroll: int
    """Frames in one actor unroll (``actor.num_envs * episode_length``)."""
    episode_length: int
    """Steps in one episode (an unroll holds ``actor.num_envs`` episodes)."""
    unroll_bytes: int
    """A serialized ``SubmitUnrolls`` request of one unroll."""
    renders_bytes: int
    """A serialized replay ``Insert`` of one unroll's final renders (and targets)."""
    parameter_bytes: int
    """A full ``GetParameters`` answer (every chunk)."""
    parameter_refresh_seconds: float
    """``actor.parameter_refresh_seconds``: how often an actor fetches newer parameters."""
    queue_episodes: int
    """The learner's ingest queue, in episodes: how far actors can run ahead of it."""

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass(frozen=True)
class Quotas:
    """Per-pod CPU slices (cores), as Kubernetes limits give them."""

    actor: float
    learner: float
    discriminator: float
    replay: float


@dataclass(frozen=True)
class SharedCores:
    """Every process on the same ``cores``, shared by the kernel (``spiral up``)."""

    cores: float


@dataclass(frozen=True)
class Prediction:
    actors: int
    frames_per_second: float
    bottleneck: str
    """``actors``, ``learner`` or ``replay``: what holds the frames/s."""
    learner_updates_per_second: float
    policy_lag_versions: float
    bytes_per_second_per_actor: float
    bytes_per_second_total: float


def _fair_shares(demands: dict[str, float], cores: float) -> dict[str, float]:
    """Max-min fair shares of ``cores`` between processes wanting ``demands`` (each at most one core)."""
    shares = {name: 0.0 for name in demands}
    left, wanting = cores, {name: min(demand, 1.0) for name, demand in demands.items()}
    while wanting and left > 1e-12:
        level = left / len(wanting)
        satisfied = {name: want for name, want in wanting.items() if want <= level}
        if not satisfied:
            for name in wanting:
                shares[name] = level
            return shares
        for name, want in satisfied.items():
            shares[name], left = want, left - want
            del wanting[name]
    return shares


def _frames_quotas(costs: Costs, actors: int, quotas: Quotas) -> tuple[float, str]:
    ceilings = {"learner": quotas.learner / costs.learner_cpu_per_frame,  # first: on a tie the learner is full
                "replay": quotas.replay / costs.replay_cpu_per_frame if costs.replay_cpu_per_frame > 0 else math.inf,
                "actors": actors * quotas.actor / costs.actor_cpu_per_frame}
    bottleneck = min(ceilings, key=ceilings.__getitem__)
    return ceilings[bottleneck], bottleneck


def _fits(costs: Costs, actors: int, cores: float, frames: float) -> bool:
    needs = {**{f"actor-{i}": frames * costs.actor_cpu_per_frame / actors for i in range(actors)},
             "learner": frames * costs.learner_cpu_per_frame, "replay": frames * costs.replay_cpu_per_frame}
    if max(needs.values()) > 1.0:
        return False  # one process would need more than its one thread
    shares = _fair_shares({**needs, "discriminator": frames * costs.discriminator_cpu_per_frame}, cores)
    return all(shares[name] >= need * (1 - 1e-9) for name, need in needs.items())


def _frames_shared(costs: Costs, actors: int, shared: SharedCores) -> tuple[float, str]:
    low, high = 0.0, actors / costs.actor_cpu_per_frame  # every actor on a whole core of its own
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _fits(costs, actors, shared.cores, middle) else (low, middle)
    frames = low
    per_process = {"actors": frames * costs.actor_cpu_per_frame / actors, "learner": frames * costs.learner_cpu_per_frame,
                   "replay": frames * costs.replay_cpu_per_frame}
    return frames, max(per_process, key=per_process.__getitem__)


def predict(costs: Costs, actors: int, placement: Quotas | SharedCores) -> Prediction:
    """What ``actors`` actors make under ``placement`` (see the module docstring)."""
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if isinstance(placement, Quotas):
        frames, bottleneck = _frames_quotas(costs, actors, placement)
    else:
        frames, bottleneck = _frames_shared(costs, actors, placement)
    updates = frames / costs.frames_per_update
    per_actor = frames / actors
    unroll_seconds = costs.frames_per_unroll / per_actor if per_actor > 0 else math.inf
    queue_seconds = 0.0
    if bottleneck == "learner":  # the actors run ahead until the queue is full, then wait on it
        queue_seconds = costs.queue_episodes / (frames / costs.episode_length)
    lag = updates * (costs.parameter_refresh_seconds / 2 + unroll_seconds + queue_seconds)
    unrolls_per_actor = per_actor / costs.frames_per_unroll
    bytes_per_actor = (unrolls_per_actor * (costs.unroll_bytes + costs.renders_bytes)
                       + costs.parameter_bytes / costs.parameter_refresh_seconds)
    return Prediction(actors=actors, frames_per_second=frames, bottleneck=bottleneck,
                      learner_updates_per_second=updates, policy_lag_versions=lag,
                      bytes_per_second_per_actor=bytes_per_actor, bytes_per_second_total=bytes_per_actor * actors)


def saturating_actors(costs: Costs, placement: Quotas | SharedCores, most: int = 256) -> int | None:
    """The first actor count at which the actors no longer bound the frames/s (None: not up to ``most``)."""
    for actors in range(1, most + 1):
        if predict(costs, actors, placement).bottleneck != "actors":
            return actors
    return None
