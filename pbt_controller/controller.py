"""The controller's logic: a population's records, its reports and decisions, its actors.

:class:`Controller` is what the gRPC servicer (:mod:`pbt_controller.service`) calls; it holds
one lock around everything, persists through :class:`~pbt_controller.state.StateStore` after
every change, and keeps the ``spiral_pbt_*`` metrics current. It raises
:class:`~spiral.rpc.InvalidMessage` / :class:`~spiral.rpc.PreconditionFailed` for reports and
requests it refuses, so the servicer answers INVALID_ARGUMENT / FAILED_PRECONDITION.

Reports (:meth:`Controller.report`):
  The controller is the source of truth for each member's hyperparameters. Before its first
  report a member's hyperparameters are the ones sampled at start, and every answer (continue
  or exploit) carries the hyperparameters the member must train with from now on, so the first
  answer hands a member its sampled values. A report whose hyperparameters differ from the
  controller's (the member has not adopted them yet) restarts the member's ready clock, as does
  an exploit. ``updates`` must be the member's own monotonic update count (not the donor's after
  a copy); a count that goes below the last change (a learner restarted from an older
  checkpoint) moves the ready clock back to it.

Actors (:meth:`Controller.assign`):
  Actors call ``AssignActor`` on start and then periodically (every ``actor_timeout / 3``
  seconds or so) as a heartbeat. An actor not seen for ``actor_timeout`` seconds is forgotten.
  With ``A`` live actors (including the asking one) over ``M`` members with known addresses the
  cap is ``ceil(A / M)``; the asking actor keeps its previous member (the one the controller
  remembers, else the request's ``previous_member``) while that member holds at most ``cap``
  actors including it, otherwise it moves to the member with the fewest actors (ties: lowest
  index). So new actors fill the emptiest members, and when actors leave (``kubectl scale``)
  the survivors move over on their next heartbeat until the spread is within one.

Population discriminator (``pbt.shared_discriminator``, :attr:`Controller.shared_discriminator`):
  the members share one discriminator, so an exploit copies the donor's policy, Adam state and
  hyperparameters only. Its ``exploit`` lineage line says so (``"discriminator": "shared"``,
  absent otherwise), the directive names no donor discriminator, and the log line says
  "policy only".
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from pbt_controller import decision as pbt
from pbt_controller.discovery import Discovery
from pbt_controller.state import ActorRecord, ControllerState, StateStore
from spiral.runtime import metrics
from spiral.runtime.members import MemberAddresses
from spiral.config import PBTConfig
from spiral.rpc import InvalidMessage, PreconditionFailed

log = logging.getLogger(__name__)

HEARTBEAT_SAVE_SECONDS = 5.0
"""A heartbeat that changes nothing but a last-seen time is saved at most this often."""


@dataclass(frozen=True)
class ReportOutcome:
    """What to answer a report with: the decision and, on exploit, the donor's policy version."""

    decision: pbt.Decision
    donor_version: int = 0


@dataclass(frozen=True)
class MemberSnapshot:
    """One member's status (a copy, safe to read without the lock)."""

    record: pbt.MemberRecord
    actors: int
    addresses: MemberAddresses | None = None


@dataclass
class _Saved:
    time: float = -math.inf


def _same_hyperparameters(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    return set(a) == set(b) and all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=0.0) for k in a)


class Controller:
    """A population under population-based training, and the actors serving it.

    Args:
        pbt_cfg: The ``pbt`` section (ranges, ready criterion, truncation, explore).
        population_size: Number of members (indices ``0 .. population_size - 1``).
        store: Where the state and logs live; an existing ``state.json`` is reloaded.
        discovery: Source of members' addresses (for actor assignments).
        actor_timeout: Seconds after which a silent actor is forgotten.
        seed: Seed of the decision generator on a fresh start (a reloaded state keeps its own).
        clock: Unix time source (tests pass a fake one to expire actors).
        initial_hyperparameters: Member -> hyperparameters that replace the sampled starting values
            of a new member (e.g. to start one member deliberately badly); ignored for members
            restored from saved state.
    """

    def __init__(self, pbt_cfg: PBTConfig, population_size: int, store: StateStore, discovery: Discovery,
                 actor_timeout: float = 60.0, seed: int = 0, clock: Callable[[], float] = time.time,
                 initial_hyperparameters: Mapping[int, Mapping[str, float]] | None = None) -> None:
        if population_size < 1:
            raise ValueError(f"population_size must be >= 1, got {population_size}")
        if actor_timeout <= 0:
            raise ValueError(f"actor_timeout must be > 0, got {actor_timeout}")
        self.cfg = pbt_cfg
        self.population_size = population_size
        self.shared_discriminator = bool(pbt_cfg.shared_discriminator) and population_size > 1
        """Whether the members share one discriminator (so an exploit copies none)."""
        self.store = store
        self.discovery = discovery
        self.actor_timeout = float(actor_timeout)
        self.clock = clock
        self._lock = threading.Lock()
        self._saved = _Saved()
        loaded = store.load()
        self.restored = loaded is not None
        self.state = loaded or ControllerState(seed=seed)
        self._rng = self.state.restore_rng()
        for member in range(population_size):
            if member not in self.state.members:
                hyperparameters = pbt.sample_hyperparameters(self.cfg, self._rng)
                hyperparameters.update((initial_hyperparameters or {}).get(member, {}))
                self.state.members[member] = pbt.MemberRecord(member=member, hyperparameters=hyperparameters)
                self.store.append_lineage({"time": self.clock(), "member": member, "event": "start", "donor": None,
                                           "hyperparameters_before": None, "hyperparameters_after": hyperparameters,
                                           "fitness": None, "donor_fitness": None})
        beyond = sorted(m for m in self.state.members if m >= population_size)
        if beyond:
            log.warning("state holds members %s beyond population_size %d: kept on file, ignored", beyond,
                        population_size)
        self._save()
        for record in self._active().values():
            self._export_member(record)
        self._export_actors()

    # -- reports -------------------------------------------------------------------------------

    def _active(self) -> dict[int, pbt.MemberRecord]:
        return {m: r for m, r in self.state.members.items() if m < self.population_size}

    def validate_report(self, member: int, updates: int, policy_version: int, fitness: float,
                        hyperparameters: Mapping[str, float]) -> None:
        """Refuse a malformed report, naming the field.

        Raises:
            InvalidMessage: member out of range, negative counts, non-finite fitness, unknown
                hyperparameter name, non-finite or negative hyperparameter value.
        """
        if not 0 <= member < self.population_size:
            raise InvalidMessage("member", f"member must be in [0, {self.population_size}), got {member}")
        if updates < 0:
            raise InvalidMessage("updates", f"updates must be >= 0, got {updates}")
        if policy_version < 0:
            raise InvalidMessage("version", f"policy_version must be >= 0, got {policy_version}")
        if not math.isfinite(fitness):
            raise InvalidMessage("nonfinite", f"fitness must be finite, got {fitness}")
        for name, value in hyperparameters.items():
            if name not in pbt.HYPERPARAMETER_NAMES:
                raise InvalidMessage("hyperparameter", f"hyperparameters[{name!r}] is not a tuned hyperparameter "
                                                       f"(known: {', '.join(pbt.HYPERPARAMETER_NAMES)})")
            if not math.isfinite(value) or value < 0:
                raise InvalidMessage("hyperparameter", f"hyperparameters[{name!r}] must be finite and >= 0, "
                                                       f"got {value}")

    def report(self, member: int, updates: int, policy_version: int, fitness: float,
               hyperparameters: Mapping[str, float], failed_donor: int | None = None) -> ReportOutcome:
        """Record a member's report and decide whether it continues or copies a donor.

        ``failed_donor`` says the member could not carry out its last exploit (the donor was
        unreachable) and kept its own weights and the reported hyperparameters: the lineage gets
        an ``exploit_failed`` line and the controller takes the reported values back as the
        member's, so the record matches what the member trains with.
        """
        self.validate_report(member, updates, policy_version, fitness, hyperparameters)
        with self._lock:
            now = self.clock()
            record = self.state.members[member]
            if failed_donor is not None and hyperparameters:
                self.store.append_lineage({"time": now, "member": member, "event": "exploit_failed",
                                           "donor": int(failed_donor), "fitness": float(fitness), "updates": updates,
                                           "hyperparameters_before": dict(record.hyperparameters),
                                           "hyperparameters_after": dict(hyperparameters)})
                record.hyperparameters = dict(hyperparameters)
                metrics.PBT_FAILED_EXPLOITS_TOTAL.labels(str(member)).inc()
                log.warning("member %d could not copy member %d; it keeps its weights and hyperparameters %s",
                            member, failed_donor, _fmt(hyperparameters))
            if updates < record.updates_at_last_change:
                record.updates_at_last_change = updates
            if hyperparameters and not _same_hyperparameters(hyperparameters, record.hyperparameters):
                # The member is about to switch to the controller's values: a change.
                record.updates_at_last_change = updates
            record.fitness = float(fitness)
            record.updates = int(updates)
            record.policy_version = int(policy_version)
            record.reported = True
            decided = pbt.decide(self._active(), member, self.cfg, self._rng)
            donor_version = 0
            if decided.action == pbt.EXPLOIT:
                assert decided.donor is not None
                donor = self.state.members[decided.donor]
                donor_version = donor.policy_version
                common = {"time": now, "member": member, "donor": donor.member, "fitness": record.fitness,
                          "donor_fitness": donor.fitness, "donor_version": donor_version, "updates": updates}
                exploit = {**common, "event": "exploit", "hyperparameters_before": dict(record.hyperparameters),
                           "hyperparameters_after": dict(decided.donor_hyperparameters)}
                if self.shared_discriminator:
                    exploit["discriminator"] = "shared"  # one discriminator for all: nothing to copy
                self.store.append_lineage(exploit)
                self.store.append_lineage({**common, "event": "explore",
                                           "hyperparameters_before": dict(decided.donor_hyperparameters),
                                           "hyperparameters_after": dict(decided.hyperparameters)})
                record.hyperparameters = dict(decided.hyperparameters)
                record.updates_at_last_change = updates
                record.exploits += 1
                metrics.PBT_EXPLOITS_TOTAL.labels(str(member)).inc()
                metrics.PBT_EXPLORES_TOTAL.labels(str(member)).inc()
                log.info("member %d exploits member %d%s: %s; hyperparameters %s", member, donor.member,
                         " (policy only: the discriminator is shared)" if self.shared_discriminator else "",
                         decided.reason, _fmt(decided.hyperparameters))
            self.store.append_report({"time": now, "member": member, "updates": updates,
                                      "policy_version": policy_version, "fitness": record.fitness,
                                      "hyperparameters": dict(record.hyperparameters), "action": decided.action,
                                      "donor": decided.donor})
            self._save()
            self._export_member(record)
            return ReportOutcome(decided, donor_version)

    # -- actors --------------------------------------------------------------------------------

    def assign(self, actor_id: str, previous_member: int = -1) -> MemberAddresses:
        """The member ``actor_id`` should serve now (and record the heartbeat).

        Raises:
            InvalidMessage: empty ``actor_id`` or ``previous_member < -1``.
            PreconditionFailed: no member's addresses are known yet.
        """
        if not actor_id:
            raise InvalidMessage("actor_id", "actor_id must not be empty")
        if previous_member < -1:
            raise InvalidMessage("member", f"previous_member must be >= -1 (-1: none), got {previous_member}")
        known = {m: a for m, a in self.discovery.members().items() if 0 <= m < self.population_size}
        if not known:
            raise PreconditionFailed("no_members", "no population member's addresses are known yet "
                                                   "(members file empty, or no learner pod running)")
        with self._lock:
            now = self.clock()
            expired = self._expire(now, keep=actor_id)
            counts = {m: 0 for m in known}
            for other, assignment in self.state.actors.items():
                if other != actor_id and assignment.member in counts:
                    counts[assignment.member] += 1
            existing = self.state.actors.get(actor_id)
            previous = existing.member if existing is not None else previous_member
            cap = math.ceil((sum(counts.values()) + 1) / len(counts))
            if previous in counts and counts[previous] + 1 <= cap:
                chosen = previous
            else:
                chosen = min(counts, key=lambda m: (counts[m], m))
            changed = existing is None or existing.member != chosen
            self.state.actors[actor_id] = ActorRecord(member=chosen, last_seen=now)
            if changed:
                log.info("actor %s -> member %d (was %s; actors per member %s)", actor_id, chosen,
                         existing.member if existing else (previous_member if previous_member >= 0 else "none"),
                         self._counts())
            if changed or expired or now - self._saved.time >= HEARTBEAT_SAVE_SECONDS:
                self._save()
            self._export_actors()
            return known[chosen]

    def _expire(self, now: float, keep: str = "") -> list[str]:
        gone = [a for a, rec in self.state.actors.items() if a != keep and now - rec.last_seen > self.actor_timeout]
        for actor in gone:
            log.info("actor %s not seen for %.0f s: forgotten (member %d)", actor,
                     now - self.state.actors[actor].last_seen, self.state.actors[actor].member)
            del self.state.actors[actor]
        return gone

    def _counts(self) -> dict[int, int]:
        counts = {m: 0 for m in range(self.population_size)}
        for assignment in self.state.actors.values():
            if assignment.member in counts:
                counts[assignment.member] += 1
        return counts

    # -- status --------------------------------------------------------------------------------

    def population(self) -> list[MemberSnapshot]:
        """Every member's record and live actor count (forgets timed-out actors first)."""
        known = self.discovery.members()
        with self._lock:
            if self._expire(self.clock()):
                self._save()
                self._export_actors()
            counts = self._counts()
            return [MemberSnapshot(record=_copy(record), actors=counts[m], addresses=known.get(m))
                    for m, record in sorted(self._active().items())]

    def actors(self) -> dict[str, int]:
        """Actor id -> member, for every remembered actor."""
        with self._lock:
            return {a: rec.member for a, rec in self.state.actors.items()}

    def save(self) -> None:
        """Write the state now (also done after every change)."""
        with self._lock:
            self._save()

    def write_plot(self) -> None:
        """Redraw ``population.png`` from the logs."""
        self.store.plot()

    # -- internals -----------------------------------------------------------------------------

    def _save(self) -> None:
        self.state.rng_state = self._rng.getstate()
        self.store.save(self.state)
        self._saved.time = self.clock()

    def _export_member(self, record: pbt.MemberRecord) -> None:
        label = str(record.member)
        if record.reported:
            metrics.PBT_FITNESS.labels(label).set(record.fitness)
        for name, value in record.hyperparameters.items():
            metrics.PBT_HYPERPARAMETER.labels(label, name).set(value)

    def _export_actors(self) -> None:
        for member, count in self._counts().items():
            metrics.PBT_ACTORS.labels(str(member)).set(count)


def _copy(record: pbt.MemberRecord) -> pbt.MemberRecord:
    return pbt.MemberRecord(**{**vars(record), "hyperparameters": dict(record.hyperparameters)})


def _fmt(hyperparameters: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in sorted(hyperparameters.items()))


__all__ = ["Controller", "MemberSnapshot", "ReportOutcome"]
