"""The actor's loop (IMPALA's actor), written only against the :mod:`spiral.core` interfaces.

An :class:`Actor` owns an :class:`~spiral.agent.acting.EpisodeRunner` (N environments and a lagging
policy copy) and three peers (:class:`ActorPeers`): where parameters come from, where unrolls
go and where final renders go. It cannot tell whether they are in the same process
(``spiral local``: the learner, the replay table) or across the network (``spiral actor``:
:mod:`spiral.rpc.peers`). Each iteration of :meth:`Actor.run`:

1. every ``actor.parameter_refresh_seconds`` asks for parameters newer than the ones held;
2. runs one batched episode on N canvases;
3. submits the episodes as one unroll stamped with the acting version;
4. inserts the final renders (and targets) for the discriminator.

With ``actor.prior_share`` > 0 that share of the iterations executes programs drawn from a broad
prior instead of acting (:meth:`~spiral.agent.acting.EpisodeRunner.run_prior_episode`): the
unroll, marked as prior, goes to the learner for program recovery, and its renders do not go
to the discriminator (they are not the policy's).

Drop rules, the same for every kind of peer (the peers do the bounded retrying):

* an unroll the learner refuses as stale (:class:`spiral.core.Refused` with ``stale``) is
  dropped and the parameters are refetched at once; any other refusal is dropped and logged
  as an error (a bug on one side);
* an unroll or renders that could not be delivered (:class:`spiral.core.PeerFailure`:
  the peer stayed down or busy past its deadline) are dropped; the discriminator needs recent
  renders, not all of them;
* a failed parameter refresh keeps the parameters held; before the first ones arrive the
  loop waits a second and goes round again (still beating its watchdog).

**The budget.** With every parameter refresh the actor also asks whether its learner is done
(``learner.max_frames``, :attr:`ActorPeers.learner_done`); a learner that refuses an unroll as
done makes it ask at once. While it is, the actor acts no more: its loop idles, beating, and it
says ``done`` (:attr:`Actor.run_done`), but it does not exit (a Deployment would restart it).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from spiral.runtime import metrics
from spiral.runtime.budget import RunDone
from spiral.agent.acting import EpisodeRunner
from spiral.runtime.service_runtime import ProgressLog
from spiral.core import ParameterSource, PeerFailure, Refused, RenderSink, UnrollSink
from spiral.agent.trajectory import Unroll

log = logging.getLogger(__name__)

DONE_IDLE_SECONDS = 0.2
"""The shortest wait of an iteration while the learner is done."""


@dataclass
class ActorStats:
    """Counts of what happened to this actor's episodes (also exported as metrics)."""

    episodes: int = 0
    prior_episodes: int = 0
    env_steps: int = 0
    unrolls_sent: int = 0
    unrolls_dropped: int = 0
    renders_sent: int = 0
    renders_dropped: int = 0
    learner_version: int = 0


@dataclass
class ActorPeers:
    """The three peers of one population member, as an actor sees them."""

    parameters: ParameterSource
    unrolls: UnrollSink
    renders: RenderSink
    close: Callable[[], None] = lambda: None
    """Releases them (remote peers close their channels)."""
    learner_done: Callable[[], bool] = lambda: False
    """Whether the learner reached its budget (``learner.max_frames``); may raise
    :class:`spiral.core.PeerFailure`."""


class Actor:
    """An :class:`EpisodeRunner` wired to one member's learner and replay buffer.

    Args:
        runner: The environments and the policy copy.
        peers: The member's peers.
        member: The population member served (metric labels).
        actor_id: This actor's identity (metric labels, replay items).
        stop: Set to finish the current iteration and return from :meth:`run`.
        parameter_refresh_seconds: How often to ask for newer parameters (and whether the
            learner is done).
        run_done: Where it says its learner is done (default: its own; the service passes the
            one its ``/healthz`` reports).
    """

    def __init__(self, runner: EpisodeRunner, peers: ActorPeers, member: int, actor_id: str,
                 stop: threading.Event, parameter_refresh_seconds: float = 1.0,
                 run_done: RunDone | None = None) -> None:
        self.runner = runner
        self.peers = peers
        self.member = member
        self.actor_id = actor_id
        self.stop = stop
        self.parameter_refresh_seconds = parameter_refresh_seconds
        self.stats = ActorStats()
        self.has_parameters = False
        self._last_refresh = -float("inf")
        self._labels = (str(member), actor_id)
        self.run_done = run_done if run_done is not None else RunDone(member, f"actor {actor_id}")
        """Set while its learner is done: the actor does not act."""

    def close(self) -> None:
        self.peers.close()

    def use_peers(self, member: int, peers: ActorPeers) -> None:
        """Serve another population member from now on (PBT rebalancing)."""
        self.peers.close()
        self.peers = peers
        self.member = member
        self._labels = (str(member), self.actor_id)
        self.has_parameters = False  # another learner: its versions say nothing about ours
        self.run_done.clear()  # nor does its budget: asked at the next refresh
        self.run_done.member = str(member)

    # -- parameters --------------------------------------------------------------------------

    def refresh_parameters(self, force: bool = False) -> None:
        """Fetch newer parameters when due; before the first ones arrive, wait for the learner."""
        now = time.monotonic()
        if not force and self.has_parameters and now - self._last_refresh < self.parameter_refresh_seconds:
            return
        have = self.runner.policy_version if self.has_parameters else -1
        try:
            snapshot = self.peers.parameters.fetch(have)
        except PeerFailure as exc:
            log.warning("parameter refresh failed (acting on with version %d): %s", self.runner.policy_version, exc)
            if not self.has_parameters:
                self.stop.wait(1.0)
            return
        self._last_refresh = time.monotonic()
        self.check_learner_done()
        if snapshot is not None:
            if self.has_parameters and snapshot.version < self.runner.policy_version:
                log.info("the learner went back to version %d (restarted from a checkpoint); following it",
                         snapshot.version)
            self.runner.load_parameters(snapshot)
            self.has_parameters = True
        self.stats.learner_version = max(self.runner.policy_version, 0) if snapshot is None else snapshot.version
        self._export_version()

    def check_learner_done(self) -> bool:
        """Ask whether the learner is done and follow it (a failed question changes nothing)."""
        try:
            done = self.peers.learner_done()
        except PeerFailure as exc:
            log.warning("could not ask the learner whether it is done: %s", exc)
            return self.run_done.is_set
        if done:
            self.run_done.set(f"its learner (member {self.member}) reached learner.max_frames; not acting")
        elif self.run_done.is_set:
            log.info("the learner of member %d trains again: acting again", self.member)
            self.run_done.clear()
        return done

    def _export_version(self) -> None:
        metrics.ACTOR_POLICY_VERSION.labels(*self._labels).set(self.runner.policy_version)
        metrics.ACTOR_POLICY_LAG.labels(*self._labels).set(
            max(0, self.stats.learner_version - self.runner.policy_version))

    # -- sending -----------------------------------------------------------------------------

    def submit(self, unroll: Unroll) -> None:
        """Hand one unroll to the learner; dropped if refused or undeliverable (module doc)."""
        try:
            version = self.peers.unrolls.submit(unroll)
        except Refused as exc:
            self.stats.unrolls_dropped += 1
            self._count_dropped(unroll, "learner", "stale" if exc.stale else "refused")
            if exc.stale:
                log.info("learner refused the unroll (%s); refetching parameters", exc)
                self.refresh_parameters(force=True)
            else:
                log.error("learner rejected the unroll: %s", exc)
            return
        except PeerFailure as exc:
            self.stats.unrolls_dropped += 1
            self._count_dropped(unroll, "learner", "unreachable")
            log.warning("dropped an unroll: %s", exc)
            return
        self.stats.unrolls_sent += 1
        if version is not None:
            self.stats.learner_version = int(version)
        self._export_version()

    def _count_dropped(self, unroll: Unroll, to: str, reason: str) -> None:
        metrics.ACTOR_DROPPED_EPISODES_TOTAL.labels(*self._labels, to, reason).inc(unroll.batch_size)

    def insert_renders(self, unroll: Unroll) -> None:
        """Hand the episode's final renders to the replay buffer; dropped if it cannot take them."""
        try:
            self.peers.renders.insert(unroll.final_canvases, unroll.targets, unroll.policy_version, self.actor_id)
        except PeerFailure as exc:
            self.stats.renders_dropped += unroll.batch_size
            self._count_dropped(unroll, "replay", "unreachable")
            log.warning("dropped %d renders: %s", unroll.batch_size, exc)
            return
        self.stats.renders_sent += unroll.batch_size

    # -- the loop ----------------------------------------------------------------------------

    def act_once(self) -> Unroll | None:
        """One episode on every canvas, sent to the learner and the replay buffer (None, at
        once, before the first parameters and while the learner is done)."""
        self.refresh_parameters()
        if not self.has_parameters or self.run_done.is_set:
            return None
        timing = self.runner.timing
        before_inf, before_render = timing.inference_seconds, timing.render_seconds
        prior_share = self.runner.cfg.actor.prior_share
        prior = prior_share > 0 and self.runner.rng.random() < prior_share
        unroll = self.runner.run_prior_episode() if prior else self.runner.run_episode()
        steps = unroll.num_steps
        m = str(self.member)
        metrics.ACTOR_INFERENCE_SECONDS.labels(m).observe((timing.inference_seconds - before_inf) / steps)
        metrics.ACTOR_RENDER_SECONDS.labels(m).observe((timing.render_seconds - before_render) / steps)
        metrics.ACTOR_ENV_STEPS_TOTAL.labels(*self._labels).inc(steps * unroll.batch_size)
        metrics.ACTOR_EPISODES_TOTAL.labels(*self._labels).inc(unroll.batch_size)
        self.stats.episodes += unroll.batch_size
        self.stats.prior_episodes += unroll.batch_size if prior else 0
        self.stats.env_steps += steps * unroll.batch_size
        self.submit(unroll)
        if not prior:
            self.insert_renders(unroll)
        return unroll

    def run(self, beat: Callable[[], None] = lambda: None,
            before_each: Callable[["Actor"], bool] | None = None) -> None:
        """The actor's loop, the one ``spiral actor`` and ``spiral local`` run: until ``stop``.

        Each iteration calls ``beat`` (the :class:`spiral.runtime.guarded_loop.GuardedLoop` heartbeat),
        then ``before_each(actor)`` (the PBT member assignment), which returns False while there
        is no member to serve (the loop then waits a second), and acts once; while the learner
        is done it waits ``parameter_refresh_seconds`` (at least :data:`DONE_IDLE_SECONDS`) instead.
        """
        progress = ProgressLog("actor env steps")
        while not self.stop.is_set():
            beat()
            if before_each is not None and not before_each(self):
                self.stop.wait(1.0)
                continue
            if self.act_once() is None and self.run_done.is_set:
                self.stop.wait(max(DONE_IDLE_SECONDS, self.parameter_refresh_seconds))
                continue
            s = self.stats
            progress.maybe_log(s.env_steps, version=self.runner.policy_version, sent=s.unrolls_sent,
                               dropped=s.unrolls_dropped, renders_dropped=s.renders_dropped)
