"""Experiment configuration: every shipped file loads; bad input names the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from spiral.config import ConfigError, dump_experiment, experiment_path, from_dict, load_experiment

EXPERIMENTS = sorted(Path(__file__).resolve().parent.parent.joinpath("experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiments_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_experiment(path)
    out = tmp_path / "again.yaml"
    dump_experiment(cfg, out)
    assert load_experiment(out) == cfg


def test_expected_experiments_exist() -> None:
    assert {p.stem for p in EXPERIMENTS} >= {"tiny", "mnist", "omniglot", "celeba", "mujoco"}


@pytest.mark.parametrize("data, field", [
    ({"learner": {"lr": 1e-3}}, "learner.lr"),
    ({"env": {"paint": {"gridsize": 3}}}, "env.paint.gridsize"),
    ({"learner": {"batch_size": "many"}}, "learner.batch_size"),
    ({"learner": {"batch_size": 0}}, "learner.batch_size"),
    ({"learner": {"discount": 1.5}}, "learner.discount"),
    ({"env": {"paint": {"backend": "opengl"}}}, "env.paint.backend"),
    ({"env": {"paint": {"brush_sizes": [1, -2]}}}, "env.paint.brush_sizes"),
    ({"dataset": {"name": "celeba"}}, "dataset.path"),
    ({"replay": {"min_size": 10_000}}, "replay.min_size"),
    ({"learner": {"learning_rate": "fast"}}, "learner.learning_rate"),
    ({"learner": {"reward": {"l2_weight": "abc"}}}, "learner.reward.l2_weight"),
    ({"env": {"paint": {"brush_sizes": ["big"]}}}, "env.paint.brush_sizes"),
    ({"actor": {"stall_seconds": 0}}, "actor.stall_seconds"),
    ({"learner": {"ppo_clip": 1.5}}, "learner.ppo_clip"),
    ({"learner": {"policy_average_decay": 1.0}}, "learner.policy_average_decay"),
])
def test_invalid_fields_are_named(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(data)


def test_numbers_from_yaml_strings_are_accepted() -> None:
    cfg = from_dict({"learner": {"learning_rate": "3e-4"}, "env": {"paint": {"brush_sizes": [1, 2]}}})
    assert cfg.learner.learning_rate == pytest.approx(3e-4)
    assert cfg.env.paint.brush_sizes == (1.0, 2.0)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  entropy: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: learner\.entropy"):
        load_experiment(bad)


def test_every_config_field_has_a_docstring() -> None:
    """Each field of every ``*Config`` dataclass is followed by its one-line (or longer) docstring."""
    import ast

    import spiral.config

    tree = ast.parse(Path(spiral.config.__file__).read_text())
    missing = []
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name.endswith("Config")):
            continue
        for index, statement in enumerate(node.body):
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                following = node.body[index + 1] if index + 1 < len(node.body) else None
                if not (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                        and isinstance(following.value.value, str) and following.value.value.strip()):
                    missing.append(f"{node.name}.{statement.target.id}")
    assert missing == []


def test_the_pbt_controller_forgets_actors_after_four_missed_heartbeats() -> None:
    cfg = load_experiment(experiment_path("tiny"), {"pbt": {"actor_heartbeat_seconds": 5.0}})
    assert cfg.pbt.actor_timeout_seconds == 20.0
    with pytest.raises(ConfigError, match="pbt.actor_heartbeat_seconds"):
        load_experiment(experiment_path("tiny"), {"pbt": {"actor_heartbeat_seconds": 0}})
