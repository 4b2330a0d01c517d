"""The actor's loop (``actor.actor.Actor``): its drop rules, and the same loop in one process and over gRPC.

* Unit tests of the drop rules use small in-memory peers (pure logic): a stale refusal drops the
  unroll and refetches parameters at once, any other refusal or an undeliverable unroll or
  render batch is dropped and counted, and a failed refresh keeps the parameters held.
* The same :class:`Actor` then runs against the real in-process components (``spiral local``'s
  :class:`spiral.commands.local.LocalSystem`) and against real gRPC servers of the policy learner and the
  replay buffer, through :func:`actor.main.connect_member`, and must deliver the same things.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY
import pytest
from prometheus_client import REGISTRY

from actor.actor import Actor, ActorPeers
from actor.main import connect_member
from learner.learner import PolicyLearner
from learner.service import PolicyLearnerServicer
from replaybuffer.service import ReplayBufferServicer
from replaybuffer.table import LocalRenders, ReplayTable
from spiral.agent.acting import EpisodeRunner
from spiral.config import ExperimentConfig, load_experiment
from spiral.data import for_experiment
from spiral.envs import make_env
from spiral.commands.local import LocalSystem
from spiral.nets import build_policy
from spiral.nets.params import snapshot_of
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.rpc.messages import experiment_image_shape
from spiral.rpc.server import build_server
from spiral.core import PeerFailure, Refused, Unavailable
from spiral.agent.trajectory import Unroll


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_experiment("experiments/tiny.yaml", {"actor": {"num_envs": 2}, "learner": {"batch_size": 4},
                                                     "replay": {"min_size": 2, "capacity": 64}})


def make_runner(cfg: ExperimentConfig, seed: int = 0) -> EpisodeRunner:
    targets = for_experiment(cfg).images if cfg.env.conditional else None
    return EpisodeRunner(cfg, make_env(cfg, cfg.actor.num_envs, seed=seed), build_policy(cfg), targets, seed=seed,
                         actor_id="test")


class Parameters:
    """A parameter source that serves one snapshot, or fails while ``failing``."""

    def __init__(self, snapshot: ParameterSnapshot) -> None:
        self.snapshot = snapshot
        self.failing = False
        self.fetches: list[int] = []

    def fetch(self, have_version: int) -> ParameterSnapshot | None:
        self.fetches.append(have_version)
        if self.failing:
            raise Unavailable("the learner is down")
        return self.snapshot if self.snapshot.version != have_version else None


class Sink:
    """An unroll and render sink that raises the queued errors, then accepts."""

    def __init__(self) -> None:
        self.errors: list[PeerFailure] = []
        self.unrolls: list[Unroll] = []
        self.renders: list[np.ndarray] = []

    def submit(self, unroll: Unroll) -> int | None:
        if self.errors:
            raise self.errors.pop(0)
        self.unrolls.append(unroll)
        return 41

    def insert(self, renders: np.ndarray, targets: np.ndarray | None, policy_version: int, actor_id: str) -> int:
        if self.errors:
            raise self.errors.pop(0)
        self.renders.append(renders)
        return len(self.renders)


def test_the_drop_rules(cfg: ExperimentConfig) -> None:
    runner = make_runner(cfg)
    parameters = Parameters(snapshot_of(build_policy(cfg), 40))
    unrolls, renders = Sink(), Sink()
    actor = Actor(runner, ActorPeers(parameters, unrolls, renders), 0, "test", threading.Event(),
                  parameter_refresh_seconds=3600)

    assert actor.act_once() is not None
    assert runner.policy_version == 40 and parameters.fetches == [-1]
    assert len(unrolls.unrolls) == 1 and len(renders.renders) == 1 and actor.stats.learner_version == 41

    unrolls.errors.append(Refused("too old", stale=True))  # stale: dropped, parameters refetched at once
    actor.act_once()
    assert actor.stats.unrolls_dropped == 1 and parameters.fetches == [-1, 40]
    unrolls.errors.append(Refused("unknown head"))  # another refusal: dropped, no refetch
    unrolls.errors.append(Unavailable("learner down past the deadline"))
    actor.act_once()
    actor.act_once()
    assert actor.stats.unrolls_dropped == 3 and parameters.fetches == [-1, 40]
    renders.errors.append(Unavailable("replay buffer down"))
    actor.act_once()
    assert actor.stats.renders_dropped == cfg.actor.num_envs and len(renders.renders) == 4
    assert actor.stats.unrolls_sent == 2 and actor.stats.episodes == 5 * cfg.actor.num_envs
    dropped = {(to, reason): REGISTRY.get_sample_value("spiral_actor_dropped_episodes_total", {
        "member": "0", "actor": "test", "to": to, "reason": reason}) for to, reason in (
        ("learner", "stale"), ("learner", "refused"), ("learner", "unreachable"), ("replay", "unreachable"))}
    assert dropped == {key: cfg.actor.num_envs for key in dropped}  # each drop counted in episodes, by reason

    parameters.failing = True  # a failed refresh keeps the parameters held and acting goes on
    actor.refresh_parameters(force=True)
    assert actor.has_parameters and runner.policy_version == 40


def test_before_the_first_parameters_the_loop_waits_and_goes_round(cfg: ExperimentConfig) -> None:
    parameters = Parameters(snapshot_of(build_policy(cfg), 3))
    parameters.failing = True
    stop = threading.Event()
    stop.set()  # the wait after a failed first refresh returns at once
    actor = Actor(make_runner(cfg), ActorPeers(parameters, Sink(), Sink()), 0, "test", stop)
    assert actor.act_once() is None and not actor.has_parameters and actor.stats.episodes == 0
    beats: list[int] = []
    assigned: list[Actor] = []
    actor.stop = threading.Event()
    parameters.failing = False

    def before_each(a: Actor) -> bool:
        assigned.append(a)
        if len(assigned) == 3:
            a.stop.set()
        return len(assigned) > 1  # no member to serve on the first round

    actor.run(beat=lambda: beats.append(1), before_each=before_each)
    assert len(beats) == 3 and actor.stats.episodes == 2 * cfg.actor.num_envs


def _deliveries(actor: Actor, learner: PolicyLearner, table: ReplayTable, episodes: int) -> tuple[int, int, int]:
    for _ in range(episodes):
        assert actor.act_once() is not None
    return actor.stats.unrolls_sent, learner.queue.depth, table.info().size


def test_the_same_loop_in_one_process_and_against_real_servers(cfg: ExperimentConfig, tmp_path: Path) -> None:
    episodes = 3
    # In process: the peers are the learner itself and the table.
    learner = PolicyLearner(cfg, tmp_path / "local")
    table = ReplayTable(cfg.replay.capacity, cfg.replay.min_size, seed=0)
    local = Actor(make_runner(cfg), ActorPeers(learner, learner, LocalRenders(table)), 0, "local", threading.Event())
    in_process = _deliveries(local, learner, table, episodes)
    learner.close()

    # Over gRPC: the same classes behind their real servers, reached through the actor's own peers.
    learner = PolicyLearner(cfg, tmp_path / "remote")
    table = ReplayTable(cfg.replay.capacity, cfg.replay.min_size, seed=0)
    learner_server = build_server([PolicyLearnerServicer(learner).binding()], "127.0.0.1:0", cfg.services)
    replay = ReplayBufferServicer(table, experiment_image_shape(cfg), conditional=cfg.env.conditional)
    replay_server = build_server([replay.binding()], "127.0.0.1:0", cfg.services)
    learner_server.start()
    replay_server.start()
    stop = threading.Event()
    remote = Actor(make_runner(cfg), connect_member(cfg, 0, learner_server.address, replay_server.address, stop),
                   0, "remote", stop)
    restarts = lambda: REGISTRY.get_sample_value("spiral_learner_actor_restarts_total", {"member": "0"}) or 0.0  # noqa: E731
    try:
        over_grpc = _deliveries(remote, learner, table, episodes)
        # The same actor restarted: new peers carry a new run id, and the learner notices.
        before = restarts()
        remote.use_peers(0, connect_member(cfg, 0, learner_server.address, replay_server.address, stop))
        assert remote.act_once() is not None
        assert restarts() == before + 1
    finally:
        remote.close()
        learner_server.stop(grace=0.5)
        replay_server.stop(grace=0.5, on_stopping=table.close)
        learner.close()
    n = cfg.actor.num_envs
    assert in_process == over_grpc == (episodes, episodes * n, episodes * n)


def test_the_learner_notices_an_actor_restart_by_its_run_id(cfg: ExperimentConfig, tmp_path: Path) -> None:
    learner = PolicyLearner(cfg, tmp_path)
    assert not learner.observe_actor_run("a", "run-1")  # first seen
    assert not learner.observe_actor_run("a", "run-1")
    assert not learner.observe_actor_run("b", "run-9")
    assert learner.observe_actor_run("a", "run-2")  # a new incarnation of a
    assert not learner.observe_actor_run("a", "")  # no run id: nothing to compare
    learner.close()


def test_the_local_system_trains_and_resumes_from_its_checkpoints(cfg: ExperimentConfig, tmp_path: Path) -> None:
    # Refresh before every episode, so what the actors act with does not depend on the clock.
    cfg = dataclasses.replace(cfg, actor=dataclasses.replace(cfg.actor, parameter_refresh_seconds=0.0))
    system = LocalSystem(cfg, tmp_path, num_actors=2)
    for _ in range(6):
        system.step()
    assert system.frames == 6 * 2 * cfg.actor.num_envs * (cfg.env.episode_length - 1)
    assert system.learner.updates == 6 * 2 * cfg.actor.num_envs // cfg.learner.batch_size
    assert system.discriminator.updates > 0 and system.learner.discriminator_version > 0
    assert all(actor.runner.policy_version > 0 for actor in system.actors)  # they act with trained weights
    versions = (system.learner.version, system.discriminator.version)
    system.checkpoint()
    system.close()
    resumed = LocalSystem(cfg, tmp_path, num_actors=1)
    assert (resumed.learner.version, resumed.discriminator.version) == versions
    resumed.close()


def test_prior_programs_go_to_the_learner_s_pool_over_grpc_and_never_to_the_discriminator(
        cfg: ExperimentConfig, tmp_path: Path) -> None:
    recovering = load_experiment("experiments/tiny.yaml", {
        "actor": {"num_envs": 2, "prior_share": 0.5}, "learner": {"batch_size": 4, "hindsight_weight": 0.1, "compile": False},
        "replay": {"min_size": 2, "capacity": 64}})
    learner = PolicyLearner(recovering, tmp_path / "learner")
    table = ReplayTable(recovering.replay.capacity, recovering.replay.min_size, seed=0)
    learner_server = build_server([PolicyLearnerServicer(learner).binding()], "127.0.0.1:0", recovering.services)
    replay = ReplayBufferServicer(table, experiment_image_shape(recovering), conditional=True)
    replay_server = build_server([replay.binding()], "127.0.0.1:0", recovering.services)
    learner_server.start()
    replay_server.start()
    stop = threading.Event()
    actor = Actor(make_runner(recovering), connect_member(recovering, 0, learner_server.address,
                                                         replay_server.address, stop), 0, "mixed", stop)
    try:
        for _ in range(8):
            assert actor.act_once() is not None
        s = actor.stats
        assert 0 < s.prior_episodes < s.episodes and s.unrolls_sent == 8
        assert learner.queue.depth == s.episodes - s.prior_episodes  # the policy's episodes queue for training
        pool = learner.prior_pool.newest()
        assert pool is not None and pool.prior and pool.batch_size == min(s.prior_episodes, 16)
        assert (pool.targets == pool.final_canvases).all()
        assert table.info().size == s.episodes - s.prior_episodes  # the discriminator sees only the policy's
        record = learner.step(timeout=1.0)
        assert record["recovery_episodes"] == 4 + pool.batch_size and record["recovery_loss"] > 0
    finally:
        actor.close()
        learner_server.stop(grace=0.5)
        replay_server.stop(grace=0.5, on_stopping=table.close)
        learner.close()


def test_a_learner_without_program_recovery_refuses_prior_programs(cfg: ExperimentConfig, tmp_path: Path) -> None:
    learner = PolicyLearner(cfg, tmp_path)
    unroll = dataclasses.replace(make_runner(cfg).run_prior_episode(), actor_id="a")
    with pytest.raises(Refused, match="hindsight_weight is 0") as refused:
        learner.submit(unroll)
    assert not refused.value.stale and learner.queue.depth == 0
    learner.close()


def test_a_submit_stream_cancelled_mid_way_counts_as_cancelled_and_keeps_what_it_queued(
        cfg: ExperimentConfig, tmp_path: Path) -> None:
    import grpc

    from spiral.envs import action_spec_for
    from spiral.rpc.client import make_channel
    from spiral.rpc.messages import encode_unroll
    from spiral.v1 import learner_pb2_grpc

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def handled(code: str) -> float:
        return value("spiral_grpc_server_handled_total", service="spiral.v1.PolicyLearner", method="SubmitUnrolls",
                     code=code)

    def wait_until(predicate, what: str) -> None:  # noqa: ANN001
        for _ in range(200):
            if predicate():
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"timed out waiting until {what}")

    learner = PolicyLearner(cfg, tmp_path)
    server = build_server([PolicyLearnerServicer(learner).binding()], "127.0.0.1:0", cfg.services)
    server.start()
    message = encode_unroll(make_runner(cfg).run_episode(), action_spec_for(cfg).names, run_id="r1")
    release = threading.Event()

    def requests():  # noqa: ANN202 - one unroll, then the stream stays open
        yield message
        release.wait(30)

    before = {name: value(name, member="0") for name in ("spiral_learner_trajectories_total",
                                                          "spiral_learner_unacknowledged_unrolls_total")}
    cancelled_before, ok_before, unknown_before = handled("CANCELLED"), handled("OK"), handled("UNKNOWN")
    channel = make_channel(server.address, cfg.services)
    try:
        future = learner_pb2_grpc.PolicyLearnerStub(channel).SubmitUnrolls.future(requests(), timeout=30)
        wait_until(lambda: value("spiral_learner_trajectories_total", member="0")
                   > before["spiral_learner_trajectories_total"], "the learner queued the unroll")
        assert future.cancel()
        release.set()
        wait_until(lambda: handled("CANCELLED") + handled("OK") + handled("UNKNOWN")
                   > cancelled_before + ok_before + unknown_before, "the server counted the call")
        assert future.code() == grpc.StatusCode.CANCELLED
        unacknowledged = value("spiral_learner_unacknowledged_unrolls_total", member="0") - \
            before["spiral_learner_unacknowledged_unrolls_total"]
        outcome = (handled("CANCELLED") - cancelled_before, handled("OK") - ok_before,
                   handled("UNKNOWN") - unknown_before, unacknowledged)
        # What it queued stays queued. Counted as CANCELLED, the unroll is unacknowledged; gRPC
        # Python may instead end the stream as if it had been finished (OK, a summary nobody reads).
        assert outcome in ((1, 0, 0, 1), (0, 1, 0, 0)), outcome
        assert learner.queue.depth == cfg.actor.num_envs
    finally:
        channel.close()
        server.stop(grace=0.5)
        learner.close()
