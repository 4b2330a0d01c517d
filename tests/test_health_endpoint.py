"""The metrics endpoint's ``/healthz``, which answers a service loop's health check (tests/test_guarded_loop.py).

A real HTTP server on a free loopback port; the health check is a plain function, so each
state is set directly.
"""

from __future__ import annotations

from spiral.runtime.metrics import serve_metrics
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
