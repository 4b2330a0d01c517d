"""``spiral actor``: N batched environments acting with a lagging copy of the policy.

The loop (IMPALA's actor):

1. every ``actor.parameter_refresh_seconds`` ask the learner for parameters newer than the ones
   held (one tiny "up to date" message when there are none);
2. run one batched episode on N canvases (:class:`actor.acting.EpisodeRunner`);
3. stream the episodes to the policy learner as one unroll stamped with the acting version;
4. insert the final renders (and targets) into the replay buffer for the discriminator.

Peers come and go (restarts, rollouts, scaling): every call has a deadline, transient
failures are retried with exponential backoff and full jitter
(:func:`spiral.rpc.client.call_with_retry`), and nothing blocks forever or crashes the
process. An unroll the learner refuses as stale (FAILED_PRECONDITION) is dropped and the
parameters are refetched; renders the replay buffer cannot take right now are dropped (the
discriminator only needs recent samples, not all of them). The loop runs under a
:class:`~spiral.guarded_loop.GuardedLoop`: SIGTERM finishes the current episode's sends and exits
0; a loop that raises or stalls turns ``/healthz`` to 503 and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable

import grpc

from actor.acting import EpisodeRunner
from spiral import metrics
from spiral.config import ExperimentConfig
from spiral.envs import action_spec_for, make_env
from spiral.nets import build_policy
from spiral.nets.params import ParameterSnapshot
from spiral.rpc.client import RetryError, RetryPolicy, call_with_retry, make_channel
from spiral.rpc.errors import InvalidMessage
from spiral.rpc.messages import encode_insert_request, encode_unroll
from spiral.rpc.parameters import fetch_parameters
from spiral.service_options import ServiceOptions, add_service_arguments, resolve_service_options
from spiral.guarded_loop import GuardedLoop
from spiral.service_runtime import ProgressLog, start_process
from spiral.trajectory import Unroll
from spiral.v1 import learner_pb2_grpc, pbt_pb2, pbt_pb2_grpc, replay_pb2_grpc

log = logging.getLogger(__name__)

SUBMIT_DEADLINE_SECONDS = 60.0
"""How long one unroll is retried against a learner that is down before it is dropped."""
INSERT_DEADLINE_SECONDS = 5.0
"""How long one batch of renders is retried against a replay buffer that is down."""


@dataclass
class ActorStats:
    """Counts of what happened to this actor's episodes (also exported as metrics)."""

    episodes: int = 0
    env_steps: int = 0
    unrolls_sent: int = 0
    unrolls_dropped: int = 0
    renders_sent: int = 0
    renders_dropped: int = 0
    learner_version: int = 0


class RemoteActor:
    """An :class:`EpisodeRunner` wired to a policy learner and a replay buffer over gRPC."""

    def __init__(self, cfg: ExperimentConfig, runner: EpisodeRunner, member: int, actor_id: str,
                 stop: threading.Event) -> None:
        self.cfg = cfg
        self.runner = runner
        self.member = member
        self.actor_id = actor_id
        self.run_id = uuid.uuid4().hex[:12]
        self.stop = stop
        self.head_names = list(action_spec_for(cfg).names)
        services = cfg.services
        self.learner_channel = make_channel(services.learner_address, services)
        self.replay_channel = make_channel(services.replay_address, services)
        self.learner = learner_pb2_grpc.PolicyLearnerStub(self.learner_channel)
        self.replay = replay_pb2_grpc.ReplayBufferStub(self.replay_channel)
        self.retry = RetryPolicy(call_timeout=10.0, max_backoff=5.0)
        self.stats = ActorStats()
        self.has_parameters = False
        self._last_refresh = -float("inf")
        self._labels = (str(member), actor_id)

    def close(self) -> None:
        self.learner_channel.close()
        self.replay_channel.close()

    def serve_member(self, member: int, learner_address: str, replay_address: str) -> None:
        """Switch to another population member's learner and replay buffer (PBT rebalancing)."""
        services = self.cfg.services
        if member == self.member and learner_address == services.learner_address and \
                replay_address == services.replay_address:
            return
        log.info("now serving member %d (learner %s, replay buffer %s)", member, learner_address, replay_address)
        self.close()
        self.cfg = dataclasses.replace(self.cfg, services=dataclasses.replace(
            services, learner_address=learner_address, replay_address=replay_address))
        self.member = member
        self._labels = (str(member), self.actor_id)
        self.learner_channel = make_channel(learner_address, self.cfg.services)
        self.replay_channel = make_channel(replay_address, self.cfg.services)
        self.learner = learner_pb2_grpc.PolicyLearnerStub(self.learner_channel)
        self.replay = replay_pb2_grpc.ReplayBufferStub(self.replay_channel)
        self.has_parameters = False  # another learner: its versions say nothing about ours

    # -- parameters --------------------------------------------------------------------------

    def refresh_parameters(self, force: bool = False) -> None:
        """Fetch newer parameters when due; before the first ones arrive, wait for the learner."""
        now = time.monotonic()
        if not force and self.has_parameters and now - self._last_refresh < self.cfg.actor.parameter_refresh_seconds:
            return
        have = self.runner.policy_version if self.has_parameters else -1
        # Bounded even before the first parameters: the loop then goes round (and beats its
        # watchdog) while the learner is down, instead of waiting inside one call for ever.
        deadline = 30.0 if not self.has_parameters else 10.0
        try:
            update = call_with_retry(
                lambda timeout: fetch_parameters(self.learner, have, member=self.member, timeout=timeout),
                policy=self.retry, deadline_seconds=deadline, stop=self.stop,
                retry_labels=(str(self.member), "learner"), description="GetParameters")
        except (RetryError, grpc.RpcError, InvalidMessage) as exc:
            detail = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("parameter refresh failed (acting on with version %d): %s", self.runner.policy_version, detail)
            if not self.has_parameters:
                self.stop.wait(1.0)
            return
        self._last_refresh = time.monotonic()
        if update is not None:
            if self.has_parameters and update.version < self.runner.policy_version:
                log.info("the learner went back to version %d (restarted from a checkpoint); following it",
                         update.version)
            self.runner.load_parameters(ParameterSnapshot(version=update.version, tensors=dict(update.tensors)))
            self.has_parameters = True
        self.stats.learner_version = max(self.runner.policy_version, 0) if update is None else update.version
        self._export_version()

    def _export_version(self) -> None:
        metrics.ACTOR_POLICY_VERSION.labels(*self._labels).set(self.runner.policy_version)
        metrics.ACTOR_POLICY_LAG.labels(*self._labels).set(
            max(0, self.stats.learner_version - self.runner.policy_version))

    # -- sending -----------------------------------------------------------------------------

    def submit(self, unroll: Unroll) -> None:
        """Send one unroll to the learner (retried while the learner is down or busy)."""
        msg = encode_unroll(unroll, self.head_names, run_id=self.run_id, member=self.member)
        try:
            summary = call_with_retry(
                lambda timeout: self.learner.SubmitUnrolls(iter([msg]), timeout=timeout),
                policy=self.retry, deadline_seconds=SUBMIT_DEADLINE_SECONDS, stop=self.stop,
                retry_labels=(str(self.member), "learner"), description="SubmitUnrolls")
        except grpc.RpcError as error:
            self.stats.unrolls_dropped += 1
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.info("learner refused the unroll (%s); refetching parameters", error.details())
                self.refresh_parameters(force=True)
            else:
                log.error("learner rejected the unroll: %s %s", error.code().name, error.details())
            return
        except RetryError as exc:
            self.stats.unrolls_dropped += 1
            log.warning("dropped an unroll: %s", exc)
            return
        self.stats.unrolls_sent += 1
        self.stats.learner_version = int(summary.latest_version)
        self._export_version()

    def insert_renders(self, unroll: Unroll) -> None:
        """Send the episode's final renders to the replay buffer; dropped if it stays unreachable."""
        msg = encode_insert_request(unroll.final_canvases, unroll.targets, unroll.policy_version, self.actor_id,
                                    member=self.member)
        try:
            call_with_retry(lambda timeout: self.replay.Insert(iter([msg]), timeout=timeout),
                            policy=RetryPolicy(call_timeout=5.0, max_backoff=1.0),
                            deadline_seconds=INSERT_DEADLINE_SECONDS, stop=self.stop,
                            retry_labels=(str(self.member), "replaybuffer"), description="Insert")
        except (grpc.RpcError, RetryError) as exc:
            self.stats.renders_dropped += unroll.batch_size
            detail = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("dropped %d renders: %s", unroll.batch_size, detail)
            return
        self.stats.renders_sent += unroll.batch_size

    # -- the loop ----------------------------------------------------------------------------

    def act_once(self) -> Unroll | None:
        """One episode on every canvas, sent to the learner and the replay buffer."""
        self.refresh_parameters()
        if not self.has_parameters:
            return None
        timing = self.runner.timing
        before_inf, before_render = timing.inference_seconds, timing.render_seconds
        unroll = self.runner.run_episode()
        steps = unroll.num_steps
        m = str(self.member)
        metrics.ACTOR_INFERENCE_SECONDS.labels(m).observe((timing.inference_seconds - before_inf) / steps)
        metrics.ACTOR_RENDER_SECONDS.labels(m).observe((timing.render_seconds - before_render) / steps)
        metrics.ACTOR_ENV_STEPS_TOTAL.labels(*self._labels).inc(steps * unroll.batch_size)
        metrics.ACTOR_EPISODES_TOTAL.labels(*self._labels).inc(unroll.batch_size)
        self.stats.episodes += unroll.batch_size
        self.stats.env_steps += steps * unroll.batch_size
        self.submit(unroll)
        self.insert_renders(unroll)
        return unroll

    def run(self, assigner: "MemberAssigner | None" = None, beat: Callable[[], None] = lambda: None) -> None:
        """The actor's loop, the one ``spiral actor`` runs: an episode per iteration until ``stop``.

        Each iteration calls ``beat`` (the :class:`spiral.guarded_loop.GuardedLoop` heartbeat),
        asks ``assigner`` which member to serve when a population trains, and acts once.
        """
        progress = ProgressLog("actor env steps")
        while not self.stop.is_set():
            beat()
            if assigner is not None:
                assigner.maybe_assign(self)
                if assigner.member is None:
                    self.stop.wait(1.0)
                    continue
            self.act_once()
            s = self.stats
            progress.maybe_log(s.env_steps, version=self.runner.policy_version, sent=s.unrolls_sent,
                               dropped=s.unrolls_dropped, renders_dropped=s.renders_dropped)


class MemberAssigner:
    """Asks the PBT controller which population member to serve, at start and as a heartbeat.

    The controller balances actors across members and forgets actors it has not heard from,
    so scaling the actor Deployment up or down rebalances the population by itself.
    """

    def __init__(self, address: str, cfg: ExperimentConfig, actor_id: str, heartbeat_seconds: float = 15.0) -> None:
        self.channel = make_channel(address, cfg.services)
        self.stub = pbt_pb2_grpc.PBTControllerStub(self.channel)
        self.actor_id = actor_id
        self.heartbeat = heartbeat_seconds
        self.member: int | None = None
        self._next = 0.0

    def maybe_assign(self, actor: RemoteActor) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        try:
            assignment = self.stub.AssignActor(pbt_pb2.AssignRequest(
                actor_id=self.actor_id, previous_member=-1 if self.member is None else self.member), timeout=10)
        except grpc.RpcError as error:
            log.warning("PBT controller: %s %s; %s", error.code().name, error.details(),
                        "retrying" if self.member is None else f"staying with member {self.member}")
            self._next = now + (2.0 if self.member is None else self.heartbeat)
            return
        self._next = now + self.heartbeat
        self.member = assignment.member
        actor.serve_member(assignment.member, assignment.learner_address, assignment.replay_address)

    def close(self) -> None:
        self.channel.close()


def build_actor(opts: ServiceOptions, stop: threading.Event) -> RemoteActor:
    """The actor of ``opts``: environments, policy copy, targets and connections."""
    cfg = opts.config
    seed = cfg.seed + zlib.crc32(opts.actor_id.encode())
    env = make_env(cfg, cfg.actor.num_envs, seed=seed)
    targets = None
    if cfg.env.conditional:
        from spiral.data import for_experiment
        targets = for_experiment(cfg).images
    runner = EpisodeRunner(cfg, env, build_policy(cfg), targets, seed=seed, actor_id=opts.actor_id)
    return RemoteActor(cfg, runner, opts.member, opts.actor_id, stop)


def register(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # libmypaint links the system libgomp, which reads OMP_NUM_THREADS once, when the first
    # environment loads it: an actor process paints on one core unless its deployment says so.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    opts = resolve_service_options("actor", args)
    cfg = opts.config
    guard = GuardedLoop("actor", "actor episode loop", cfg.actor.stall_seconds,
                        linger_seconds=cfg.services.failure_linger_seconds)
    start_process(opts, torch_threads=cfg.actor.torch_threads, health=guard.check)

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the current episode", signal.Signals(signum).name)
        guard.exit_requested.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    actor = build_actor(opts, guard.stop_event)
    log.info("actor %s: %d %s environments, learner %s, replay buffer %s", opts.actor_id,
             cfg.actor.num_envs, cfg.env.kind, cfg.services.learner_address, cfg.services.replay_address)
    assigner = None
    if cfg.pbt.population_size > 1:
        assigner = MemberAssigner(cfg.services.pbt_address, cfg, opts.actor_id)
        log.info("population of %d: asking the PBT controller at %s which member to serve",
                 cfg.pbt.population_size, cfg.services.pbt_address)
    guard.start(lambda _stop, beat: actor.run(assigner, beat))
    try:
        while not guard.exit_requested.wait(0.5):
            pass
        guard.stop(timeout=2 * SUBMIT_DEADLINE_SECONDS)
    finally:
        actor.close()
        if assigner is not None:
            assigner.close()
    log.info("actor stopped after %d episodes%s", actor.stats.episodes,
             f" (its loop failed: {guard.failure})" if guard.failure else "")
    return guard.exit_code
