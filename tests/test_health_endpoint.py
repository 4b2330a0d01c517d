"""The metrics endpoint's ``/healthz`` and the watchdog behind an actor's liveness probe.

A real HTTP server on a free loopback port; the health check is a plain function, so each
state is set directly.
"""

from __future__ import annotations

import time

import pytest

from spiral.metrics import serve_metrics
from spiral.service_runtime import Watchdog
from system_harness import http_get


def test_healthz_answers_the_check_and_metrics_are_still_served() -> None:
    state = {"healthy": True}
    server = serve_metrics(0, "127.0.0.1", health=lambda: (state["healthy"], f"healthy={state['healthy']}"))
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert http_get(f"{base}/healthz") == (200, "healthy=True\n")
        state["healthy"] = False
        assert http_get(f"{base}/healthz") == (503, "healthy=False\n")
        status, text = http_get(f"{base}/metrics")
        assert status == 200 and "spiral_actor_env_steps_total" in text
    finally:
        server.shutdown()
        server.server_close()


def test_without_a_check_healthz_is_always_healthy() -> None:
    server = serve_metrics(0, "127.0.0.1")
    try:
        assert http_get(f"http://127.0.0.1:{server.server_port}/healthz") == (200, "ok\n")
    finally:
        server.shutdown()
        server.server_close()


def test_watchdog_goes_stale_without_beats_and_recovers_on_the_next() -> None:
    watchdog = Watchdog("episode loop", stall_seconds=0.2)
    healthy, detail = watchdog.check()
    assert healthy and "episode loop" in detail and "within" in detail
    time.sleep(0.3)
    healthy, detail = watchdog.check()
    assert not healthy and "over the 0.2 s limit" in detail
    watchdog.beat()
    assert watchdog.check()[0]
    with pytest.raises(ValueError, match="stall_seconds"):
        Watchdog("x", 0)
