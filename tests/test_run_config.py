"""A run directory keeps the experiment it was started with and is resumed only with that one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spiral.commands.cli import main as spiral_main
from spiral.config import experiment_path, load_experiment, resolve_experiment
from spiral.runtime.run_config import RunConfigMismatch, config_differences, record_run_config


def test_a_run_keeps_its_resolved_config_and_how_it_was_made(tmp_path: Path) -> None:
    (tmp_path / "variant.yaml").write_text("base: tiny\nname: variant\nlearner:\n  batch_size: 8\n")
    resolved = resolve_experiment(tmp_path / "variant.yaml", ["seed=3", "learner.reward.band=[-5, 5]"])
    config_path = record_run_config(tmp_path / "run", resolved)
    assert load_experiment(config_path) == resolved.config
    assert "base" not in yaml.safe_load(config_path.read_text())
    assert yaml.safe_load((tmp_path / "run" / "overrides.yaml").read_text()) == {
        "experiment": str(tmp_path / "variant.yaml"), "bases": [str(experiment_path("tiny"))],
        "set": ["seed=3", "learner.reward.band=[-5, 5]"]}


def test_a_run_resumes_with_the_same_experiment_however_it_is_spelled(tmp_path: Path) -> None:
    record_run_config(tmp_path, resolve_experiment(experiment_path("tiny"), ["seed=3"]))
    (tmp_path / "same.yaml").write_text("base: tiny\nseed: 3\n")
    record_run_config(tmp_path, resolve_experiment(tmp_path / "same.yaml"))
    assert load_experiment(tmp_path / "config.yaml").seed == 3


def test_a_run_of_another_experiment_is_refused_naming_the_fields_and_nothing_is_written(tmp_path: Path) -> None:
    record_run_config(tmp_path, resolve_experiment(experiment_path("tiny"), ["seed=3"]))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RunConfigMismatch, match=r"cannot be resumed with this one: env\.conditional: True there, "
                                                r"False now; seed: 3 there, 0 now\. It was started from .*tiny\.yaml "
                                                r"with --set seed=3"):
        record_run_config(tmp_path, resolve_experiment(experiment_path("tiny"), ["env.conditional=false"]))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "config.yaml").write_text("learner:\n  no_longer_a_field: 1\n")
    with pytest.raises(RunConfigMismatch, match=r"no longer loads .*learner\.no_longer_a_field: unknown field"):
        record_run_config(tmp_path, resolve_experiment(experiment_path("tiny")))


def test_differences_name_dotted_fields_on_both_sides() -> None:
    assert config_differences({"a": {"b": 1, "c": [1, 2]}, "d": 0}, {"a": {"b": 2, "c": [1, 2]}, "d": 0, "e": 5}) == [
        "a.b: 1 there, 2 now", "e: None there, 5 now"]


def test_local_takes_set_and_seed_and_refuses_a_run_of_other_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record_run_config(tmp_path, resolve_experiment(experiment_path("tiny"), ["seed=3", "learner.batch_size=8"]))
    args = ["local", "--config", "tiny", "--run-dir", str(tmp_path), "--updates", "1"]
    assert spiral_main([*args, "--seed", "4", "--set", "learner.batch_size=8"]) == 2
    assert "seed: 3 there, 4 now" in capsys.readouterr().err
    assert spiral_main([*args, "--set", "learner.batch_size=0"]) == 2
    assert "spiral local: --set learner.batch_size=0: learner.batch_size: must be >= 1" in capsys.readouterr().err
