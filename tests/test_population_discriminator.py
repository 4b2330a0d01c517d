"""SPIRAL++'s population discriminator (``pbt.shared_discriminator``), unit level.

One discriminator and one replay buffer (member 0's) serve a whole population: ``spiral up``
plans one of each and points every member at them, the members file and Kubernetes discovery
say the same, the shared services accept every member (and only the population's), and an
exploit copies no discriminator. Nothing here starts a process; the multi-process check is
``tests/test_population_shared.py`` (slow).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from pbt_controller.controller import Controller
from pbt_controller.discovery import PodInfo, StaticDiscovery, members_from_pods
from pbt_controller.service import PBTControllerServicer
from pbt_controller.state import StateStore
from replaybuffer.service import ReplayBufferServicer
from replaybuffer.table import ReplayTable
from spiral.agent.training_state import CopyRequest
from spiral.config import ExperimentConfig, PBTConfig, ServicesConfig
from spiral.runtime.members import MemberAddresses, load_members_file
from spiral.rpc.errors import PreconditionFailed
from spiral.rpc.peers import PeerRejected, RemoteRenderSink
from spiral.rpc.publish import ParameterPublisher
from spiral.rpc.server import build_server
from spiral.runtime.service_options import add_service_arguments, parse_switch, resolve_service_options
from spiral.commands.layout import plan_layout
from spiral.v1 import parameters_pb2, pbt_pb2

SHAPE = (8, 8, 1)


def population_cfg(population: int, shared: bool) -> ExperimentConfig:
    cfg = ExperimentConfig()
    return dataclasses.replace(cfg, pbt=dataclasses.replace(cfg.pbt, population_size=population,
                                                            shared_discriminator=shared))


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# -- the switch ---------------------------------------------------------------------------------

def test_served_members_is_the_population_only_when_shared() -> None:
    assert PBTConfig(population_size=4).served_members(2) == {2}
    assert PBTConfig(population_size=4, shared_discriminator=True).served_members(0) == {0, 1, 2, 3}
    # A population of one: the switch changes nothing.
    assert PBTConfig(population_size=1, shared_discriminator=True).served_members(0) == {0}


def test_the_switch_comes_from_the_environment_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    monkeypatch.delenv("SPIRAL_SHARED_DISCRIMINATOR", raising=False)
    def shared(*flags: str) -> bool:
        return resolve_service_options("learner", parser.parse_args(["--config", "tiny", *flags])).config.pbt \
            .shared_discriminator

    assert not shared()
    monkeypatch.setenv("SPIRAL_SHARED_DISCRIMINATOR", "true")
    assert shared()
    assert not shared("--no-shared-discriminator"), "the flag wins over the variable"
    monkeypatch.setenv("SPIRAL_SHARED_DISCRIMINATOR", "maybe")
    with pytest.raises(SystemExit, match="SPIRAL_SHARED_DISCRIMINATOR.*must be true or false"):
        resolve_service_options("learner", parser.parse_args(["--config", "tiny"]))
    assert parse_switch("Yes", "x") is True and parse_switch("0", "x") is False and parse_switch(None, "x") is None


# -- spiral up ----------------------------------------------------------------------------------

def test_plan_layout_shares_member_0s_discriminator_and_replay_buffer(tmp_path: Path) -> None:
    population, actors = 3, 2
    layout = plan_layout(population_cfg(population, True), tmp_path / "config.yaml", tmp_path, actors, population)
    (discriminator,) = layout.of_role("discriminator")
    (replay,) = layout.of_role("replaybuffer")
    assert discriminator.member == replay.member == 0
    assert [p.member for p in layout.of_role("learner")] == list(range(population))
    assert len(layout.of_role("actor")) == population * actors
    assert len(layout.of_role("pbt-controller")) == 1
    assert flag(discriminator.args, "--replay-address") == replay.grpc_address
    for spec in layout.of_role("learner") + layout.of_role("actor"):
        assert flag(spec.args, "--discriminator-address") == discriminator.grpc_address, spec.name
        assert flag(spec.args, "--replay-address") == replay.grpc_address, spec.name
        assert flag(spec.args, "--learner-address") == layout.address_of("learner", spec.member), spec.name
        assert flag(spec.args, "--member") == str(spec.member)
    assert all("--shared-discriminator" in p.args for p in layout.processes), "every service knows"
    # The controller's members file: own learners, the one discriminator and replay buffer.
    members = load_members_file(tmp_path / "members.json")
    assert sorted(members) == list(range(population))
    for m, addresses in members.items():
        assert addresses == MemberAddresses(m, layout.address_of("learner", m), discriminator.grpc_address,
                                            replay.grpc_address)
    assert layout.members == [members[m] for m in range(population)]
    (controller,) = layout.of_role("pbt-controller")
    assert flag(controller.args, "--members") == str(tmp_path / "members.json")
    addresses = [p.grpc_address for p in layout.processes if p.grpc_address]
    assert len(addresses) == len(set(addresses)), "one port per server"


def test_plan_layout_without_the_switch_gives_every_member_its_own(tmp_path: Path) -> None:
    layout = plan_layout(population_cfg(3, False), tmp_path / "config.yaml", tmp_path, 1, 3)
    for role in ("learner", "discriminator", "replaybuffer", "actor"):
        assert [p.member for p in layout.of_role(role)] == [0, 1, 2], role
    for actor in layout.of_role("actor"):
        assert flag(actor.args, "--replay-address") == layout.address_of("replaybuffer", actor.member)
    assert not any("--shared-discriminator" in p.args for p in layout.processes)
    members = load_members_file(tmp_path / "members.json")
    assert len({m.discriminator_address for m in members.values()}) == 3


def test_a_single_member_ignores_the_switch(tmp_path: Path) -> None:
    layout = plan_layout(population_cfg(1, True), tmp_path / "config.yaml", tmp_path, 1, 1)
    assert [p.role for p in layout.processes] == ["replaybuffer", "discriminator", "learner", "actor"]
    assert not (tmp_path / "members.json").exists()


# -- Kubernetes discovery -----------------------------------------------------------------------

def test_kubernetes_discovery_points_every_member_at_ordinal_0_when_shared() -> None:
    pods = [PodInfo(name=f"spiral-learner-{i}", subdomain="spiral-learner") for i in range(3)]
    shared = members_from_pods(pods, "ns", shared=True)
    for m, addresses in shared.items():
        assert addresses.learner_address == f"spiral-learner-{m}.spiral-learner.ns.svc:50051"
        assert addresses.discriminator_address == "spiral-discriminator-0.spiral-discriminator.ns.svc:50052"
        assert addresses.replay_address == "spiral-replaybuffer-0.spiral-replaybuffer.ns.svc:50053"
    own = members_from_pods(pods, "ns")
    assert own[2].discriminator_address == "spiral-discriminator-2.spiral-discriminator.ns.svc:50052"


# -- member checks ------------------------------------------------------------------------------

def test_the_parameter_publisher_answers_the_population_only_when_shared() -> None:
    snapshot = SimpleNamespace(version=5, tensors={"w": np.zeros(2, np.float32)})
    own = ParameterPublisher(lambda: snapshot, member=0)
    request = parameters_pb2.GetParametersRequest(have_version=5, member=2)
    with pytest.raises(PreconditionFailed, match="serves member 0, the request is for member 2"):
        list(own.stream(request))
    shared = ParameterPublisher(lambda: snapshot, member=0, serves=range(4))
    (chunk,) = shared.stream(request)
    assert chunk.version == 5 and chunk.count == 0 and chunk.member == 0
    with pytest.raises(PreconditionFailed, match="shared by members 0-3, the request is for member 4"):
        list(shared.stream(parameters_pb2.GetParametersRequest(have_version=5, member=4)))


@pytest.mark.parametrize("shared", [False, True])
def test_the_replay_buffer_takes_other_members_renders_only_when_shared(shared: bool) -> None:
    table = ReplayTable(capacity=16, min_size=1, seed=0)
    servicer = ReplayBufferServicer(table, SHAPE, conditional=False, member=0,
                                    serves=range(3) if shared else None)
    server = build_server([servicer.binding()], "127.0.0.1:0", ServicesConfig())
    server.start()
    renders = np.zeros((2, *SHAPE), np.uint8)
    try:
        assert RemoteRenderSink(server.address, ServicesConfig(), member=0).insert(renders, None, 0, "a") == 2
        sink = RemoteRenderSink(server.address, ServicesConfig(), member=2)
        if shared:
            assert sink.insert(renders, None, 0, "b") == 4
        else:
            with pytest.raises(PeerRejected) as refused:
                sink.insert(renders, None, 0, "b")
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "serves member 0, the request is for member 2" in refused.value.details
        with pytest.raises(PeerRejected) as unknown:
            RemoteRenderSink(server.address, ServicesConfig(), member=3).insert(renders, None, 0, "c")
        assert unknown.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert ("shared by members 0-2" if shared else "serves member 0") in unknown.value.details
    finally:
        server.stop(grace=0.5, on_stopping=table.close)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class AbortContext:
    """The part of a grpc.ServicerContext the refusal path uses."""

    def peer(self) -> str:
        return "test"

    def time_remaining(self) -> None:
        return None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def _discriminator_servicer(serves: Any) -> Any:
    import torch

    from discriminator.service import DiscriminatorLearnerServicer

    snapshot = SimpleNamespace(version=1, tensors={})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    learner = SimpleNamespace(published=SimpleNamespace(latest=lambda: snapshot),
                              trainer=SimpleNamespace(optimizer=optimizer))
    return DiscriminatorLearnerServicer(learner, member=0, serves=serves)  # type: ignore[arg-type]


def test_a_shared_discriminator_refuses_to_copy_a_donor() -> None:
    from spiral.v1 import discriminator_pb2

    request = discriminator_pb2.LoadFromRequest(donor_address="127.0.0.1:1", donor_member=1, member=0)
    with pytest.raises(Aborted) as refused:
        _discriminator_servicer(range(3)).LoadFrom(request, AbortContext())
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details.startswith("shared: ") and "members 0-2" in refused.value.details
    # Not shared: the ordinary checks (a wrong member is FAILED_PRECONDITION, as on every method).
    with pytest.raises(Aborted) as wrong:
        _discriminator_servicer(None).LoadFrom(
            discriminator_pb2.LoadFromRequest(donor_address="127.0.0.1:1", donor_member=1, member=5), AbortContext())
    assert wrong.value.code == grpc.StatusCode.FAILED_PRECONDITION and "wrong_member" in wrong.value.details


# -- PBT exploit --------------------------------------------------------------------------------

def _controller(tmp_path: Path, shared: bool) -> Controller:
    cfg = PBTConfig(population_size=2, ready_updates=1, truncation_fraction=0.5, report_every_updates=1,
                    shared_discriminator=shared)
    members = {i: MemberAddresses(i, f"learner-{i}:1", "disc-0:2" if shared else f"disc-{i}:2",
                                  "replay-0:3" if shared else f"replay-{i}:3") for i in range(2)}
    return Controller(cfg, 2, StateStore(tmp_path / "pbt"), StaticDiscovery(members), seed=1, clock=lambda: 1.0)


@pytest.mark.parametrize("shared", [False, True])
def test_the_controllers_exploit_names_no_discriminator_to_copy_when_shared(tmp_path: Path, shared: bool) -> None:
    controller = _controller(tmp_path, shared)
    servicer = PBTControllerServicer(controller)

    def report(member: int, updates: int, fitness: float) -> pbt_pb2.Directive:
        hp = controller.state.members[member].hyperparameters
        return servicer.Report(pbt_pb2.FitnessReport(member=member, updates=updates, policy_version=updates,
                                                     fitness=fitness, hyperparameters=hp), None)

    for member in (0, 1):
        assert report(member, 0, 0.0).action == pbt_pb2.Directive.CONTINUE
    assert report(0, 10, 1.0).action == pbt_pb2.Directive.CONTINUE
    directive = report(1, 10, -5.0)
    assert directive.action == pbt_pb2.Directive.EXPLOIT and directive.donor_member == 0
    assert directive.donor_learner_address == "learner-0:1"
    assert directive.donor_discriminator_address == ("" if shared else "disc-0:2")
    (exploit,) = [e for e in controller.store.lineage() if e["event"] == "exploit"]
    assert exploit.get("discriminator") == ("shared" if shared else None)


class FakeDiscriminatorCopy:
    """Stands in for ``request_discriminator_copy`` to this member's discriminator (records the calls)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, donor_address: str, donor_member: int) -> None:
        self.calls.append((donor_address, donor_member))


def member_with_a_donor(monkeypatch: pytest.MonkeyPatch, cfg: ExperimentConfig, donor_version: int,
                        updates: int = 0) -> tuple[Any, list[Any], FakeDiscriminatorCopy]:
    """A PBT member of ``cfg`` over a stand-in learner (its exploit requests recorded) whose
    donor answers ``fetch_training_state`` at ``donor_version``, and its discriminator copies."""
    import learner.population as population

    requested: list[Any] = []
    learner = SimpleNamespace(cfg=cfg, updates=updates, hyperparameters={"learning_rate": 1e-4, "entropy_cost": 0.01},
                              request_copy=lambda tensors, **kwargs: requested.append(CopyRequest(tensors, **kwargs)))
    monkeypatch.setattr(population, "fetch_training_state",
                        lambda *args, **kwargs: SimpleNamespace(tensors={"w": np.zeros(1)}, version=donor_version))
    member = population.PopulationMember(learner, 1, "127.0.0.1:1",  # type: ignore[arg-type]
                                         fitness=lambda _learner: 0.0)
    copies = FakeDiscriminatorCopy()
    member.copy_discriminator = copies
    return member, requested, copies


@pytest.mark.parametrize(("shared", "donor_discriminator", "copies"), [
    (False, "disc-0:2", 1),   # its own discriminator copies the donor's
    (True, "disc-0:2", 0),    # one discriminator for the population: nothing to copy
    (True, "", 0),            # what the controller sends when shared
    (False, "disc-1:2", 0),   # the donor's discriminator is this member's own: never copy into itself
])
def test_an_exploit_skips_the_discriminator_copy_when_shared(monkeypatch: pytest.MonkeyPatch, shared: bool,
                                                             donor_discriminator: str, copies: int) -> None:
    cfg = population_cfg(2, shared)
    cfg = dataclasses.replace(cfg, services=dataclasses.replace(cfg.services, discriminator_address="disc-1:2"))
    member, requested, stub = member_with_a_donor(monkeypatch, cfg, donor_version=7)
    try:
        member.apply(pbt_pb2.Directive(action=pbt_pb2.Directive.EXPLOIT, donor_member=0,
                                       donor_learner_address="learner-0:1",
                                       donor_discriminator_address=donor_discriminator,
                                       hyperparameters={"learning_rate": 2e-4, "entropy_cost": 0.02}))
    finally:
        member.close()
    assert len(stub.calls) == copies
    assert member.discriminator_copies_skipped == 1 - copies
    assert member.exploits == 1 and len(requested) == 1, "the policy is copied either way"
    assert requested[0].tensors is not None


def test_an_exploit_refuses_a_donor_older_than_the_version_the_controller_ranked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``Directive.donor_version``: a donor that went back (restarted from an older checkpoint)
    is not the one that was ranked; the member keeps its state and reports the failure."""
    member, requested, _ = member_with_a_donor(monkeypatch, population_cfg(2, False), donor_version=7, updates=3)
    directive = dict(action=pbt_pb2.Directive.EXPLOIT, donor_member=0, donor_learner_address="learner-0:1",
                     donor_discriminator_address="disc-0:2", hyperparameters={"learning_rate": 2e-4})
    try:
        member.apply(pbt_pb2.Directive(donor_version=9, **directive))
        assert member.failed_exploits == 1 and member.exploits == 0 and requested == []
        assert member._failed_donor == 0 and member._next_report == 3  # noqa: SLF001 - reported at once
        member.apply(pbt_pb2.Directive(donor_version=7, **directive))
        assert member.exploits == 1 and len(requested) == 1
    finally:
        member.close()


def test_an_exploit_whose_donor_state_does_not_fit_copies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The learner validates a copy when it is requested: a donor state it refuses is a failed
    exploit, reported at once, and this member's discriminator is not told to copy either."""
    member, _, copies = member_with_a_donor(monkeypatch, population_cfg(2, False), donor_version=7, updates=3)

    def refuse(tensors: Any, **kwargs: Any) -> None:
        raise ValueError("donor training state or hyperparameters do not fit this policy learner: w: ...")

    member.learner.request_copy = refuse
    try:
        member.apply(pbt_pb2.Directive(action=pbt_pb2.Directive.EXPLOIT, donor_member=0, donor_version=7,
                                       donor_learner_address="learner-0:1", donor_discriminator_address="disc-0:2",
                                       hyperparameters={"learning_rate": 2e-4}))
    finally:
        member.close()
    assert member.failed_exploits == 1 and member.exploits == 0 and copies.calls == []
    assert member._failed_donor == 0 and member._next_report == 3  # noqa: SLF001 - reported at once
