"""The whole system as real processes: parameters flow, and it survives killed and restarted services.

One system is started per test (replay buffer, discriminator, policy learner, two actors) with
the tiny CPU experiment made to turn over quickly; the assertions read each process's own
Prometheus endpoint, as a dashboard would.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from spiral.runtime.checkpoint import latest_checkpoint
from system_harness import System, http_get, write_config

pytestmark = pytest.mark.slow


def healthz(system: System, name: str) -> tuple[int, bool]:
    """An actor's ``/healthz``: HTTP status, and whether its text reports the episode loop."""
    status, text = http_get(system.child(name).spec.metrics_url.rsplit("/", 1)[0] + "/healthz")
    return status, "actor episode loop" in text


def test_parameters_flow_and_services_survive_kills_and_restarts(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with System(tmp_path / "run", config, num_actors=2) as system:
        cluster = json.loads((tmp_path / "run" / "cluster.json").read_text())
        assert {p["role"] for p in cluster["processes"]} == {"actor", "learner", "discriminator", "replaybuffer"}

        # Parameters flow: actors act with rising versions, the learner consumes, the replay
        # buffer fills, the discriminator steps, and rewards come from critic versions above 0.
        system.wait_for("learner version >= 3", lambda: system.value("learner", "spiral_learner_parameter_version") >= 3)
        system.wait_for("an actor acting with version >= 2",
                        lambda: system.value("actor-0", "spiral_actor_policy_version") >= 2)
        system.wait_for("replay buffer holding renders", lambda: system.value("replaybuffer", "spiral_replay_size_items") > 0)
        system.wait_for("discriminator updates", lambda: system.value("discriminator", "spiral_discriminator_updates_total") >= 2)
        system.wait_for("learner scoring with a discriminator version > 0",
                        lambda: system.value("learner", "spiral_learner_discriminator_version") > 0)
        assert system.value("learner", "spiral_learner_frames_total") > 0
        assert healthz(system, "actor-0") == (200, True), "a running actor's liveness endpoint"

        # Kill one actor: the learner keeps training on the other.
        system.kill("actor-0", signal.SIGKILL)
        updates = system.value("learner", "spiral_learner_updates_total")
        system.wait_for("learner updates after an actor died",
                        lambda: system.value("learner", "spiral_learner_updates_total") >= updates + 2)

        # Kill the learner outright: restarted, it resumes from its last checkpoint at the same
        # or a later version, and the surviving actor reconnects and feeds it.
        system.wait_for("a learner checkpoint", lambda: latest_checkpoint(tmp_path / "run" / "learner") is not None)
        system.kill("learner", signal.SIGKILL)
        restored = latest_checkpoint(tmp_path / "run" / "learner")
        assert restored is not None
        checkpoint_version = restored[0]
        system.restart("learner")
        system.wait_for("the restarted learner serving metrics",
                        lambda: "spiral_learner_parameter_version" in system.metrics("learner"))
        assert system.value("learner", "spiral_learner_parameter_version") >= checkpoint_version
        system.wait_for("updates of the restarted learner",
                        lambda: system.value("learner", "spiral_learner_updates_total") >= 2)
        assert system.value("learner", "spiral_learner_parameter_version") >= checkpoint_version + 2
        # Waiting on the dead learner was not a stall: the surviving actor stayed alive.
        assert healthz(system, "actor-1") == (200, True)

        # Restart the replay buffer (graceful stop): actors and the discriminator reconnect.
        system.kill("replaybuffer", signal.SIGTERM)
        system.restart("replaybuffer")
        system.wait_for("renders in the restarted replay buffer",
                        lambda: system.value("replaybuffer", "spiral_replay_inserts_total") > 0)
        critic_updates = system.value("discriminator", "spiral_discriminator_updates_total")
        system.wait_for("discriminator updates from the restarted replay buffer",
                        lambda: system.value("discriminator", "spiral_discriminator_updates_total") > critic_updates)

    # A clean stop leaves checkpoints and a sample grid behind.
    run = tmp_path / "run"
    assert latest_checkpoint(run / "learner") is not None
    assert latest_checkpoint(run / "discriminator") is not None
    assert (run / "samples" / "latest.png").exists()
