"""Runs the processes of a :class:`~spiral.commands.layout.Layout` and keeps them running.

:class:`Supervisor` starts every process as ``python -m spiral.commands.cli ROLE ...`` in its
own session, its output appended to its log file; :meth:`Supervisor.poll` restarts one that
exited, after an exponential back-off (0.5 s doubling to ``max_backoff_seconds``, reset after
a minute of healthy running); :meth:`Supervisor.stop` stops them in :data:`STOP_ORDER`, each
with SIGTERM and a grace period before SIGKILL. ``cluster.json`` in the run directory lists
every process (role, member, pid, gRPC address, metrics URL, log) and is rewritten whenever a
pid changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from spiral.commands.layout import Layout, ProcessSpec
from spiral.config import OVERRIDES_ENV_VAR
from spiral.runtime.atomic import atomic_write_bytes

STOP_ORDER = ("actor", "pbt-controller", "learner", "discriminator", "replaybuffer")
"""Roles in the order they are stopped (producers first, so nothing is left half-sent)."""


@dataclass
class ManagedProcess:
    """A running (or restarting) child with its restart bookkeeping."""

    spec: ProcessSpec
    popen: subprocess.Popen | None = None
    log: IO[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0


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

    def add(self, specs: list[ProcessSpec]) -> None:
        """Start more processes in the running system (more actors, say), supervised like the
        others from now on; they join the layout, so its status snapshots include them."""
        for spec in specs:
            child = ManagedProcess(spec)
            self.children.append(child)
            self.layout.processes.append(spec)
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
