"""Held-out evaluation while training (``learner.eval_every_updates``, :mod:`learner.evaluation`).

* A real learner, fed real episodes, evaluates a snapshot of its weights every few updates on
  a thread of its own (never the update thread) and publishes the report: TensorBoard scalars
  ``eval/...`` (read back from the event file), a ``learner.jsonl`` event row and the gauge
  ``spiral_learner_eval{measure=...}`` on the real metrics endpoint; PBT's reconstruction
  fitness is that report's, not a measurement of its own.
* The evaluation is of the snapshot: weights changed after it was taken do not change it; an
  evaluation due while one runs is skipped and counted; the update thread keeps its torch threads.
* Unconditional MNIST reports the digit-feature distance; unconditional faces have no measure
  and say so, once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import threading
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from learner.evaluation import HeldoutEvaluator, prepare_holdout
from learner.learner import PolicyLearner
from learner.population import MISSING_FITNESS, PopulationMember, fitness_for, heldout_fitness
from pbt_controller.controller import Controller
from pbt_controller.discovery import StaticDiscovery
from pbt_controller.service import PBTControllerServicer
from pbt_controller.state import StateStore
from spiral.agent.acting import EpisodeRunner
from spiral.config import ExperimentConfig, ServicesConfig, experiment_path, load_experiment
from spiral.data import for_experiment
from spiral.envs import make_env
from spiral.evaluation.heldout import HeldoutSet, heldout_measure
from spiral.nets import build_policy
from spiral.rpc.server import build_server
from spiral.runtime.members import MemberAddresses
from spiral.runtime.metrics import serve_metrics
from spiral.runtime.recorder import UpdateRecorder
from system_harness import http_get

EPISODES = 4
"""Held-out episodes per evaluation: enough to measure, cheap on 2 cores."""


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_experiment(experiment_path("tiny"), overrides={
        "env": {"paint": {"backend": "fast"}},
        "learner": {"batch_size": 4, "compile": False, "checkpoint_every_updates": 0, "sample_grid_every_updates": 0,
                    "eval_every_updates": 2, "eval_episodes": EPISODES}})


@pytest.fixture(scope="module")
def holdout(cfg: ExperimentConfig) -> HeldoutSet:
    return prepare_holdout(cfg)  # loads the dataset, and the digit classifier (trained once, cached)


def episodes(cfg: ExperimentConfig, policy: torch.nn.Module):  # noqa: ANN201 - an iterator of Unrolls
    runner = EpisodeRunner(cfg, make_env(cfg, cfg.learner.batch_size, seed=0), policy, for_experiment(cfg).images,
                           seed=0, actor_id="test")
    while True:
        yield runner.run_episode()


def metric_line(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a scraped exposition (its labels in any order)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not exported")


def test_the_learner_evaluates_a_snapshot_off_the_update_thread_and_publishes_it_everywhere(
        cfg: ExperimentConfig, tmp_path: Path) -> None:
    server = serve_metrics(0, "127.0.0.1")
    learner = PolicyLearner(cfg, tmp_path, member=7)
    try:
        assert learner.evaluator.active
        assert heldout_fitness(learner) != heldout_fitness(learner)  # nan: no evaluation yet
        unrolls = episodes(cfg, learner.policy)
        for _ in range(2):
            learner.submit(next(unrolls))
            assert learner.step(timeout=5.0) is not None
        assert learner.evaluator.wait_idle(timeout=300)
        report = learner.evaluator.latest
        assert report is not None and report.available and learner.evaluator.failures == 0
        assert learner.evaluator.latest_version == 2 and report.episodes == EPISODES
        assert learner.evaluator.thread_ids and threading.get_ident() not in learner.evaluator.thread_ids
        measures = report.measures
        assert {"l2_sampled", "l2_greedy", "ratio_sampled", "ratio_greedy", "baseline_l2"} <= set(measures)
        assert measures["ratio_sampled"] == pytest.approx(measures["l2_sampled"] / measures["baseline_l2"])
        assert report.baseline == "blank canvas"

        # PBT ranks by this report: minus its sampled L2, without measuring again.
        assert fitness_for(cfg)(learner) == -measures["l2_sampled"]

        status, text = http_get(f"http://127.0.0.1:{server.server_port}/metrics")
        assert status == 200
        for name in ("l2_sampled", "l2_greedy", "ratio_sampled", "ratio_greedy"):
            assert metric_line(text, "spiral_learner_eval", member="7", measure=name) == pytest.approx(measures[name])
        assert metric_line(text, "spiral_learner_eval", member="7", measure="update") == 2
    finally:
        learner.close()
        server.shutdown()
        server.server_close()

    rows = [json.loads(line) for line in (tmp_path / "learner.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r.get("event") == "eval"]
    assert row["update"] == 2 and row["updates"] == 2 and row["baseline"] == "blank canvas"
    assert row["l2_sampled"] == pytest.approx(measures["l2_sampled"]) and row["eval_seconds"] > 0

    events = EventAccumulator(str(tmp_path / "tensorboard" / "learner-7"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"eval/l2_sampled", "eval/l2_greedy", "eval/ratio_sampled", "eval/ratio_greedy"} <= set(
        events.Tags()["scalars"])
    assert {e.step: e.value for e in events.Scalars("eval/l2_sampled")} == pytest.approx({2: measures["l2_sampled"]})


def test_the_evaluation_is_of_the_snapshot_and_one_due_while_it_runs_is_skipped(
        cfg: ExperimentConfig, holdout: HeldoutSet, tmp_path: Path) -> None:
    torch.manual_seed(3)
    policy = build_policy(cfg)
    expected = heldout_measure(cfg, copy.deepcopy(policy), holdout, seed=cfg.learner.eval_seed)
    gate = threading.Event()

    def held_back() -> HeldoutSet:  # the evaluator's first step waits until the live weights changed
        gate.wait(60)
        return holdout

    recorder = UpdateRecorder(tmp_path, "learner", "snap", (), 0)
    evaluator = HeldoutEvaluator(cfg, recorder, "snap", holdout=held_back)
    try:
        assert evaluator.maybe_submit(policy, updates=2, version=2)
        assert not evaluator.maybe_submit(policy, updates=3, version=3)  # not due: no snapshot, no skip
        assert evaluator.skipped == 0
        with torch.no_grad():  # the live module moves on after the snapshot
            for parameter in policy.parameters():
                parameter.add_(torch.randn_like(parameter))
        assert not evaluator.maybe_submit(policy, updates=4, version=4)  # due, but the previous one runs
        assert evaluator.skipped == 1
        gate.set()
        assert evaluator.wait_idle(timeout=300)
    finally:
        evaluator.close()
        recorder.close()
    assert evaluator.latest is not None and evaluator.latest_version == 2 and evaluator.evaluations == 1
    assert evaluator.latest.measures == expected.measures  # the same seed paints the same episodes
    moved = heldout_measure(cfg, policy, holdout, seed=cfg.learner.eval_seed)
    assert moved.measures != expected.measures  # so the comparison above could fail


def test_the_evaluator_keeps_the_update_threads_torch_threads(
        cfg: ExperimentConfig, holdout: HeldoutSet, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    recorder = UpdateRecorder(tmp_path, "learner", "threads", (), 0)
    evaluator = HeldoutEvaluator(cfg, recorder, "threads", holdout=lambda: holdout)
    seen: list[int] = []
    try:
        assert evaluator.submit(build_policy(cfg).state_dict(), updates=2, version=2)
        assert evaluator.wait_idle(timeout=300) and evaluator.evaluations == 1
        assert torch.get_num_threads() == 2
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [2]  # threads started after the evaluator's take the process's default
    finally:
        evaluator.close()
        recorder.close()
        torch.set_num_threads(before)


def test_unconditional_mnist_reports_the_digit_feature_distance() -> None:
    cfg = load_experiment(experiment_path("tiny-unconditional"), overrides={
        "env": {"paint": {"backend": "fast"}}, "learner": {"eval_episodes": 8}})
    holdout = prepare_holdout(cfg)
    torch.manual_seed(0)
    report = heldout_measure(cfg, build_policy(cfg), holdout, seed=1)
    assert report.available and report.episodes == 8 and report.baseline is None
    assert set(report.measures) == {"digit_fid", "digit_confidence"}
    assert math.isfinite(report.measures["digit_fid"]) and report.measures["digit_fid"] > 0
    assert report.fitness is None  # not PBT's reconstruction fitness


def test_unconditional_faces_have_no_measure_and_say_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_experiment(experiment_path("tiny-faces"), overrides={"env": {"conditional": False}})
    recorder = UpdateRecorder(tmp_path, "learner", "faces", (), 0)
    with caplog.at_level(logging.INFO, logger="learner.evaluation"):
        evaluator = HeldoutEvaluator(cfg, recorder, "faces")
    try:
        assert not evaluator.active
        assert not evaluator.maybe_submit(build_policy(cfg), updates=cfg.learner.eval_every_updates, version=1)
        assert evaluator.latest is None and evaluator.skipped == 0
    finally:
        evaluator.close()
        recorder.close()
    said = [r.getMessage() for r in caplog.records if "no held-out measure for this domain" in r.getMessage()]
    assert len(said) == 1 and "unconditional lfw" in said[0] and "feature network" in said[0]
    (row,) = [json.loads(line) for line in (tmp_path / "learner.jsonl").read_text().splitlines()]
    assert row["event"] == "eval" and row["measure"] is None and "feature network" in row["reason"]
    report = heldout_measure(cfg, build_policy(cfg), HeldoutSet(cfg, for_experiment(cfg), 8), seed=0)
    assert not report.available and not report.measures and "unconditional lfw" in (report.reason or "")


def test_a_population_member_reports_the_newest_evaluation_and_missing_before_the_first(
        cfg: ExperimentConfig, tmp_path: Path) -> None:
    """A real PBT controller on gRPC receives the member's reports: the missing fitness before the
    first evaluation, then minus the evaluation's sampled L2 (the member measures nothing itself)."""
    population = dataclasses.replace(cfg, pbt=dataclasses.replace(cfg.pbt, population_size=2))
    controller = Controller(population.pbt, 2, StateStore(tmp_path / "pbt"), StaticDiscovery(
        {i: MemberAddresses(i, f"learner-{i}:1", f"disc-{i}:2", f"replay-{i}:3") for i in range(2)}),
        actor_timeout=60.0, seed=0)
    server = build_server([PBTControllerServicer(controller).binding()], "127.0.0.1:0", ServicesConfig())
    server.start()
    learner = PolicyLearner(population, tmp_path / "member", member=0)
    member = PopulationMember(learner, 0, server.address, fitness_for(population))

    def reported() -> float:
        (status,) = [m for m in controller.population() if m.record.member == 0]
        return status.record.fitness

    try:
        member.maybe_report()  # update 0: no evaluation yet
        assert math.isnan(member.last_fitness) and reported() == MISSING_FITNESS
        assert learner.evaluator.submit(learner.policy.state_dict(), updates=2, version=learner.version)
        assert learner.evaluator.wait_idle(timeout=300)
        member._next_report = 0  # due again
        member.maybe_report()
        expected = -learner.evaluator.latest.measures["l2_sampled"]
        assert member.last_fitness == expected and reported() == pytest.approx(expected)
    finally:
        member.close()
        learner.close()
        server.stop(grace=1)
