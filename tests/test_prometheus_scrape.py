"""A real Prometheus scrapes ``spiral up`` the way the PodMonitor scrapes pods.

``spiral up`` runs the whole system for a while; Debian's ``prometheus`` binary scrapes every
process listed in ``cluster.json`` with the scrape configuration that
``deploy/components/monitoring/podmonitor.yaml`` expresses (its path, interval, timeout and
relabelings, translated the way prometheus-operator translates them; each process stands for
a pod whose component and instance labels are its role and name), and queries through its
HTTP API must show environment steps and learner updates rising. Also checks what ``spiral up``
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

REPO = Path(__file__).resolve().parent.parent
PODMONITOR = REPO / "deploy" / "components" / "monitoring" / "podmonitor.yaml"

from spiral.commands.layout import free_port
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


def scrape_config_of_the_podmonitor(targets_file: Path) -> tuple[dict, int]:
    """The PodMonitor's endpoint as a Prometheus scrape config over file-discovered targets.

    prometheus-operator turns ``podMetricsEndpoints[0]`` into ``metrics_path``,
    ``scrape_interval``, ``scrape_timeout`` and ``relabel_configs`` (camelCase to snake_case);
    the ``__meta_kubernetes_pod_label_*`` labels Kubernetes discovery would attach come from
    the targets file instead. Returns the config and the interval in seconds.
    """
    monitor = yaml.safe_load(PODMONITOR.read_text())
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label", "action": "action",
            "regex": "regex", "replacement": "replacement", "separator": "separator"}
    relabel = [{keys[k]: v for k, v in rule.items()} for rule in endpoint.get("relabelings", [])]
    job = {"job_name": monitor["metadata"]["name"], "metrics_path": endpoint["path"],
           "scrape_interval": endpoint["interval"], "scrape_timeout": endpoint["scrapeTimeout"],
           "relabel_configs": relabel,
           "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "5s"}]}
    interval = endpoint["interval"]
    assert interval.endswith("s"), interval
    return job, int(interval[:-1])


def test_prometheus_sees_env_steps_and_learner_updates_rise(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    up_log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "spiral.commands.cli", "up", "--config", str(config), "--runs-dir",
                           str(tmp_path / "runs"), "--name", "scrape", "--actors", "2", "--duration", "240",
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

        # The PodMonitor's scrape, with processes standing for pods (their labels as a pod's).
        pod_label = "__meta_kubernetes_pod_label_app_kubernetes_io_"
        targets = [{"targets": [urllib.parse.urlparse(p["metrics_url"]).netloc],
                    "labels": {f"{pod_label}component": p["role"], f"{pod_label}instance": p["name"]}}
                   for p in cluster["processes"]]
        (tmp_path / "targets.json").write_text(json.dumps(targets))
        job, interval = scrape_config_of_the_podmonitor(tmp_path / "targets.json")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": [job]}))
        window = f"{4 * interval}s"  # at least two scrapes in every rate window
        port = free_port()
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115

        checks = {
            "environment steps/s": f"sum(rate(spiral_actor_env_steps_total[{window}]))",
            "learner updates/s": f"sum(rate(spiral_learner_updates_total[{window}]))",
        }
        seen: set[str] = set()
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and seen != set(checks):
            for name, expr in checks.items():
                if name not in seen and _positive(port, expr):
                    seen.add(name)
            time.sleep(2)
        logs = "\n".join(Path(p["log"]).read_text(errors="replace")[-2000:] for p in cluster["processes"])
        assert seen == set(checks), f"Prometheus never saw {set(checks) - seen} rise\n{logs}"
        # Every process is a healthy target, labelled like the PodMonitor labels pods.
        up_series = _query(port, f'up{{job="{job["job_name"]}"}}')
        assert {s["metric"]["component"] for s in up_series if s["value"][1] == "1"} == roles
        assert {s["metric"]["instance_name"] for s in up_series} == {p["name"] for p in cluster["processes"]}
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
