"""Where each process of a one-machine system runs: ports, command lines and log files.

:func:`plan_layout` turns an experiment into a :class:`Layout`: one :class:`ProcessSpec` per
service process (each member's replay buffer, discriminator learner, policy learner and
actors; with a population, the PBT controller and its ``members.json``), every one bound to
127.0.0.1 on a port that :func:`free_port` found free, with the ``spiral ROLE`` arguments that
point it at its peers and, for the two learners, the device they train on (actors act on the CPU). Nothing is started here: :class:`spiral.commands.supervisor.Supervisor`
runs a layout, and :func:`spiral.commands.status.take_snapshot` reads its metrics endpoints.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from spiral.config import ExperimentConfig
from spiral.runtime.members import MemberAddresses, write_members_file


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ProcessSpec:
    """One service process of the system: what to run and where it listens."""

    role: str
    member: int
    name: str
    grpc_address: str
    metrics_port: int
    args: list[str]
    log_path: Path

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@dataclass
class Layout:
    """Ports and processes of one system: members (learner + discriminator + replay + actors).

    ``members``: the services each member uses (with a shared discriminator, every member's
    discriminator and replay buffer are member 0's); what the PBT controller's members file says.
    """

    processes: list[ProcessSpec] = field(default_factory=list)
    members: list[MemberAddresses] = field(default_factory=list)

    def of_role(self, role: str) -> list[ProcessSpec]:
        return [p for p in self.processes if p.role == role]

    def address_of(self, role: str, member: int) -> str:
        """gRPC address of ``role`` in ``member``."""
        return next(p.grpc_address for p in self.processes if p.role == role and p.member == member)


LEARNER_ROLES = ("learner", "discriminator")
"""The roles that train, and so take ``--device``."""


def plan_layout(cfg: ExperimentConfig, config_path: Path, run_dir: Path, num_actors: int,
                population: int, device: str = "cpu") -> Layout:
    """Assign ports and command lines to every process of the system.

    Each member's policy and discriminator learners train on ``device`` (``--device``); the
    actors, the replay buffers and the PBT controller run without one.

    With ``cfg.pbt.shared_discriminator`` and ``population > 1``, member 0's replay buffer and
    discriminator are the only ones: every member's learner and actors are pointed at them, and
    every process is started with ``--shared-discriminator``.
    """
    layout = Layout()
    logs = run_dir / "logs"
    pbt_address = f"127.0.0.1:{free_port()}" if population > 1 else ""
    shared = cfg.pbt.shared_discriminator and population > 1
    # The run's name (its folder under run.artifact_uri) is the run directory's, as spiral up --name gave it.
    common = ["--config", str(config_path), "--run-name", run_dir.name] + (["--shared-discriminator"] if shared else [])
    shared_addresses: dict[str, str] = {}
    for member in range(population):
        member_dir = run_dir if population == 1 else run_dir / f"member-{member}"
        own_roles = ("learner",) if shared and member > 0 else ("learner", "discriminator", "replaybuffer")
        addresses = {role: f"127.0.0.1:{free_port()}" for role in own_roles}
        if shared:
            if member == 0:
                shared_addresses = {role: addresses[role] for role in ("discriminator", "replaybuffer")}
            addresses.update(shared_addresses)
        layout.members.append(MemberAddresses(member=member, learner_address=addresses["learner"],
                                              discriminator_address=addresses["discriminator"],
                                              replay_address=addresses["replaybuffer"]))
        peers = ["--learner-address", addresses["learner"], "--discriminator-address", addresses["discriminator"],
                 "--replay-address", addresses["replaybuffer"], "--member", str(member)]
        if pbt_address:
            peers += ["--pbt-address", pbt_address]
        suffix = "" if population == 1 else f"-{member}"
        for role in ("replaybuffer", "discriminator", "learner"):
            if role not in own_roles:
                continue
            port = free_port()
            layout.processes.append(ProcessSpec(
                role=role, member=member, name=f"{role}{suffix}", grpc_address=addresses[role], metrics_port=port,
                args=[role, *common, "--run-dir", str(member_dir), "--listen", addresses[role],
                      "--metrics-port", str(port), *peers, *(["--device", device] if role in LEARNER_ROLES else [])],
                log_path=logs / f"{role}{suffix}.log"))
        for i in range(num_actors):
            port = free_port()
            actor_id = f"actor{suffix}-{i}"
            layout.processes.append(ProcessSpec(
                role="actor", member=member, name=actor_id, grpc_address="", metrics_port=port,
                args=["actor", *common, "--run-dir", str(member_dir), "--metrics-port", str(port),
                      "--actor-id", actor_id, *peers],
                log_path=logs / f"{actor_id}.log"))
    if pbt_address:
        port = free_port()
        members_file = run_dir / "members.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        write_members_file(members_file, layout.members)
        layout.processes.append(ProcessSpec(
            role="pbt-controller", member=-1, name="pbt-controller", grpc_address=pbt_address, metrics_port=port,
            args=["pbt-controller", *common, "--run-dir", str(run_dir), "--listen", pbt_address,
                  "--metrics-port", str(port), "--members", str(members_file)],
            log_path=logs / "pbt-controller.log"))
    return layout

