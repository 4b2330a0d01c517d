"""``spiral actor``: N batched environments acting with a lagging copy of the policy, over gRPC.

The loop is :meth:`actor.actor.Actor.run` (IMPALA's actor, written against the
:mod:`spiral.core` interfaces, with its drop rules); this module wires it to one member's
policy learner and replay buffer through :mod:`spiral.rpc.peers`, and, when a population
trains, asks the PBT controller which member to serve (:class:`MemberAssigner`).

Peers come and go (restarts, rollouts, scaling): every call has a deadline, and transient
failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED: a full learner queue pushing
back, ABORTED) are retried with exponential backoff and full jitter for at most
``actor.parameter_deadline_seconds``, ``actor.submit_deadline_seconds`` and
``actor.insert_deadline_seconds``; then the item is dropped and the loop goes on. Nothing
blocks forever or crashes the process. The loop runs under a
:class:`~spiral.runtime.guarded_loop.GuardedLoop`: SIGTERM finishes the current episode's sends and
exits 0; a loop that raises or stalls turns ``/healthz`` to 503 and exits 1. While its learner
is done (``learner.max_frames``, asked with ``Status``) the actor idles, saying ``done`` in
``/healthz`` and ``spiral_run_done``, and does not exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Callable

from actor.actor import Actor, ActorPeers
from spiral.agent.acting import EpisodeRunner
from spiral.config import ExperimentConfig
from spiral.envs import action_spec_for, make_env
from spiral.runtime.budget import RunDone
from spiral.runtime.guarded_loop import GuardedLoop
from spiral.nets import build_policy
from spiral.rpc.client import TRANSIENT_CODES
from spiral.rpc.contract import declare_process_contract
from spiral.rpc.peers import PeerError, RemoteLearnerStatus, RemotePBTController, RemoteParameterSource, \
    RemoteRenderSink, RemoteUnrollSink
from spiral.runtime.seeding import actor_seed
from spiral.runtime.service_options import ServiceOptions, add_service_arguments, resolve_service_options
from spiral.runtime.service_runtime import start_process

log = logging.getLogger(__name__)

def connect_member(cfg: ExperimentConfig, member: int, learner_address: str, replay_address: str,
                   stop: threading.Event) -> ActorPeers:
    """Remote peers of one member: its learner's parameters and unroll intake, its replay buffer.

    Each retries transient failures within its deadline from ``cfg.actor``; ``stop`` ends the
    retrying at once (shutdown).
    """
    a, services = cfg.actor, cfg.services

    def retry(deadline: float, peer: str) -> dict:
        call = min(services.call_timeout_seconds, deadline)  # a deadline below it is one attempt
        return dict(call_timeout=call, unavailable_retry_seconds=deadline - call, retry_codes=TRANSIENT_CODES,
                    retry_labels=(str(member), peer), stop=stop)

    parameters = RemoteParameterSource(learner_address, services, "learner", member,
                                       **retry(a.parameter_deadline_seconds, "learner"))
    unrolls = RemoteUnrollSink(learner_address, services, action_spec_for(cfg).names, member,
                               **retry(a.submit_deadline_seconds, "learner"))
    renders = RemoteRenderSink(replay_address, services, member, **retry(a.insert_deadline_seconds, "replaybuffer"))
    # Whether the learner is done is asked only of a run with a budget (learner.max_frames).
    status = (RemoteLearnerStatus(learner_address, services, **retry(a.parameter_deadline_seconds, "learner"))
              if cfg.learner.max_frames > 0 else None)

    def close() -> None:
        for peer in (parameters, unrolls, renders, status):
            if peer is not None:
                peer.close()

    return ActorPeers(parameters, unrolls, renders, close,
                      learner_done=status.done if status is not None else lambda: False)


class MemberAssigner:
    """Asks the PBT controller which population member to serve, at start and as a heartbeat.

    The controller balances actors across members and forgets actors it has not heard from,
    so scaling the actor Deployment up or down rebalances the population by itself.
    """

    def __init__(self, address: str, cfg: ExperimentConfig, actor_id: str,
                 connect: Callable[[int, str, str], ActorPeers]) -> None:
        self.controller = RemotePBTController(address, cfg.services, call_timeout=cfg.services.call_timeout_seconds)
        self.actor_id = actor_id
        self.connect = connect
        self.heartbeat = cfg.pbt.actor_heartbeat_seconds
        self.member: int | None = None
        self._addresses: tuple[str, str] | None = None
        self._next = 0.0

    def maybe_assign(self, actor: Actor) -> bool:
        """Ask (when due) which member to serve and switch ``actor`` to it; False while none."""
        now = time.monotonic()
        if now < self._next:
            return self.member is not None
        try:
            assignment = self.controller.assign_actor(self.actor_id, self.member)
        except PeerError as error:
            log.warning("PBT controller: %s; %s", error,
                        "retrying" if self.member is None else f"staying with member {self.member}")
            self._next = now + (2.0 if self.member is None else self.heartbeat)
            return self.member is not None
        self._next = now + self.heartbeat
        addresses = (assignment.learner_address, assignment.replay_address)
        if (assignment.member, addresses) != (self.member, self._addresses):
            log.info("now serving member %d (learner %s, replay buffer %s)", assignment.member, *addresses)
            actor.use_peers(assignment.member, self.connect(assignment.member, *addresses))
        self.member, self._addresses = assignment.member, addresses
        return True

    def close(self) -> None:
        self.controller.close()


def build_actor(opts: ServiceOptions, stop: threading.Event, run_done: RunDone | None = None) -> Actor:
    """The actor of ``opts``: environments, policy copy, targets and its member's peers."""
    cfg = opts.config
    seed = actor_seed(cfg.seed, opts.actor_id)
    env = make_env(cfg, cfg.actor.num_envs, seed=seed)
    targets = None
    if cfg.env.conditional:
        from spiral.data import for_experiment
        targets = for_experiment(cfg).images
    runner = EpisodeRunner(cfg, env, build_policy(cfg), targets, seed=seed, actor_id=opts.actor_id)
    peers = connect_member(cfg, opts.member, cfg.services.learner_address, cfg.services.replay_address, stop)
    return Actor(runner, peers, opts.member, opts.actor_id, stop, cfg.actor.parameter_refresh_seconds,
                 run_done=run_done)


def register(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # libmypaint links the system libgomp, which reads OMP_NUM_THREADS once, when the first
    # environment loads it: an actor process paints on one core unless its deployment says so.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    opts = resolve_service_options("actor", args)
    cfg = opts.config
    declare_process_contract(cfg)  # every call to a peer says what this actor's experiment is
    guard = GuardedLoop("actor", "actor episode loop", cfg.actor.stall_seconds,
                        linger_seconds=cfg.services.failure_linger_seconds)
    run_done = RunDone(opts.member, f"actor {opts.actor_id}")
    start_process(opts, torch_threads=cfg.actor.torch_threads, health=run_done.health(guard.check))

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s: finishing the current episode", signal.Signals(signum).name)
        guard.exit_requested.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    actor = build_actor(opts, guard.stop_event, run_done)
    log.info("actor %s: %d %s environments, learner %s, replay buffer %s", opts.actor_id,
             cfg.actor.num_envs, cfg.env.kind, cfg.services.learner_address, cfg.services.replay_address)
    assigner = None
    if cfg.pbt.population_size > 1:
        assigner = MemberAssigner(cfg.services.pbt_address, cfg, opts.actor_id,
                                  lambda member, learner, replay: connect_member(cfg, member, learner, replay,
                                                                                 guard.stop_event))
        log.info("population of %d: asking the PBT controller at %s which member to serve",
                 cfg.pbt.population_size, cfg.services.pbt_address)
    guard.start(lambda _stop, beat: actor.run(beat, assigner.maybe_assign if assigner is not None else None))
    try:
        while not guard.exit_requested.wait(0.5):
            pass
        guard.stop(timeout=2 * cfg.actor.submit_deadline_seconds)
    finally:
        actor.close()
        if assigner is not None:
            assigner.close()
    log.info("actor stopped after %d episodes%s", actor.stats.episodes,
             f" (its loop failed: {guard.failure})" if guard.failure else "")
    return guard.exit_code
