"""The PBT controller over real gRPC: reports and directives, lineage, restart, actors, refusals,
and the real ``spiral pbt-controller`` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from pbt_controller.controller import Controller
from pbt_controller.discovery import StaticDiscovery
from pbt_controller.service import SERVICE, PBTControllerServicer
from pbt_controller.state import StateStore
from spiral.config import PBTConfig, ServicesConfig, dump_experiment, load_experiment
from spiral.runtime.members import MemberAddresses, load_members_file, write_members_file
from spiral.rpc.server import SpiralServer, build_server
from spiral.v1 import pbt_pb2, pbt_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
CFG = PBTConfig(population_size=4, ready_updates=10, truncation_fraction=0.25, report_every_updates=5)
DEFAULT_HP = {"learning_rate": 3e-4, "entropy_cost": 0.01}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def addresses(n: int) -> dict[int, MemberAddresses]:
    return {i: MemberAddresses(i, f"learner-{i}:1", f"disc-{i}:2", f"replay-{i}:3") for i in range(n)}


def metric(sample: str, /, **labels: str) -> float:
    value = REGISTRY.get_sample_value(sample, labels)
    return 0.0 if value is None else value


class Clock:
    """A settable Unix clock (to expire actors without sleeping)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Running:
    """A controller served on a free port, with a stub."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.server: SpiralServer = build_server([PBTControllerServicer(controller).binding()], "127.0.0.1:0",
                                                 ServicesConfig())
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pbt_pb2_grpc.PBTControllerStub(self.channel)

    def report(self, member: int, updates: int, fitness: float, hp: dict[str, float],
               version: int | None = None) -> pbt_pb2.Directive:
        return self.stub.Report(pbt_pb2.FitnessReport(member=member, updates=updates, fitness=fitness,
                                                      policy_version=updates if version is None else version,
                                                      hyperparameters=hp), timeout=10)

    def assign(self, actor: str, previous: int = -1) -> pbt_pb2.Assignment:
        return self.stub.AssignActor(pbt_pb2.AssignRequest(actor_id=actor, previous_member=previous), timeout=10)

    def population(self) -> list[pbt_pb2.MemberStatus]:
        return list(self.stub.Population(pbt_pb2.PopulationRequest(), timeout=10).members)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def start(run_dir: Path, clock: Clock, population: int = 4, cfg: PBTConfig = CFG, seed: int = 3) -> Running:
    controller = Controller(cfg, population, StateStore(run_dir / "pbt"), StaticDiscovery(addresses(population)),
                            actor_timeout=60.0, seed=seed, clock=clock)
    return Running(controller)


@pytest.fixture
def running(tmp_path: Path, clock: Clock) -> Iterator[Running]:
    r = start(tmp_path, clock)
    yield r
    r.close()


def test_bad_member_copies_the_best_and_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    r = start(tmp_path, clock)
    sampled = {m.member: dict(m.hyperparameters) for m in r.population()}
    assert len({tuple(sorted(h.items())) for h in sampled.values()}) == 4  # each member its own
    # First reports (5 updates, config defaults): continue, and adopt the sampled values.
    for member in range(4):
        d = r.report(member, 5, 0.0, DEFAULT_HP)
        assert d.action == pbt_pb2.Directive.CONTINUE
        assert dict(d.hyperparameters) == pytest.approx(sampled[member])
    exploits_before = metric("spiral_pbt_exploits_total", member="3")
    explores_before = metric("spiral_pbt_explores_total", member="3")
    # 15 updates after adopting them all are ready; member 3 is far worse than the rest.
    for member, fitness in ((0, 1.0), (1, 2.0), (2, 3.0)):
        d = r.report(member, 20, fitness, sampled[member], version=100 + member)
        assert d.action == pbt_pb2.Directive.CONTINUE, d.reason
    d = r.report(3, 20, -5.0, sampled[3])
    assert d.action == pbt_pb2.Directive.EXPLOIT, d.reason
    assert d.donor_member == 2 and d.donor_version == 102  # the top member (k = 1 of 4)
    explored = dict(d.hyperparameters)
    assert explored != sampled[2] and set(explored) == set(sampled[2])
    for name, value in explored.items():
        low, high = CFG.learning_rate_range if name == "learning_rate" else CFG.entropy_cost_range
        assert low <= value <= high
    assert metric("spiral_pbt_exploits_total", member="3") == exploits_before + 1
    assert metric("spiral_pbt_explores_total", member="3") == explores_before + 1
    assert metric("spiral_pbt_fitness", member="3") == -5.0
    assert metric("spiral_pbt_hyperparameter", member="3", name="learning_rate") == explored["learning_rate"]
    status = {m.member: m for m in r.population()}
    assert status[3].exploits == 1 and dict(status[3].hyperparameters) == explored and status[3].reported
    assert status[2].fitness == 3.0 and status[2].updates == 20 and status[2].policy_version == 102
    # Just exploited: not ready, so it continues with the explored values even if still bad.
    d = r.report(3, 25, -4.0, explored)
    assert d.action == pbt_pb2.Directive.CONTINUE and "not ready" in d.reason
    assert dict(d.hyperparameters) == explored

    lineage = r.controller.store.lineage()
    assert [e["event"] for e in lineage] == ["start"] * 4 + ["exploit", "explore"]
    exploit, explore_row = lineage[4], lineage[5]
    assert exploit["member"] == 3 and exploit["donor"] == 2 and exploit["fitness"] == -5.0
    assert exploit["hyperparameters_before"] == pytest.approx(sampled[3])
    assert exploit["hyperparameters_after"] == pytest.approx(sampled[2])
    assert explore_row["hyperparameters_after"] == pytest.approx(explored)
    assert len(r.controller.store.reports()) == 9
    r.controller.write_plot()
    assert r.controller.store.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Restart: a new controller and server on the same run directory lose nothing.
    rng_state = r.controller._rng.getstate()  # noqa: SLF001 - the random sequence must continue
    before = {m.member: (m.fitness, m.updates, m.exploits, dict(m.hyperparameters)) for m in r.population()}
    r.close()
    r2 = start(tmp_path, clock, seed=999)
    try:
        assert r2.controller.restored
        assert {m.member: (m.fitness, m.updates, m.exploits, dict(m.hyperparameters)) for m in r2.population()} \
            == before
        assert r2.controller._rng.getstate() == rng_state  # noqa: SLF001
        assert [e["event"] for e in r2.controller.store.lineage()] == ["start"] * 4 + ["exploit", "explore"]
        # It carries on: member 3 is still not ready 5 updates after its exploit.
        assert r2.report(3, 29, -4.0, explored).action == pbt_pb2.Directive.CONTINUE
        assert (tmp_path / "pbt" / "state.json").exists()
    finally:
        r2.close()


def test_a_failed_exploit_is_recorded_and_the_member_keeps_its_own_hyperparameters(tmp_path: Path,
                                                                                    clock: Clock) -> None:
    r = start(tmp_path, clock)
    try:
        sampled = {m.member: dict(m.hyperparameters) for m in r.population()}
        for member in range(4):
            r.report(member, 5, 0.0, DEFAULT_HP)
        for member, fitness in ((0, 1.0), (1, 2.0), (2, 3.0)):
            r.report(member, 20, fitness, sampled[member])
        d = r.report(3, 20, -5.0, sampled[3])
        assert d.action == pbt_pb2.Directive.EXPLOIT
        failed_before = metric("spiral_pbt_failed_exploits_total", member="3")
        # The donor was unreachable: member 3 trained on with its own weights and values.
        d = r.stub.Report(pbt_pb2.FitnessReport(member=3, updates=21, fitness=-5.0, policy_version=21,
                                                hyperparameters=sampled[3], exploit_failed=True,
                                                failed_donor=d.donor_member), timeout=10)
        assert d.action == pbt_pb2.Directive.CONTINUE
        assert dict(d.hyperparameters) == pytest.approx(sampled[3]), "the controller takes the member's values back"
        assert metric("spiral_pbt_failed_exploits_total", member="3") == failed_before + 1
        lineage = r.controller.store.lineage()
        assert [e["event"] for e in lineage][-3:] == ["exploit", "explore", "exploit_failed"]
        failed = lineage[-1]
        assert failed["member"] == 3 and failed["donor"] == 2
        assert failed["hyperparameters_before"] == pytest.approx(lineage[-2]["hyperparameters_after"])
        assert failed["hyperparameters_after"] == pytest.approx(sampled[3])
        assert dict({m.member: m for m in r.population()}[3].hyperparameters) == pytest.approx(sampled[3])
    finally:
        r.close()


def test_actors_are_balanced_and_rebalanced_after_a_timeout(tmp_path: Path, clock: Clock) -> None:
    r = start(tmp_path, clock, population=2)
    try:
        got = {f"a{i}": r.assign(f"a{i}") for i in range(5)}
        assert [got[f"a{i}"].member for i in range(5)] == [0, 1, 0, 1, 0]
        assert got["a1"].learner_address == "learner-1:1" and got["a1"].replay_address == "replay-1:3"
        assert got["a1"].discriminator_address == "disc-1:2"
        assert [m.actors for m in r.population()] == [3, 2]
        assert metric("spiral_pbt_actors", member="0") == 3
        # Heartbeats keep assignments; the m0 actors stay alive, a1 and a3 go silent.
        clock.now += 30
        assert [r.assign(a).member for a in ("a0", "a2", "a4")] == [0, 0, 0]
        clock.now += 31
        assert [m.actors for m in r.population()] == [3, 0]  # a1, a3 forgotten
        moved = [r.assign(a).member for a in ("a0", "a2", "a4")]
        assert moved == [1, 0, 0]
        assert [m.actors for m in r.population()] == [2, 1]
        assert metric("spiral_pbt_actors", member="1") == 1
        # A new actor that served member 1 before (e.g. the controller lost it) goes back there.
        assert r.assign("b", previous=1).member == 1
        # Assignments survive a restart.
        actors = r.controller.actors()
        r.close()
        r = start(tmp_path, clock, population=2)
        assert r.controller.actors() == actors
        assert r.assign("a2").member == actors["a2"]
    finally:
        r.close()


def test_invalid_requests_are_refused(running: Running, tmp_path: Path, clock: Clock) -> None:
    bad = [(7, 10, 1.0, DEFAULT_HP, "member"), (-1, 10, 1.0, DEFAULT_HP, "member"),
           (0, 10, float("nan"), DEFAULT_HP, "fitness"), (0, 10, float("inf"), DEFAULT_HP, "fitness"),
           (0, 10, 1.0, {"momentum": 0.9}, "momentum"), (0, 10, 1.0, {"learning_rate": float("nan")}, "learning_rate"),
           (0, -1, 1.0, DEFAULT_HP, "updates")]
    rejected_before = metric("spiral_rejected_messages_total", service=SERVICE, reason="nonfinite")
    for member, updates, fitness, hp, word in bad:
        with pytest.raises(grpc.RpcError) as info:
            running.report(member, updates, fitness, hp)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert word in info.value.details()
    assert metric("spiral_rejected_messages_total", service=SERVICE, reason="nonfinite") == rejected_before + 2
    assert not any(m.reported for m in running.population())  # nothing recorded
    assert running.controller.store.reports() == []
    for actor, previous in (("", -1), ("a", -2)):
        with pytest.raises(grpc.RpcError) as info:
            running.assign(actor, previous)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # No member addresses known: actors are told to come back later.
    lonely = Running(Controller(CFG, 2, StateStore(tmp_path / "other"), StaticDiscovery({}), clock=clock))
    try:
        with pytest.raises(grpc.RpcError) as info:
            lonely.assign("a")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        lonely.close()


def test_a_population_of_one_always_continues(tmp_path: Path, clock: Clock) -> None:
    r = start(tmp_path, clock, population=1)
    try:
        for updates in (5, 500, 5000):
            assert r.report(0, updates, -1e6, DEFAULT_HP).action == pbt_pb2.Directive.CONTINUE
    finally:
        r.close()


# -------------------------------------------------------------------------------------------
# The real process
# -------------------------------------------------------------------------------------------


def _start_process(tmp_path: Path, address: str, metrics_port: int, population: int = 1) -> subprocess.Popen[bytes]:
    members = write_members_file(tmp_path / "members.json", addresses(population).values())
    config = tmp_path / "experiment.yaml"  # the population size lives in the experiment, nowhere else
    dump_experiment(load_experiment(REPO / "experiments" / "tiny.yaml", {"pbt": {"population_size": population}}),
                    config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(tmp_path / "pbt.log", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "spiral.commands.cli", "pbt-controller", "--config", str(config),
             "--members", str(members), "--listen", address,
             "--metrics-port", str(metrics_port), "--run-dir", str(tmp_path / "run")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_serving(channel: grpc.Channel, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    health = health_pb2_grpc.HealthStub(channel)
    while True:
        assert process.poll() is None, "the controller exited during start-up:\n" + log.read_text()
        try:
            if health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "not SERVING within 60 s:\n" + log.read_text()
        time.sleep(0.2)


def test_pbt_controller_process_serves_and_exits_cleanly(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "pbt.log"
    process = _start_process(tmp_path, address, metrics_port)
    assert load_members_file(tmp_path / "members.json")[0].learner_address == "learner-0:1"
    try:
        with grpc.insecure_channel(address) as channel:
            _wait_serving(channel, process, log)
            stub = pbt_pb2_grpc.PBTControllerStub(channel)
            d = stub.Report(pbt_pb2.FitnessReport(member=0, updates=20, fitness=-0.5, hyperparameters=DEFAULT_HP),
                            timeout=10)
            assert d.action == pbt_pb2.Directive.CONTINUE and set(d.hyperparameters) == set(DEFAULT_HP)
            assert stub.AssignActor(pbt_pb2.AssignRequest(actor_id="x", previous_member=-1), timeout=10).member == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'spiral_pbt_fitness{member="0"} -0.5' in text
        assert 'spiral_pbt_actors{member="0"} 1.0' in text
    except BaseException:
        process.kill()
        process.wait()
        print(log.read_text())
        raise
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=60) == 0, log.read_text()
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("no exit after SIGTERM:\n" + log.read_text()) from None
    pbt_dir = tmp_path / "run" / "pbt"
    state = json.loads((pbt_dir / "state.json").read_text())
    assert state["members"][0]["fitness"] == -0.5 and state["actors"]["x"]["member"] == 0
    assert (pbt_dir / "lineage.jsonl").read_text().count('"start"') == 1
    assert (pbt_dir / "reports.jsonl").exists() and (pbt_dir / "population.png").exists()


def test_killed_controller_restarts_without_losing_members_or_lineage(tmp_path: Path) -> None:
    """SIGKILL (no shutdown hook) right after an exploit; the restarted process knows it all."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "pbt.log"
    process = _start_process(tmp_path, address, 0, population=2)
    try:
        with grpc.insecure_channel(address) as channel:
            _wait_serving(channel, process, log)
            stub = pbt_pb2_grpc.PBTControllerStub(channel)
            ready = 100  # experiments/tiny.yaml keeps the default pbt.ready_updates
            for member, fitness in ((0, 1.0), (1, 0.0)):
                stub.Report(pbt_pb2.FitnessReport(member=member, updates=0, fitness=fitness), timeout=10)
            d = None
            for member, fitness in ((0, 1.0), (1, 0.0)):
                d = stub.Report(pbt_pb2.FitnessReport(member=member, updates=ready, fitness=fitness), timeout=10)
            assert d is not None and d.action == pbt_pb2.Directive.EXPLOIT and d.donor_member == 0
            before = stub.Population(pbt_pb2.PopulationRequest(), timeout=10)
        process.kill()
        process.wait()
        process = _start_process(tmp_path, address, 0, population=2)
        with grpc.insecure_channel(address) as channel:
            _wait_serving(channel, process, log)
            after = pbt_pb2_grpc.PBTControllerStub(channel).Population(pbt_pb2.PopulationRequest(), timeout=10)
        assert after == before and after.members[1].exploits == 1
        events = [json.loads(line)["event"] for line in (tmp_path / "run" / "pbt" / "lineage.jsonl").open()]
        assert events == ["start", "start", "exploit", "explore"]
    finally:
        process.kill()
        process.wait()


def test_a_member_whose_donor_is_unreachable_keeps_training_and_tells_the_controller(tmp_path: Path,
                                                                                     clock: Clock) -> None:
    from learner.learner import PolicyLearner
    from learner.population import PopulationMember
    from spiral.config import load_experiment

    cfg = load_experiment(REPO / "experiments" / "tiny.yaml")
    r = start(tmp_path, clock, population=2, cfg=PBTConfig(population_size=2, ready_updates=1,
                                                           truncation_fraction=0.5, report_every_updates=1))
    learner = PolicyLearner(cfg, tmp_path / "member-1", member=1)
    member = PopulationMember(learner, 1, r.server.address, fitness=lambda _learner: -5.0)
    try:
        before = dict(learner.hyperparameters)
        dead_donor = f"127.0.0.1:{free_port()}"
        member.apply(pbt_pb2.Directive(action=pbt_pb2.Directive.EXPLOIT, donor_member=0,
                                       donor_learner_address=dead_donor, donor_discriminator_address=dead_donor,
                                       hyperparameters={"learning_rate": 1e-5, "entropy_cost": 0.05}))
        assert member.failed_exploits == 1 and member.exploits == 0
        assert learner.hyperparameters == before, "no weights copied, so no donor hyperparameters either"
        member.maybe_report()  # due at once
        events = [(e["event"], e["member"], e.get("donor")) for e in r.controller.store.lineage()]
        assert events[-1] == ("exploit_failed", 1, 0)
        member.maybe_report()
        assert [e["event"] for e in r.controller.store.lineage()].count("exploit_failed") == 1, "said once"
    finally:
        member.close()
        r.close()


def test_the_remote_controller_peer_reports_and_assigns_actors(running: Running) -> None:
    from spiral.rpc.peers import RemotePBTController

    sampled = {m.member: dict(m.hyperparameters) for m in running.population()}
    with RemotePBTController(running.server.address, ServicesConfig()) as controller:
        directive = controller.report(2, updates=5, policy_version=5, fitness=-0.25, hyperparameters=DEFAULT_HP)
        assert directive.action == pbt_pb2.Directive.CONTINUE
        assert dict(directive.hyperparameters) == pytest.approx(sampled[2])
        status = {m.member: m for m in running.population()}[2]
        assert status.reported and status.fitness == -0.25 and status.updates == 5
        first = controller.assign_actor("a0", None)
        assert 0 <= first.member < 4 and first.learner_address == f"learner-{first.member}:1"
        assert first.replay_address == f"replay-{first.member}:3"
        assert controller.assign_actor("a0", first.member).member == first.member, "a heartbeat keeps its member"


def test_a_failed_exploit_reaches_the_controller_through_the_peer(running: Running) -> None:
    from spiral.rpc.peers import RemotePBTController

    with RemotePBTController(running.server.address, ServicesConfig()) as controller:
        controller.report(1, updates=5, policy_version=5, fitness=0.0, hyperparameters=DEFAULT_HP, failed_donor=3)
    events = [(e["event"], e["member"], e.get("donor")) for e in running.controller.store.lineage()]
    assert ("exploit_failed", 1, 3) in events


def test_the_remote_controller_peer_raises_typed_errors_and_never_retries(running: Running) -> None:
    from spiral.rpc.peers import PeerRejected, PeerUnavailable, RemotePBTController

    with RemotePBTController(running.server.address, ServicesConfig()) as controller:
        with pytest.raises(PeerRejected, match="member"):
            controller.report(7, updates=5, policy_version=5, fitness=0.0, hyperparameters=DEFAULT_HP)
        with pytest.raises(PeerRejected):
            controller.assign_actor("", None)
    assert not any(m.reported for m in running.population())
    retries_before = metric("spiral_actor_rpc_retries_total", member="0", peer="pbt-controller")
    down = RemotePBTController(f"127.0.0.1:{free_port()}", ServicesConfig(), call_timeout=5.0,
                               retry_labels=("0", "pbt-controller"))
    with down, pytest.raises(PeerUnavailable) as info:
        down.report(0, updates=0, policy_version=0, fitness=0.0, hyperparameters=DEFAULT_HP)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.method == "Report"
    assert metric("spiral_actor_rpc_retries_total", member="0", peer="pbt-controller") == retries_before, \
        "a controller that is down fails the call once; the caller asks again at its next turn"
