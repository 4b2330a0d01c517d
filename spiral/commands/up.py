"""``spiral up``: the whole system on one machine, every service its own process on loopback.

``spiral up`` is what ``make run`` runs. It starts the replay buffer, the discriminator
learner, the policy learner and N actors (N defaults to half the machine's cores; with
``--population K``, K such members plus the PBT controller) as separate ``spiral ROLE``
processes bound to 127.0.0.1 on free ports, exactly as they run in Kubernetes, and supervises
them:

* everything a run produces lands under ``runs/NAME/``: the resolved ``config.yaml`` and
  ``overrides.yaml`` (the experiment file, its bases and the ``--set`` items that made it;
  :mod:`spiral.runtime.run_config`), one log
  per process in ``logs/``, checkpoints, sample grids and TensorBoard event files
  (``tensorboard/``, printed as a ``tensorboard --logdir`` line at start) written by the services, and
  ``cluster.json`` listing each process (role, member, pid, gRPC address, metrics URL, log) so
  other tools (tests, Prometheus, dashboards) can find the services;
* a live one-line status, scraped from the services' own Prometheus endpoints: environment
  steps/s, learner updates/s, discriminator updates/s, policy lag, replay fill, reward and,
  in conditional runs, the reconstruction error;
* a process that dies unexpectedly is restarted with exponential backoff (a restarted learner
  resumes from its checkpoint and the actors reconnect);
* Ctrl-C, SIGTERM or ``--duration SECONDS`` stop every process cleanly: actors first, then
  the learners and the replay buffer, each with SIGTERM and a grace period before SIGKILL.

Any setting of the experiment can be changed for one run with ``--set FIELD=VALUE`` (repeatable;
the value is YAML: ``--set learner.reward.band=[-5,5] --set env.conditional=false``), and
``--seed N`` is ``--set seed=N``. A run directory that already holds a run is resumed only with
the same experiment: started with other settings it is refused, naming the fields that differ.

With ``--shared-discriminator`` (or ``pbt.shared_discriminator``) a population runs SPIRAL++'s
population discriminator: one replay buffer and one discriminator, member 0's, serve every
member. Every member's learner scores with that discriminator and every member's actors insert
into that replay buffer; members 1..K-1 run only a learner and actors.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from spiral.commands.overrides import add_override_arguments, override_items
from spiral.config import OVERRIDES_ENV_VAR, ConfigError, ExperimentConfig, experiment_path, resolve_experiment
from spiral.runtime.atomic import atomic_write_bytes
from spiral.runtime.members import MemberAddresses, write_members_file
from spiral.runtime.run_config import RunConfigMismatch, record_run_config

STOP_ORDER = ("actor", "pbt-controller", "learner", "discriminator", "replaybuffer")
"""Roles in the order they are stopped (producers first, so nothing is left half-sent)."""


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
class ManagedProcess:
    """A running (or restarting) child with its restart bookkeeping."""

    spec: ProcessSpec
    popen: subprocess.Popen | None = None
    log: IO[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0


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


def plan_layout(cfg: ExperimentConfig, config_path: Path, run_dir: Path, num_actors: int,
                population: int) -> Layout:
    """Assign ports and command lines to every process of the system.

    With ``cfg.pbt.shared_discriminator`` and ``population > 1``, member 0's replay buffer and
    discriminator are the only ones: every member's learner and actors are pointed at them, and
    every process is started with ``--shared-discriminator``.
    """
    layout = Layout()
    logs = run_dir / "logs"
    pbt_address = f"127.0.0.1:{free_port()}" if population > 1 else ""
    shared = cfg.pbt.shared_discriminator and population > 1
    common = ["--config", str(config_path)] + (["--shared-discriminator"] if shared else [])
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
                      "--metrics-port", str(port), *peers],
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


class Supervisor:
    """Starts, watches, restarts and stops the processes of a :class:`Layout`."""

    def __init__(self, layout: Layout, run_dir: Path, restart: bool = True,
                 max_backoff_seconds: float = 30.0) -> None:
        self.layout = layout
        self.run_dir = run_dir
        self.restart = restart
        self.max_backoff = max_backoff_seconds
        self.children = [ManagedProcess(spec) for spec in layout.processes]
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # The children load the resolved config.yaml, overrides included: a SPIRAL_SET left in
        # this shell must not change it behind the run's back.
        self.env.pop(OVERRIDES_ENV_VAR, None)
        self.env.setdefault("MUJOCO_GL", "egl")

    def _spawn(self, child: ManagedProcess) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        if child.log is None:
            child.log = open(spec.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        child.popen = subprocess.Popen([sys.executable, "-m", "spiral.commands.cli", *spec.args], stdout=child.log,
                                       stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        child.started_at = time.monotonic()

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self.write_cluster_file()

    def poll(self) -> list[str]:
        """Restart children that exited; returns a message per event."""
        events = []
        now = time.monotonic()
        for child in self.children:
            if child.popen is None:
                if now >= child.next_start:
                    self._spawn(child)
                    events.append(f"restarted {child.spec.name} (pid {child.popen.pid})")  # type: ignore[union-attr]
                    self.write_cluster_file()
                continue
            code = child.popen.poll()
            if code is None:
                continue
            events.append(f"{child.spec.name} exited with code {code}; see {child.spec.log_path}")
            child.popen = None
            if self.restart:
                # Reset the backoff after a long healthy run; otherwise double it.
                healthy = now - child.started_at > 60
                child.restarts = 0 if healthy else child.restarts + 1
                child.next_start = now + min(self.max_backoff, 0.5 * 2 ** child.restarts)
        return events

    def write_cluster_file(self) -> None:
        """``cluster.json``: every process with role, member, pid, gRPC address and metrics URL."""
        entries = []
        for child in self.children:
            spec = child.spec
            entries.append({
                "name": spec.name, "role": spec.role, "member": spec.member,
                "pid": child.popen.pid if child.popen else None,
                "grpc_address": spec.grpc_address or None, "metrics_url": spec.metrics_url,
                "log": str(spec.log_path),
            })
        atomic_write_bytes(self.run_dir / "cluster.json", json.dumps({"processes": entries}, indent=2).encode())

    def stop(self, grace_seconds: float = 20.0) -> None:
        """SIGTERM every child in :data:`STOP_ORDER`, waiting for each role before the next."""
        for role in STOP_ORDER:
            group = [c for c in self.children if c.spec.role == role and c.popen and c.popen.poll() is None]
            for child in group:
                child.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            deadline = time.monotonic() + grace_seconds
            for child in group:
                try:
                    child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
                except subprocess.TimeoutExpired:
                    child.popen.kill()  # type: ignore[union-attr]
                    child.popen.wait()  # type: ignore[union-attr]
        for child in self.children:
            if child.log:
                child.log.close()
                child.log = None


# ---------------------------------------------------------------------------------------------
# Status line
# ---------------------------------------------------------------------------------------------


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
    """

    time: float
    totals: dict[str, float]
    maxima: dict[str, float]
    learner_gauges: dict[int, dict[str, float]] = field(default_factory=dict)

    def member_values(self, name: str) -> list[float]:
        """``name`` of each member's learner that reports it, in member order."""
        return [gauges[name] for _, gauges in sorted(self.learner_gauges.items()) if name in gauges]


def take_snapshot(layout: Layout) -> StatusSnapshot:
    totals: dict[str, float] = {}
    maxima: dict[str, float] = {}
    learner_gauges: dict[int, dict[str, float]] = {}
    for spec in layout.processes:
        scraped = scrape(spec.metrics_url)
        if spec.role == "learner" and scraped:
            learner_gauges[spec.member] = scraped
        for name, value in scraped.items():
            totals[name] = totals.get(name, 0.0) + value
            maxima[name] = max(maxima.get(name, value), value)
    return StatusSnapshot(time.monotonic(), totals, maxima, learner_gauges)


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
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------


def default_actors(cores: int | None = None) -> int:
    """Actor processes per member when ``--actors`` is not given: half the cores this process may
    use, at least 1.

    The other half is left to the learner and the critic, which on a CPU machine bound how fast
    the system learns: on 2 cores one actor fed the learner 14-26% more updates in 20 minutes
    than two did (bench/RESULTS.md), and the runs that met the critic-reward goal used one.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="experiment YAML or name under experiments/ (default: tiny)")
    add_override_arguments(parser)
    parser.add_argument("--name", help="run name (default: the experiment's name); output goes to RUNS_DIR/NAME")
    parser.add_argument("--runs-dir", default="runs", help="parent directory of runs (default: runs)")
    parser.add_argument("--actors", type=int, default=None,
                        help="actor processes per member (default: half this machine's cores, at least 1)")
    parser.add_argument("--population", type=int, default=None,
                        help="population members (default: the config's pbt.population_size)")
    parser.add_argument("--shared-discriminator", action=argparse.BooleanOptionalAction, default=None,
                        help="population: one discriminator and replay buffer (member 0's) serve every member "
                             "(default: the config's pbt.shared_discriminator)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    parser.add_argument("--status-every", type=float, default=2.0, help="seconds between status lines")
    parser.add_argument("--no-restart", action="store_true", help="do not restart processes that exit")


def run(args: argparse.Namespace) -> int:
    config_path = experiment_path(args.config)
    if not config_path.exists():
        print(f"spiral up: config {config_path} does not exist", file=sys.stderr)
        return 2
    if args.population is not None and args.population < 1:
        print(f"spiral up: --population must be >= 1, got {args.population}", file=sys.stderr)
        return 2
    actors = default_actors() if args.actors is None else args.actors
    if actors < 1:
        print("spiral up: --actors must be >= 1", file=sys.stderr)
        return 2
    try:
        experiment = resolve_experiment(config_path, override_items(args))
        cfg = experiment.config
        run_dir = Path(args.runs_dir) / (args.name or cfg.name)
        resolved = record_run_config(run_dir, experiment)
    except (ConfigError, RunConfigMismatch) as exc:
        print(f"spiral up: {exc}", file=sys.stderr)
        return 2
    population = cfg.pbt.population_size

    layout = plan_layout(cfg, resolved.resolve(), run_dir.resolve(), actors, population)
    supervisor = Supervisor(layout, run_dir, restart=not args.no_restart)
    stopping = {"flag": False}

    def request_stop(signum: int, _frame: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print(f"spiral up: {len(layout.processes)} processes ({actors} actor{'s' if actors > 1 else ''} per member), "
          f"run directory {run_dir} "
          f"(cluster.json, logs/); Ctrl-C stops", flush=True)
    board_dir = run_dir / "tensorboard" if population == 1 else run_dir  # members: member-N/tensorboard/
    print(f"spiral up: tensorboard --logdir {board_dir}", flush=True)
    supervisor.start()
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    prev = take_snapshot(layout)
    next_status = started + args.status_every
    try:
        while not stopping["flag"]:
            if args.duration and time.monotonic() - started >= args.duration:
                break
            for event in supervisor.poll():
                print(("\n" if interactive else "") + f"spiral up: {event}", flush=True)
            if time.monotonic() >= next_status:
                cur = take_snapshot(layout)
                line = format_status(prev, cur, time.monotonic() - started)
                print(("\r" + line.ljust(150)) if interactive else line, end="" if interactive else "\n", flush=True)
                prev, next_status = cur, time.monotonic() + args.status_every
            time.sleep(0.2)
    finally:
        print(("\n" if interactive else "") + "spiral up: stopping", flush=True)
        supervisor.stop()
        supervisor.write_cluster_file()
    print(f"spiral up: stopped; outputs in {run_dir}", flush=True)
    return 0
