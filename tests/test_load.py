"""The load test held: ``bench/load.py --quick`` against a real learner and replay buffer.

The script compares what its clients counted with what the servers counted and lists the
checks that failed; this test reads its JSON report and checks the same invariants again from
the raw counts (so a report that stopped checking something still fails here). No wall time is
asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.load import RssWatch

REPO = Path(__file__).resolve().parent.parent
HANG_CODES = ("DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "INTERNAL")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("load") / "load.json"
    result = subprocess.run([sys.executable, "-m", "bench.load", "--quick", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=850)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-5000:]
    loaded = json.loads(out.read_text())
    loaded["_output"] = result.stdout[-5000:] + result.stderr[-3000:]
    loaded["_returncode"] = result.returncode
    return loaded


@pytest.mark.slow
def test_every_check_of_the_load_test_passed(report: dict) -> None:
    assert report["failures"] == [], report["_output"]
    assert report["ok"] and report["_returncode"] == 0, report["_output"]
    assert set(report["phases"]) == {"warmup", "steady", "disconnect", "stale", "restart"}


@pytest.mark.slow
def test_clients_and_servers_agree_on_every_call(report: dict) -> None:
    for name, phase in report["phases"].items():
        for method, figures in phase["methods"].items():
            client, server = figures["client"], figures["server"]
            assert client.get("OK", 0) > 0, (name, method, client)
            for code in HANG_CODES:
                assert not client.get(code) and not server.get(code), (name, method, code, client, server)
            if name == "disconnect" and method == "SubmitUnrolls":
                # A cancelled stream is CANCELLED at the server, a refusal that raced the cancel, an OK
                # (gRPC Python delivered the cancel as the end of the stream), or unseen.
                raced = sum(server.get(c, 0) - client.get(c, 0) for c in ("RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"))
                finished = server.get("OK", 0) - client.get("OK", 0)
                assert finished == phase["counts"]["cancelled_streams_answered_ok"]
                assert raced >= 0 and finished >= 0, (client, server)
                assert finished + raced + server.get("CANCELLED", 0) <= client["CANCELLED"], (client, server)
            else:
                assert client == server, (name, method)


@pytest.mark.slow
def test_nothing_is_lost(report: dict) -> None:
    per_unroll = report["episodes_per_unroll"]
    for name, phase in report["phases"].items():
        counts = phase["counts"]
        finished = counts["their_unrolls"]  # unrolls of cancelled streams answered OK (disconnect only)
        assert counts["learner_episodes"] == per_unroll * (counts["accepted_unrolls"] + counts["unacknowledged_unrolls"]
                                                           + finished), name
        assert 0 <= finished <= 2 * counts["cancelled_streams_answered_ok"], name
        assert name == "disconnect" or counts["cancelled_streams_answered_ok"] == 0, name
        assert 0 <= counts["unacknowledged_unrolls"] + finished <= counts["cancelled_stream_unrolls_sent"], name
        assert counts["replay_inserted"] == per_unroll * phase["methods"]["Insert"]["client"]["OK"], name
        assert counts["stale_refusals"] == phase["methods"]["SubmitUnrolls"]["server"].get("FAILED_PRECONDITION", 0)
        assert counts["actor_restarts"] == counts["client_restarts"], name


@pytest.mark.slow
def test_the_scenarios_did_what_they_say(report: dict) -> None:
    phases = report["phases"]
    assert phases["disconnect"]["methods"]["SubmitUnrolls"]["client"].get("CANCELLED", 0) > 0
    assert phases["disconnect"]["counts"]["cancelled_stream_unrolls_sent"] > 0
    assert phases["stale"]["counts"]["stale_refusals"] > 0
    assert phases["restart"]["counts"]["actor_restarts"] > 0
    assert phases["steady"]["counts"]["actor_restarts"] == 0  # every phase's actors are new to the learner


@pytest.mark.slow
def test_health_stayed_serving_and_memory_held(report: dict) -> None:
    for name, phase in report["phases"].items():
        for side, statuses in phase["health"].items():
            assert set(statuses) == {"SERVING"}, (name, side, statuses)
    assert report["warmed"], report["_output"]
    for side, figures in report["memory"].items():
        assert figures["growth"] <= 0.10, (side, figures)
    assert len(report["rss_timeline"]) >= 2 and set(report["memory"]) <= set(report["rss_timeline"][0]), report["memory"]


def _watch_with(samples: list[tuple[float, dict[str, int]]], now: float) -> RssWatch:
    """An RssWatch (of this process, stopped at once) whose samples and clock are ``samples`` and ``now``."""
    watch = RssWatch({"learner": os.getpid()}, period=60.0)
    watch.close()
    watch.samples = samples
    watch.started = time.monotonic() - now
    return watch


def test_memory_is_warm_once_its_peak_stops_rising() -> None:
    rising = [(t, {"learner": 400 + 2 * t}) for t in range(0, 121, 2)]
    assert not _watch_with(rising, now=120).plateaued(window=60)
    # Swinging by 10% around a flat level: the peaks of the two minutes agree, so it is warm.
    swinging = [(t, {"learner": 600 if t % 20 == 0 else 540}) for t in range(0, 121, 2)]
    assert _watch_with(swinging, now=120).plateaued(window=60)
    assert not _watch_with(swinging, now=100).plateaued(window=60), "needs two whole windows"
    watch = _watch_with(swinging, now=120)
    assert watch.peaks(0, 10) == {"learner": 600} and watch.peaks(200, 300) == {}
