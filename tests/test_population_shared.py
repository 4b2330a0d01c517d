"""A real local population with one shared discriminator (SPIRAL++'s population discriminator).

Two members, each a learner with one actor, one replay buffer and one discriminator (member
0's) for both, and the PBT controller, all as real processes (``spiral up --population 2
--shared-discriminator``). Both members' actors insert into the one replay buffer, the one
discriminator trains on it and both learners score with it (their critic version rises past
0), nothing is refused as another member's, and when member 1 (a hopeless learning rate) is
exploited the lineage says the discriminator is shared and no ``LoadFrom`` is attempted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from system_harness import System, write_config

pytestmark = pytest.mark.slow


def _lineage(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_members_share_one_discriminator_and_replay_buffer(tmp_path: Path) -> None:
    config = write_config(tmp_path, {
        "pbt": {"population_size": 2, "shared_discriminator": True, "report_every_updates": 4, "ready_updates": 8,
                "truncation_fraction": 0.5},
        "learner": {"checkpoint_every_updates": 20, "sample_grid_every_updates": 0},
    })
    system = System(tmp_path / "run", config, num_actors=1, population=2)
    names = {child.spec.name for child in system.supervisor.children}
    assert {"discriminator-0", "replaybuffer-0", "learner-0", "learner-1"} <= names
    assert not {"discriminator-1", "replaybuffer-1"} & names
    controller = system.child("pbt-controller")
    controller.spec.args += ["--initial-hyperparameters", json.dumps({"1": {"learning_rate": 1e-9}})]
    lineage_path = tmp_path / "run" / "pbt" / "lineage.jsonl"
    with system:
        # Both learners score with the one discriminator (its version reaches each of them).
        for learner in ("learner-0", "learner-1"):
            system.wait_for(f"{learner} scored with the shared discriminator",
                            lambda learner=learner: system.value(learner, "spiral_learner_discriminator_version") > 0,
                            timeout=300)
        system.wait_for("the shared discriminator training",
                        lambda: system.value("discriminator-0", "spiral_discriminator_updates_total") > 3)
        # Renders from both members' actors land in the one buffer, none refused as another member's.
        system.wait_for("renders from both actors", lambda: all(
            system.value(actor, "spiral_actor_episodes_total") > 0 for actor in ("actor-0-0", "actor-1-0")))
        rejected = system.metrics("replaybuffer-0")
        assert rejected.get("spiral_rejected_messages_total", 0.0) == 0.0, system.logs()
        assert system.value("replaybuffer-0", "spiral_replay_inserts_total") > 0

        def exploited() -> bool:
            return any(e["event"] == "exploit" and e["member"] == 1 for e in _lineage(lineage_path))

        system.wait_for("member 1 exploited", exploited, timeout=600)
        event = next(e for e in _lineage(lineage_path) if e["event"] == "exploit" and e["member"] == 1)
        assert event["donor"] == 0 and event["discriminator"] == "shared"
        updates = system.value("learner-1", "spiral_learner_updates_total")
        system.wait_for("learner 1 training after the copy",
                        lambda: system.value("learner-1", "spiral_learner_updates_total") > updates + 2)
    logs = (tmp_path / "run" / "logs" / "learner-1.log").read_text()
    assert "not copying a discriminator (the population shares one discriminator)" in logs
    assert "could not copy" not in logs
    disc_log = (tmp_path / "run" / "logs" / "discriminator-0.log").read_text()
    assert "copying donor" not in disc_log and "wrong_member" not in disc_log
