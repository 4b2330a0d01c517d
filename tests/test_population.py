"""A real local population: one member starts with a hopeless learning rate and gets exploited.

Two members (each a learner, a discriminator and a replay buffer), two actors the controller
spreads over them, and the PBT controller, all as real processes. Member 1 starts with a
learning rate of 1e-9, so its policy stays untrained while member 0's improves; within the
test's budget the controller must tell member 1 to copy member 0 (the lineage names the
donor and the hyperparameters change), and training must go on. Then the controller is
killed and restarted: no lineage line and no member is lost.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import pytest

from spiral.rpc.client import make_channel
from spiral.v1 import pbt_pb2, pbt_pb2_grpc
from system_harness import System, write_config

pytestmark = pytest.mark.slow


def _lineage(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_bad_member_is_exploited_and_the_controller_survives_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path, {
        "pbt": {"population_size": 2, "report_every_updates": 4, "ready_updates": 8, "truncation_fraction": 0.5},
        # Reconstruction fitness is the newest held-out evaluation: evaluate often enough to rank.
        "learner": {"checkpoint_every_updates": 20, "sample_grid_every_updates": 0, "eval_every_updates": 8,
                    "eval_episodes": 32},
    })
    system = System(tmp_path / "run", config, num_actors=1, population=2)
    controller = system.child("pbt-controller")
    controller.spec.args += ["--initial-hyperparameters", json.dumps({"1": {"learning_rate": 1e-9}})]
    lineage_path = tmp_path / "run" / "pbt" / "lineage.jsonl"
    with system:
        def exploited() -> bool:
            return any(e["event"] == "exploit" and e["member"] == 1 for e in _lineage(lineage_path))

        system.wait_for("member 1 exploited", exploited, timeout=600)
        event = next(e for e in _lineage(lineage_path) if e["event"] == "exploit" and e["member"] == 1)
        assert event["donor"] == 0
        assert event["hyperparameters_before"]["learning_rate"] == pytest.approx(1e-9)
        assert event["hyperparameters_after"]["learning_rate"] > 1e-6
        # The copy reached learner 1: it applied the donor's training state, which raised its
        # version (so actors pick the copied weights up), and it keeps training.
        learner_log = system.child("learner-1").spec.log_path
        system.wait_for("learner 1 applying the copy", lambda: "applied PBT copy" in learner_log.read_text())
        scraped = system.metrics("learner-1")  # one scrape: version and updates of the same moment
        version, updates = scraped["spiral_learner_parameter_version"], scraped["spiral_learner_updates_total"]
        assert version > updates  # a copy raises the version without being an update
        system.wait_for("learner 1 training after the copy",
                        lambda: system.value("learner-1", "spiral_learner_updates_total") > updates + 2)
        assert system.value("learner-1", "spiral_learner_parameter_version") > version

        # Kill the controller and start it again: members, hyperparameters and lineage survive.
        channel = make_channel(controller.spec.grpc_address, write_config_services(config))
        stub = pbt_pb2_grpc.PBTControllerStub(channel)
        before = stub.Population(pbt_pb2.PopulationRequest(), timeout=10)
        lines_before = lineage_path.read_text()
        system.kill("pbt-controller", signal.SIGKILL)
        channel.close()
        system.restart("pbt-controller")
        # A fresh channel: the old one may still read READY from before the kill, so waiting on
        # it could return at once and the call would race the restarted process's bind.
        channel = make_channel(controller.spec.grpc_address, write_config_services(config))
        stub = pbt_pb2_grpc.PBTControllerStub(channel)
        grpc.channel_ready_future(channel).result(timeout=60)
        after = stub.Population(pbt_pb2.PopulationRequest(), timeout=30, wait_for_ready=True)
        assert lineage_path.read_text().startswith(lines_before)
        assert [m.member for m in after.members] == [m.member for m in before.members] == [0, 1]
        events = _lineage(lineage_path)  # read after `after`: it holds every event `after` counts
        for old, new in zip(before.members, after.members):
            # Nothing is lost. Member 1 trains on and may stay the worse, so it can be exploited
            # again between `before` and `after`; its state is then that exploit's, as the lineage
            # (written before the controller counts an exploit) says.
            explores = [e for e in events if e["event"] == "explore" and e["member"] == new.member]
            assert old.exploits <= new.exploits <= len(explores)
            expected = (explores[new.exploits - 1]["hyperparameters_after"] if new.exploits > old.exploits
                        else dict(old.hyperparameters))
            assert dict(new.hyperparameters) == pytest.approx(expected)
        # Reports keep arriving after the restart.
        reported = {m.member: m.updates for m in after.members}
        system.wait_for("reports after the controller restart", lambda: any(
            m.updates > reported[m.member]
            for m in stub.Population(pbt_pb2.PopulationRequest(), timeout=10).members), timeout=180)
        channel.close()
    assert (tmp_path / "run" / "pbt" / "population.png").exists()


def write_config_services(config: Path):  # noqa: ANN201 - ServicesConfig
    from spiral.config import load_experiment
    return load_experiment(config).services
