"""Real multi-process systems for tests: write a config, start services, wait, scrape metrics.

Everything here runs the real ``spiral ROLE`` entry points as separate processes on loopback
(through :class:`spiral.commands.supervisor.Supervisor`, the same supervisor ``spiral up`` uses), so the tests
exercise exactly what a user runs.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from spiral.config import dump_experiment, experiment_path, load_experiment
from spiral.commands.layout import Layout, plan_layout
from spiral.commands.status import scrape
from spiral.commands.supervisor import Supervisor

FAST_SYSTEM = {
    # Eager: each test's run directory would compile the unroll afresh (~44 s cold on 2 cores);
    # tests/test_precision.py checks the compiled update against the eager one.
    "learner": {"batch_size": 8, "checkpoint_every_updates": 5, "sample_grid_every_updates": 5,
                "queue_capacity": 64, "compile": False},
    "discriminator_learner": {"batch_size": 8, "checkpoint_every_updates": 5},
    "replay": {"capacity": 160, "min_size": 8},
    "actor": {"num_envs": 4, "parameter_refresh_seconds": 0.2},
}
"""Overrides of the tiny experiment that make a system turn over quickly on 2 cores."""


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """``(HTTP status, body text)`` of a GET, error statuses included (e.g. ``/healthz``'s 503)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def grpc_health(address: str, timeout: float = 2.0) -> str:
    """The overall ``grpc.health.v1`` status name of ``address`` (the status code name, e.g.
    UNAVAILABLE, when it does not answer)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def write_config(directory: Path, overrides: dict[str, Any] | None = None, base: str = "tiny") -> Path:
    """The ``base`` experiment with :data:`FAST_SYSTEM` and ``overrides`` applied, as a YAML file."""
    merged: dict[str, Any] = {k: dict(v) for k, v in FAST_SYSTEM.items()}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    cfg = load_experiment(experiment_path(base), merged)
    path = directory / "experiment.yaml"
    dump_experiment(cfg, path)
    return path


class System:
    """One member's services (and N actors) as real processes."""

    def __init__(self, run_dir: Path, config_path: Path, num_actors: int = 2, population: int = 1) -> None:
        self.run_dir = run_dir
        cfg = load_experiment(config_path)
        self.layout: Layout = plan_layout(cfg, config_path, run_dir, num_actors, population)
        self.supervisor = Supervisor(self.layout, run_dir, restart=False)

    def __enter__(self) -> "System":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.supervisor.stop(grace_seconds=20)

    def child(self, name: str):  # noqa: ANN201 - ManagedProcess
        for child in self.supervisor.children:
            if child.spec.name == name:
                return child
        raise KeyError(name)

    def metrics(self, name: str) -> dict[str, float]:
        """Metric totals of one process (empty while it is down)."""
        return scrape(self.child(name).spec.metrics_url)

    def value(self, process: str, metric: str) -> float:
        return self.metrics(process).get(metric, 0.0)

    def logs(self) -> str:
        """Every process's log, for assertion messages."""
        parts = []
        for child in self.supervisor.children:
            path = child.spec.log_path
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"===== {child.spec.name} =====\n{text[-3000:]}")
        return "\n".join(parts)

    def kill(self, name: str, sig: int) -> None:
        child = self.child(name)
        assert child.popen is not None and child.popen.poll() is None, f"{name} is not running"
        child.popen.send_signal(sig)
        child.popen.wait(timeout=60)
        child.popen = None

    def restart(self, name: str) -> None:
        self.supervisor._spawn(self.child(name))  # noqa: SLF001 - the harness drives the supervisor

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 180.0) -> None:
        """Poll ``predicate`` until true; on timeout fail with ``what`` and every log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for child in self.supervisor.children:
                if child.popen is not None and child.popen.poll() is not None:
                    raise AssertionError(f"{child.spec.name} exited with {child.popen.returncode} while waiting "
                                         f"for {what}\n{self.logs()}")
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
