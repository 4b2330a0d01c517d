"""The kind overlay's pods, run as real containers of the built image (``make image-test``).

``kubectl kustomize deploy/overlays/kind`` is turned into containers by
:class:`manifest_containers.ManifestCluster` (what each takes from the manifests is in its
docstring); the test then checks, from outside, what a cluster operator would:

* every pod passes its declared startup and readiness probes, and the system trains: actor
  frames, learner updates and the discriminator's version rise on the Prometheus endpoints;
* scaling the actor Deployment from 2 to 4 containers: the new actors step and the system's
  frames/s is measured before and after (printed; on a 2-core machine the learner, not the
  actors, bounds it, so the test requires the 4 actors to step, not a higher total);
* the learner container killed and started again on the same volume resumes from its
  checkpoint at the same or a later version, and the actors reconnect (their frames rise again);
* a container that runs past its liveness probe's failure threshold (the replay buffer,
  paused) is reported.

Skipped without ``SPIRAL_IMAGE_TESTS=1`` (it needs Docker and the image).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest

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


def frames_per_second(cluster: ManifestCluster, seconds: float) -> float:
    start, t0 = total(cluster, "spiral-actor", "spiral_actor_env_steps_total"), time.monotonic()
    time.sleep(seconds)
    return (total(cluster, "spiral-actor", "spiral_actor_env_steps_total") - start) / (time.monotonic() - t0)


@pytest.fixture(scope="module")
def cluster():  # noqa: ANN201 - ManifestCluster
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} is not built: run make image")
    manifests = ManifestCluster(render(ROOT / "deploy" / "overlays" / "kind"))
    manifests.up()
    try:
        yield manifests
    finally:
        manifests.down()


def test_the_pods_turn_ready_and_the_system_trains(cluster: ManifestCluster) -> None:
    assert {w: len(cluster.of(w)) for w in cluster.workloads} == {
        "spiral-actor": 2, "spiral-discriminator": 1, "spiral-learner": 1, "spiral-replaybuffer": 1}
    assert any("resources" in line for line in cluster.ignored)  # and the harness said so
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


def test_scaling_the_actors_from_2_to_4(cluster: ManifestCluster) -> None:
    two = frames_per_second(cluster, 30)
    cluster.scale("spiral-actor", 4)
    actors = cluster.of("spiral-actor")
    assert len(actors) == 4
    wait_for("the new actors to step", lambda: all(
        scrape(cluster.metrics_url(pod.name)).get("spiral_actor_env_steps_total", 0) > 0 for pod in actors), cluster)
    four = frames_per_second(cluster, 30)
    print(f"frames/s with 2 actors: {two:.0f}; with 4: {four:.0f} ({four / max(two, 1e-9):.2f}x)")
    assert four > 0 and two > 0
    cluster.scale("spiral-actor", 2)


def test_a_killed_learner_resumes_from_its_checkpoint_and_the_actors_reconnect(cluster: ManifestCluster) -> None:
    learner = cluster.of("spiral-learner")[0].name
    # The overlay checkpoints every 50 updates: be past the first one.
    wait_for("a learner checkpoint", lambda: total(cluster, "spiral-learner", "spiral_learner_parameter_version") >= 60,
             cluster, timeout=400)
    version = total(cluster, "spiral-learner", "spiral_learner_parameter_version")
    cluster.kill(learner)
    frames_down = total(cluster, "spiral-actor", "spiral_actor_env_steps_total")
    cluster.start(learner)
    wait_for("the learner ready again", lambda: cluster.ready(learner), cluster)
    logs = cluster.logs(learner, tail=400)
    assert "resumed policy learner from checkpoint version" in logs, logs
    resumed = int(logs.split("resumed policy learner from checkpoint version")[1].split()[0])
    assert 0 < resumed <= version
    wait_for("the learner at or past its version before the kill",
             lambda: total(cluster, "spiral-learner", "spiral_learner_parameter_version") >= version, cluster)
    wait_for("the actors stepping again", lambda: total(cluster, "spiral-actor", "spiral_actor_env_steps_total")
             > frames_down + 100, cluster)


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
