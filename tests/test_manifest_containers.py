"""The kind overlay's pods, run as real containers of the built image (``make image-test``).

``kubectl kustomize tests/overlays/harness-limits`` (the kind overlay with every pod held to its
own CPU slice, as on a real cluster's nodes) is turned into containers by
:class:`manifest_containers.ManifestCluster` (what each takes from the manifests is in its
docstring); the test then checks, from outside, what a cluster operator would:

* every pod passes its declared startup and readiness probes, runs under the cgroup limits its
  resources ask for, and the system trains: actor frames, learner updates and the
  discriminator's version rise on the Prometheus endpoints;
* **scale-out**: 1 -> 2 -> 4 actor pods of 200m each give at least 1.7x and 3x the 1-actor
  frames/s (the mean of the run's two 1-pod windows, before scaling up and after scaling back
  down), in one run, and the policy lag stays bounded while scaling up and back down to 1;
* **faults at scale**, with 4 actor pods: the replay buffer and the discriminator SIGKILLed in
  turn; the restart policy starts each again and the system recovers by itself, each within 60 s
  of the pod's restart (the replay buffer takes renders and serves the discriminator again; the
  discriminator trains and the learner scores with its new versions). The time each took and
  what was lost (episodes the actors dropped, renders the table held, discriminator versions
  rolled back to its checkpoint) are printed;
* the learner container killed: the harness's restart policy starts it again on the same volume,
  its restart count rises, it resumes from its checkpoint at the same or a later version, and the
  actors reconnect (their frames rise again);
* a container that runs past its liveness probe's failure threshold (the replay buffer,
  paused) is reported;
* a pod over its memory limit is OOM-killed by the kernel and reported as the kubelet reports it
  (``OOMKilled``, a rising restart count under the crash-loop back-off).

Skipped without ``SPIRAL_IMAGE_TESTS=1`` (it needs Docker and the image).
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from manifest_containers import ManifestCluster, docker, render
from spiral.commands.status import scrape

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("SPIRAL_IMAGE", "spiral:0.1.0-cpu")

pytestmark = pytest.mark.skipif(
    os.environ.get("SPIRAL_IMAGE_TESTS") != "1" or shutil.which("docker") is None or shutil.which("kubectl") is None,
    reason="manifest-container tests run with SPIRAL_IMAGE_TESTS=1, Docker and kubectl (make image-test)")


def wait_for(what: str, predicate: Callable[[], bool], cluster: ManifestCluster, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    logs = "\n".join(f"===== {name} =====\n{cluster.logs(name)}" for name in cluster.pods)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                         f"probe failures: {cluster.probe_failures()}\n{logs}")


def total(cluster: ManifestCluster, workload: str, metric: str) -> float:
    return sum(scrape(cluster.metrics_url(pod.name)).get(metric, 0.0) for pod in cluster.of(workload))


def frames_per_second(cluster: ManifestCluster, seconds: float, lags: list[float] | None = None) -> float:
    """The actors' frames/s over ``seconds``; every second, the largest actor policy lag goes into ``lags``."""
    start, t0 = total(cluster, "spiral-actor", "spiral_actor_env_steps_total"), time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        if lags is not None:
            lags.append(max_lag(cluster))
    return (total(cluster, "spiral-actor", "spiral_actor_env_steps_total") - start) / (time.monotonic() - t0)


def max_lag(cluster: ManifestCluster) -> float:
    return max((scrape(cluster.metrics_url(pod.name)).get("spiral_actor_policy_lag_versions", 0.0)
                for pod in cluster.of("spiral-actor")), default=0.0)


def scale_and_settle(cluster: ManifestCluster, replicas: int, lags: list[float]) -> None:
    """Scale the actors and wait until every actor pod steps, then 20 s more for the pipeline to fill."""
    cluster.scale("spiral-actor", replicas)
    actors = cluster.of("spiral-actor")
    assert len(actors) == replicas
    wait_for(f"{replicas} actors stepping", lambda: all(
        scrape(cluster.metrics_url(pod.name)).get("spiral_actor_env_steps_total", 0) > 0 for pod in actors), cluster)
    frames_per_second(cluster, 20, lags)


@pytest.fixture(scope="module")
def cluster():  # noqa: ANN201 - ManifestCluster
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is not built: run make image")
    manifests = ManifestCluster(render(ROOT / "tests" / "overlays" / "harness-limits"))
    manifests.up()
    try:
        yield manifests
    finally:
        manifests.down()


def test_the_pods_turn_ready_under_their_limits_and_the_system_trains(cluster: ManifestCluster) -> None:
    assert {w: len(cluster.of(w)) for w in cluster.workloads} == {
        "spiral-actor": 1, "spiral-discriminator": 1, "spiral-learner": 1, "spiral-replaybuffer": 1}
    # The harness read each container's cgroups back and would have raised had a limit not taken effect.
    quotas = {w: cluster.of(w)[0].limits.cpu_quota_us for w in cluster.workloads}
    assert quotas == {"spiral-actor": 20_000, "spiral-discriminator": 30_000, "spiral-learner": 80_000,
                      "spiral-replaybuffer": 10_000}
    assert cluster.of("spiral-actor")[0].limits.memory_bytes == 2**30
    wait_for("every pod ready", lambda: all(cluster.ready(name) for name in cluster.pods), cluster)
    learner = cluster.of("spiral-learner")[0]
    assert "spiral-learner-0.spiral-learner.spiral.svc.cluster.local" in learner.aliases
    before = (total(cluster, "spiral-actor", "spiral_actor_env_steps_total"),
              total(cluster, "spiral-learner", "spiral_learner_updates_total"),
              total(cluster, "spiral-discriminator", "spiral_discriminator_parameter_version"))
    wait_for("frames, learner updates and the discriminator's version to rise", lambda: (
        total(cluster, "spiral-actor", "spiral_actor_env_steps_total") > before[0]
        and total(cluster, "spiral-learner", "spiral_learner_updates_total") > before[1] + 2
        and total(cluster, "spiral-discriminator", "spiral_discriminator_parameter_version") > before[2]), cluster)
    assert all(cluster.restarts(name) == 0 for name in cluster.pods), {n: cluster.last_termination(n)
                                                                       for n in cluster.pods}


def test_actor_pods_add_frames_1_2_4_and_the_policy_lag_stays_bounded(cluster: ManifestCluster) -> None:
    """Each actor pod is held to 200m: frames/s must rise with the pods (>= 1.7x at 2, >= 3x at 4)."""
    stages = (1, 2, 4, 1)  # up, and back down
    rates: list[float] = []
    lags: list[list[float]] = []
    for replicas in stages:
        lags.append([])
        scale_and_settle(cluster, replicas, lags[-1])
        rates.append(frames_per_second(cluster, 60, lags[-1]))
    # One pod's rate drifts by a few percent from window to window (the policy changes what it
    # paints): the baseline is both 1-pod windows of the run, before and after.
    one = (rates[0] + rates[3]) / 2
    two, four = rates[1] / one, rates[2] / one
    print(f"frames/s with 1, 2, 4 actor pods (200m each): {rates[0]:.0f}, {rates[1]:.0f}, {rates[2]:.0f}; back to 1: "
          f"{rates[3]:.0f} ({two:.2f}x and {four:.2f}x the 1-pod mean {one:.0f}); largest actor policy lag per "
          f"stage {[max(stage) for stage in lags]} versions")
    assert two >= 1.7 and four >= 3.0, rates
    cfg_lag = 100  # learner.max_policy_lag in deploy/overlays/kind/tiny.yaml: past it, unrolls are refused
    assert all(max(stage) <= cfg_lag for stage in lags), lags
    scale_and_settle(cluster, 4, [])  # the faults below, at scale


def pod_metric(cluster: ManifestCluster, workload: str, metric: str, labels: dict[str, str] | None = None) -> float:
    """A metric summed over a workload's pods, optionally only the samples carrying ``labels``."""
    value = 0.0
    for pod in cluster.of(workload):
        try:
            with urllib.request.urlopen(cluster.metrics_url(pod.name), timeout=2) as response:  # noqa: S310
                text = response.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == metric and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    value += sample.value
    return value


def kill_and_time_recovery(cluster: ManifestCluster, workload: str, recovered: Callable[[], bool]) -> dict[str, float]:
    """SIGKILL the workload's pod; seconds from the harness's restart to ``recovered()``, and the actors' drops."""
    pod = cluster.of(workload)[0].name
    dropped = {to: pod_metric(cluster, "spiral-actor", "spiral_actor_dropped_episodes_total", {"to": to})
               for to in ("learner", "replay")}
    restarts = cluster.restarts(pod)
    killed_at = time.monotonic()
    cluster.kill(pod)
    wait_for(f"{workload} restarted", lambda: cluster.restarts(pod) > restarts, cluster, timeout=60)
    restarted_at = time.monotonic()
    wait_for(f"{workload} recovered", recovered, cluster, timeout=120)
    recovered_at = time.monotonic()
    return {"down_s": round(restarted_at - killed_at, 1), "recovery_after_restart_s": round(recovered_at - restarted_at, 1),
            **{f"episodes_dropped_to_{to}": pod_metric(cluster, "spiral-actor", "spiral_actor_dropped_episodes_total",
                                                       {"to": to}) - before for to, before in dropped.items()}}


def test_with_4_actor_pods_a_killed_replay_buffer_and_discriminator_recover_within_60_s(
        cluster: ManifestCluster) -> None:
    """Each pod SIGKILLed in turn; the restart policy starts it; the system trains again without anyone's help."""
    assert len(cluster.of("spiral-actor")) == 4
    report: dict[str, dict[str, float]] = {}

    held = pod_metric(cluster, "spiral-replaybuffer", "spiral_replay_size_items")

    def replay_serving_the_discriminator_again() -> bool:
        # The new process counts from zero: it took renders, and the discriminator trains on its samples.
        if pod_metric(cluster, "spiral-replaybuffer", "spiral_replay_inserts_total") <= 0:
            return False
        return pod_metric(cluster, "spiral-replaybuffer", "spiral_replay_samples_total") > 0
    report["replay buffer"] = kill_and_time_recovery(cluster, "spiral-replaybuffer",
                                                     replay_serving_the_discriminator_again)
    report["replay buffer"]["renders_lost_from_the_table"] = held  # SIGKILL: no save on the way down

    version_before = pod_metric(cluster, "spiral-discriminator", "spiral_discriminator_parameter_version")
    learner_sees = pod_metric(cluster, "spiral-learner", "spiral_learner_discriminator_version")
    resumed: list[float] = []

    def discriminator_training_and_scoring_again() -> bool:
        updates = pod_metric(cluster, "spiral-discriminator", "spiral_discriminator_updates_total")
        version = pod_metric(cluster, "spiral-discriminator", "spiral_discriminator_parameter_version")
        if version > 0 and not resumed:
            resumed.append(version)  # its first version after the restart: where it resumed
        return updates > 0 and pod_metric(cluster, "spiral-learner", "spiral_learner_discriminator_version") \
            != learner_sees
    report["discriminator"] = kill_and_time_recovery(cluster, "spiral-discriminator",
                                                     discriminator_training_and_scoring_again)
    report["discriminator"]["versions_rolled_back"] = max(0.0, version_before - (resumed[0] if resumed else 0.0))
    print(f"faults with 4 actor pods: {report}")
    for what, figures in report.items():
        assert figures["recovery_after_restart_s"] <= 60, (what, figures)


def test_a_killed_learner_resumes_from_its_checkpoint_and_the_actors_reconnect(cluster: ManifestCluster) -> None:
    learner = cluster.of("spiral-learner")[0].name
    # The overlay checkpoints every 50 updates: be past the first one.
    wait_for("a learner checkpoint", lambda: total(cluster, "spiral-learner", "spiral_learner_parameter_version") >= 60,
             cluster, timeout=400)
    version = total(cluster, "spiral-learner", "spiral_learner_parameter_version")
    restarts = cluster.restarts(learner)
    cluster.kill(learner)
    frames_down = total(cluster, "spiral-actor", "spiral_actor_env_steps_total")
    wait_for("the restart policy to start the learner again", lambda: cluster.restarts(learner) == restarts + 1,
             cluster, timeout=60)
    assert cluster.last_termination(learner)["reason"] == "Error"  # SIGKILL: exit code 137, not an OOM
    wait_for("the learner ready again", lambda: cluster.ready(learner), cluster)
    logs = cluster.logs(learner, tail=400)
    assert "resumed policy learner from checkpoint version" in logs, logs
    resumed = int(logs.split("resumed policy learner from checkpoint version")[1].split()[0])
    assert 0 < resumed <= version
    wait_for("the learner at or past its version before the kill",
             lambda: total(cluster, "spiral-learner", "spiral_learner_parameter_version") >= version, cluster)
    wait_for("the actors stepping again", lambda: total(cluster, "spiral-actor", "spiral_actor_env_steps_total")
             > frames_down + 100, cluster)
    print(f"learner killed at version {version:.0f}: resumed from {resumed} ({version - resumed:.0f} versions rolled "
          f"back); unrolls dropped by the actors meanwhile: "
          f"{pod_metric(cluster, 'spiral-actor', 'spiral_actor_dropped_episodes_total', {'to': 'learner'}):.0f} "
          f"episodes in all")


def test_a_container_past_its_liveness_threshold_is_reported(cluster: ManifestCluster) -> None:
    replay = cluster.of("spiral-replaybuffer")[0]
    docker("pause", replay.container_name)
    try:
        probe = replay.probes["livenessProbe"].spec
        budget = (int(probe["failureThreshold"]) + 1) * (float(probe["periodSeconds"]) + float(probe["timeoutSeconds"]))
        wait_for("the replay buffer's liveness failures reported", lambda: cluster.liveness_exceeded(replay.name),
                 cluster, timeout=budget + 30)
    finally:
        docker("unpause", replay.container_name)
    failures = cluster.probe_failures(replay.name)
    assert any("livenessProbe failed" in f and "past the failureThreshold" in f for f in failures), failures


def test_a_pod_over_its_memory_limit_is_oomkilled_and_restarted_with_back_off() -> None:
    hog = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "memory-hog"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "hog"}}, "template": {
               "metadata": {"labels": {"app": "hog"}},
               "spec": {"containers": [{
                   "name": "hog", "image": IMAGE,
                   # Writes 512 MiB, twice its limit, after the harness has read its cgroups.
                   "command": ["python3", "-c", "import time; time.sleep(3); b = b'x' * (512 * 2**20); "
                                                "time.sleep(60)"],
                   "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                 "limits": {"cpu": "100m", "memory": "128Mi"}}}]}}}}
    cluster = ManifestCluster([hog])
    cluster.up()
    try:
        pod = cluster.of("memory-hog")[0].name
        assert cluster.of("memory-hog")[0].limits.memory_bytes == 128 * 2**20
        # The first restart comes at once, the second after the 10 s back-off.
        wait_for("two restarts", lambda: cluster.restarts(pod) >= 2, cluster, timeout=90)
        termination = cluster.last_termination(pod)
        assert termination is not None and termination["reason"] == "OOMKilled", termination
        assert termination["exit_code"] == 137
    finally:
        cluster.down()
