"""A real Prometheus scrapes ``spiral up`` the way the PodMonitor scrapes pods.

``spiral up`` runs the whole system for a while; Debian's ``prometheus`` binary scrapes every
process listed in ``cluster.json`` (path ``/metrics``, a ``component`` label from the role,
as the PodMonitor's relabeling derives it from the pod label) and queries through its HTTP
API must show environment steps and learner updates rising. Also checks what ``spiral up``
promises: status lines, ``cluster.json``, and a clean exit on Ctrl-C (SIGINT).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from spiral.up import free_port
from system_harness import write_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="Debian's prometheus binary is missing (make deps installs it)")]


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _positive(port: int, expr: str) -> bool:
    try:
        result = _query(port, expr)
    except OSError:
        return False
    return bool(result) and float(result[0]["value"][1]) > 0


def test_prometheus_sees_env_steps_and_learner_updates_rise(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    up_log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "spiral.cli", "up", "--config", str(config), "--runs-dir",
                           str(tmp_path / "runs"), "--name", "scrape", "--actors", "2", "--duration", "150",
                           "--status-every", "5", "--no-restart"], stdout=up_log, stderr=subprocess.STDOUT)
    prometheus = None
    try:
        cluster_file = tmp_path / "runs" / "scrape" / "cluster.json"
        deadline = time.monotonic() + 60
        while not cluster_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        cluster = json.loads(cluster_file.read_text())
        roles = {p["role"] for p in cluster["processes"]}
        assert roles == {"actor", "learner", "discriminator", "replaybuffer"}
        for process in cluster["processes"]:
            assert process["pid"] and process["metrics_url"].endswith("/metrics")

        # The PodMonitor's scrape, expressed for processes instead of pods.
        targets = [{"targets": [urllib.parse.urlparse(p["metrics_url"]).netloc],
                    "labels": {"component": p["role"], "instance_name": p["name"]}} for p in cluster["processes"]]
        (tmp_path / "targets.json").write_text(json.dumps(targets))
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "2s", "scrape_timeout": "1s", "evaluation_interval": "2s"},
            "scrape_configs": [{"job_name": "spiral", "metrics_path": "/metrics",
                                "file_sd_configs": [{"files": [str(tmp_path / "targets.json")],
                                                     "refresh_interval": "5s"}]}],
        }))
        port = free_port()
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115

        checks = {
            "environment steps/s": "sum(rate(spiral_actor_env_steps_total[20s]))",
            "learner updates/s": "sum(rate(spiral_learner_updates_total[20s]))",
        }
        seen: set[str] = set()
        deadline = time.monotonic() + 140
        while time.monotonic() < deadline and seen != set(checks):
            for name, expr in checks.items():
                if name not in seen and _positive(port, expr):
                    seen.add(name)
            time.sleep(2)
        logs = "\n".join(Path(p["log"]).read_text(errors="replace")[-2000:] for p in cluster["processes"])
        assert seen == set(checks), f"Prometheus never saw {set(checks) - seen} rise\n{logs}"
        # Every process is a healthy target, labelled like the PodMonitor labels pods.
        up_series = _query(port, 'up{job="spiral"}')
        assert {s["metric"]["component"] for s in up_series if s["value"][1] == "1"} == roles
        assert _query(port, 'sum by (component) (spiral_grpc_server_handled_total)')
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        up.send_signal(signal.SIGINT)  # what Ctrl-C does: every process stops cleanly
        assert up.wait(timeout=120) == 0, (tmp_path / "up.log").read_text()
        up_log.close()
    output = (tmp_path / "up.log").read_text()
    assert "steps/s" in output and "upd/s" in output, output
    assert "stopped" in output
