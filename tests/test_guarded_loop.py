"""No silent death: a service loop that raises or stalls turns the service unhealthy and exits 1.

The unit tests drive :class:`spiral.runtime.guarded_loop.GuardedLoop` with an injected clock and events
(no sleeps decide anything). The process tests start the real ``spiral learner``,
``spiral discriminator`` and ``spiral actor`` entry points with a fault injected into their loop
(``SPIRAL_INJECT_FAULT``) and watch, from outside, what Kubernetes and ``spiral up`` would see:
the gRPC health check turning NOT_SERVING, ``/healthz`` answering 503, the process exiting with
status 1, and ``spiral up`` restarting it from its last checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spiral.config import load_experiment
from spiral.runtime.guarded_loop import FAULT_ENV, FaultSpec, GuardedLoop, InjectedFault, Watchdog
from spiral.commands.layout import Layout, free_port, plan_layout
from spiral.commands.supervisor import Supervisor
from system_harness import grpc_health, http_get, write_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_goes_stale_without_beats_and_recovers_on_the_next() -> None:
    clock = FakeClock()
    watchdog = Watchdog("episode loop", stall_seconds=5.0, clock=clock)
    healthy, detail = watchdog.check()
    assert healthy and "episode loop" in detail and "within" in detail
    clock.now += 5.0
    assert watchdog.check()[0]  # exactly at the limit is still healthy
    clock.now += 0.5
    healthy, detail = watchdog.check()
    assert not healthy and "last progress 5.5 s ago" in detail and "over the 5 s limit" in detail
    watchdog.beat()
    assert watchdog.check()[0]
    with pytest.raises(ValueError, match="stall_seconds"):
        Watchdog("x", 0)


def test_a_loop_that_raises_fails_the_guard_once_runs_the_hooks_and_requests_exit() -> None:
    guard = GuardedLoop("learner", "updates", 60.0, linger_seconds=0, monitor_seconds=0, fault=None)
    reasons: list[str] = []
    guard.on_failure(reasons.append)
    guard.on_failure(lambda _reason: (_ for _ in ()).throw(RuntimeError("a broken hook")))
    guard.on_failure(lambda reason: reasons.append(f"second:{reason}"))

    def loop(stop: threading.Event, beat) -> None:  # noqa: ANN001
        beat()
        raise ZeroDivisionError("the update divided by zero")

    assert guard.check()[0] and guard.exit_code == 0
    guard.start(loop)
    assert guard.exit_requested.wait(30)
    assert reasons == ["ZeroDivisionError: the update divided by zero",
                       "second:ZeroDivisionError: the update divided by zero"]  # a broken hook skips nothing
    healthy, detail = guard.check()
    assert not healthy and detail == "updates failed: ZeroDivisionError: the update divided by zero"
    assert guard.exit_code == 1
    guard.fail("a second failure")  # only the first one counts
    assert guard.failure == "ZeroDivisionError: the update divided by zero" and len(reasons) == 2
    with pytest.raises(RuntimeError, match="one loop"):
        guard.start(loop)


def test_a_stalled_loop_is_failed_by_the_watchdog_and_is_not_waited_for() -> None:
    clock = FakeClock()
    guard = GuardedLoop("discriminator", "updates", 30.0, linger_seconds=0, clock=clock, monitor_seconds=0, fault=None)
    reasons: list[str] = []
    guard.on_failure(reasons.append)
    entered, release = threading.Event(), threading.Event()

    def loop(stop: threading.Event, beat) -> None:  # noqa: ANN001
        while not stop.is_set():
            beat()
            entered.set()
            release.wait()  # one iteration that does not end

    guard.start(loop)
    assert entered.wait(30)
    clock.now += 30.0
    assert not guard.check_stall() and guard.check()[0]
    clock.now += 1.0
    assert guard.check_stall()
    assert len(reasons) == 1 and reasons[0].startswith("stalled: updates: last progress 31.0 s ago")
    assert guard.exit_requested.is_set() and guard.exit_code == 1
    guard.stop(timeout=600)  # returns at once: a stalled loop is not joined
    assert guard._thread is not None and guard._thread.is_alive()  # noqa: SLF001
    release.set()
    guard._thread.join(timeout=30)  # noqa: SLF001


def test_a_requested_stop_is_no_failure_and_lets_the_checkpoint_run() -> None:
    clock = FakeClock()
    guard = GuardedLoop("actor", "episodes", 1.0, linger_seconds=0, clock=clock, monitor_seconds=0, fault=None)
    beats = threading.Event()

    def loop(stop: threading.Event, beat) -> None:  # noqa: ANN001
        while not stop.is_set():
            beat()
            beats.set()
            stop.wait(0.01)

    guard.start(loop)
    assert beats.wait(30)
    guard.stop()
    clock.now += 100.0
    assert not guard.check_stall()  # a stopped loop does not stall
    assert guard.failure is None and guard.exit_code == 0
    ran: list[bool] = []
    guard.unless_failed(lambda: ran.append(True))()
    assert ran == [True]


def test_a_loop_that_returns_by_itself_is_a_failure_and_no_checkpoint_follows() -> None:
    guard = GuardedLoop("learner", "updates", 60.0, linger_seconds=0, monitor_seconds=0, fault=None)
    guard.start(lambda stop, beat: None)
    assert guard.exit_requested.wait(30)
    assert guard.failure == "the loop returned without being asked to stop"
    ran: list[bool] = []
    guard.unless_failed(lambda: ran.append(True))()
    assert ran == []


def test_the_exit_waits_for_the_linger_after_the_failure() -> None:
    guard = GuardedLoop("learner", "updates", 60.0, linger_seconds=0.5, monitor_seconds=0, fault=None)
    failed = threading.Event()
    guard.on_failure(lambda _reason: failed.set())
    guard.start(lambda stop, beat: (_ for _ in ()).throw(ValueError("bad batch")))
    assert failed.wait(30)
    assert not guard.exit_requested.is_set()  # still up, answering NOT_SERVING
    assert guard.exit_requested.wait(30)


def test_fault_specs_parse_select_their_role_and_fire_at_their_beat(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FaultSpec.parse("learner:raise@3") == FaultSpec("learner", "raise", 3)
    for bad, message in (("learner", "ROLE:KIND@N"), ("learner:raise", "ROLE:KIND@N"),
                         ("learner:explode@2", "raise or stall"), ("learner:raise@0", "N must be >= 1"),
                         ("learner:raise@x", "ROLE:KIND@N")):
        with pytest.raises(ValueError, match=message) as info:
            FaultSpec.parse(bad)
        assert FAULT_ENV in str(info.value)
    monkeypatch.setenv(FAULT_ENV, "discriminator:stall@2")
    assert FaultSpec.from_environment("learner") is None
    assert FaultSpec.from_environment("discriminator") == FaultSpec("discriminator", "stall", 2)
    monkeypatch.delenv(FAULT_ENV)
    assert FaultSpec.from_environment("discriminator") is None

    guard = GuardedLoop("learner", "updates", 60.0, monitor_seconds=0, fault=FaultSpec("learner", "raise", 3))
    guard.beat()
    guard.beat()
    with pytest.raises(InjectedFault, match="beat 3 of updates"):
        guard.beat()
    guard.beat()  # it fires once


# -- the real services --------------------------------------------------------------------------


def _start(role: str, config: Path, run_dir: Path, fault: str, grpc_port: int | None) -> tuple[subprocess.Popen, int]:
    metrics_port = free_port()
    args = [sys.executable, "-m", "spiral.commands.cli", role, "--config", str(config), "--run-dir", str(run_dir),
            "--metrics-port", str(metrics_port)]
    if grpc_port is not None:
        args += ["--listen", f"127.0.0.1:{grpc_port}"]
    # Peers that are not running: the loops wait on them (bounded waits, still beating).
    args += ["--learner-address", f"127.0.0.1:{free_port()}", "--replay-address", f"127.0.0.1:{free_port()}",
             "--discriminator-address", f"127.0.0.1:{free_port()}"]
    env = dict(os.environ, **{FAULT_ENV: fault}, OMP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    log = open(run_dir / f"{role}.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return process, metrics_port


def _watch_until_exit(process: subprocess.Popen, grpc_address: str | None, metrics_port: int,
                      timeout: float = 240.0) -> tuple[set[str], list[tuple[int, str]]]:
    """Poll gRPC health and ``/healthz`` until the process exits; the statuses seen."""
    seen_grpc: set[str] = set()
    seen_http: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if grpc_address is not None:
            seen_grpc.add(grpc_health(grpc_address))
        try:
            seen_http.append(http_get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=1.0))
        except OSError:
            pass
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait()
    return seen_grpc, seen_http


@pytest.mark.parametrize("role,fault,overrides", [
    ("learner", "learner:raise@3", {}),
    ("discriminator", "discriminator:stall@2", {"discriminator_learner": {"stall_seconds": 1.0}}),
])
def test_a_service_whose_loop_fails_answers_not_serving_then_exits_1(tmp_path: Path, role: str, fault: str,
                                                                     overrides: dict) -> None:
    config = write_config(tmp_path, overrides)
    port = free_port()
    process, metrics_port = _start(role, config, tmp_path, fault, port)
    seen_grpc, seen_http = _watch_until_exit(process, f"127.0.0.1:{port}", metrics_port)
    log = (tmp_path / f"{role}.log").read_text(errors="replace")
    assert process.returncode == 1, log[-4000:]
    assert "SERVING" in seen_grpc and "NOT_SERVING" in seen_grpc, (seen_grpc, log[-4000:])
    # The app always answers a non-empty body; an empty one is a response cut short by the exit
    # (the status line arrived, the process died before the body did), so it is not a finding.
    unhealthy = [body for status, body in seen_http if status == 503 and body]
    assert unhealthy, (seen_http[-5:], log[-4000:])
    what = "InjectedFault" if "raise" in fault else "stalled"
    assert what in unhealthy[-1] and "failed" in unhealthy[-1]
    assert "not checkpointing after the failure" in log


def test_an_actor_whose_loop_raises_reports_503_then_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    process, metrics_port = _start("actor", config, tmp_path, "actor:raise@1", None)
    _, seen_http = _watch_until_exit(process, None, metrics_port)
    log = (tmp_path / "actor.log").read_text(errors="replace")
    assert process.returncode == 1, log[-4000:]
    assert any(status == 503 and "InjectedFault" in body for status, body in seen_http), (seen_http[-5:], log[-4000:])


def test_spiral_up_restarts_a_learner_whose_loop_died_and_it_resumes_from_its_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole system under ``spiral up``'s supervisor: the learner's loop raises after some
    updates, the process exits 1, the supervisor restarts it, and it resumes at its checkpoint."""
    config = write_config(tmp_path, {"learner": {"checkpoint_every_updates": 2}})
    # The fault fires at the 40th beat of each learner process: after some updates, every life.
    monkeypatch.setenv(FAULT_ENV, "learner:raise@40")
    layout: Layout = plan_layout(load_experiment(config), config, tmp_path / "run", num_actors=1, population=1)
    supervisor = Supervisor(layout, tmp_path / "run", restart=True, max_backoff_seconds=1.0)
    learner = next(child for child in supervisor.children if child.spec.role == "learner")
    events: list[str] = []
    supervisor.start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(e.startswith("restarted learner") for e in events):
            events += supervisor.poll()
            time.sleep(0.2)
        log = learner.spec.log_path.read_text(errors="replace")
        assert any(e.startswith("learner exited with code 1") for e in events), (events, log[-4000:])
        assert any(e.startswith("restarted learner") for e in events), (events, log[-4000:])
        assert "InjectedFault" in log
        checkpoints = sorted((tmp_path / "run" / "learner").glob("*"))
        assert checkpoints, log[-4000:]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "resumed policy learner from checkpoint" not in log:
            events += supervisor.poll()
            time.sleep(0.2)
            log = learner.spec.log_path.read_text(errors="replace")
        assert "resumed policy learner from checkpoint version" in log, log[-4000:]
    finally:
        supervisor.stop(grace_seconds=20)
