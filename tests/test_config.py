"""Experiment configuration: every shipped file loads; bases and overrides; bad input names the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from spiral.commands.cli import main as spiral_main
from spiral.config import (ConfigError, ExperimentConfig, dump_experiment, experiment_path, from_dict, load_experiment,
                           parse_overrides, read_experiment_file, resolve_experiment, split_override_items, to_dict)

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


@pytest.mark.parametrize("paint, message", [
    ({"gray_levels": -1}, "env.paint.gray_levels: must be >= 0"),
    ({"gray_levels": 1}, r"env.paint.gray_levels: must be 0 \(black strokes\) or >= 2"),
    ({"gray_levels": 8, "use_color": True}, "env.paint.gray_levels: must be 0 with use_color"),
])
def test_gray_levels_are_none_or_at_least_two_and_never_with_colour(paint: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict({"env": {"paint": paint}})
    gray = from_dict({"env": {"paint": {"gray_levels": 8}}})
    assert gray.env.paint.gray_levels == 8 and gray.image_channels == 1


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


# -- base: an experiment is a base and its differences --------------------------------------------

def test_a_file_overrides_its_base_and_a_base_may_have_a_base(tmp_path: Path) -> None:
    (tmp_path / "middle.yaml").write_text("base: tiny\nlearner:\n  batch_size: 8\n  entropy_cost: 0.5\n")
    (tmp_path / "top.yaml").write_text("base: middle.yaml\nname: top\nlearner:\n  entropy_cost: 0.25\n")
    cfg = load_experiment(tmp_path / "top.yaml")
    tiny = load_experiment(experiment_path("tiny"))
    assert (cfg.name, cfg.learner.batch_size, cfg.learner.entropy_cost) == ("top", 8, 0.25)
    assert cfg.learner.learning_rate == tiny.learner.learning_rate and cfg.env == tiny.env
    chain = read_experiment_file(tmp_path / "top.yaml").chain
    assert [p.name for p in chain] == ["top.yaml", "middle.yaml", "tiny.yaml"]


def test_a_relative_base_path_is_read_from_the_files_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("name: root\nseed: 7\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: ../root.yaml\nname: child\n")
    monkeypatch.chdir(tmp_path / "sub")
    assert load_experiment(tmp_path / "sub" / "child.yaml").seed == 7


def test_a_named_base_is_found_beside_the_file_first(tmp_path: Path) -> None:
    """A copied experiments folder (the image's /app/experiments) resolves its names within itself."""
    (tmp_path / "tiny.yaml").write_text("name: copied-tiny\nseed: 9\n")
    (tmp_path / "variant.yaml").write_text("base: tiny\nname: variant\n")
    assert load_experiment(tmp_path / "variant.yaml").seed == 9
    (tmp_path / "tiny.yaml").unlink()
    assert load_experiment(tmp_path / "variant.yaml").seed == load_experiment(experiment_path("tiny")).seed


def test_a_cycle_of_bases_is_refused_naming_the_whole_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml -> b\.yaml -> a\.yaml"):
        load_experiment(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"self\.yaml -> self\.yaml"):
        load_experiment(tmp_path / "self.yaml")


def test_a_missing_base_names_the_file_that_asked_for_it(tmp_path: Path) -> None:
    (tmp_path / "middle.yaml").write_text("base: no-such-experiment\n")
    (tmp_path / "top.yaml").write_text("base: middle.yaml\n")
    with pytest.raises(ConfigError, match=r"middle\.yaml: base: 'no-such-experiment' is .*no-such-experiment\.yaml, "
                                          r"which does not exist"):
        load_experiment(tmp_path / "top.yaml")
    (tmp_path / "listed.yaml").write_text("base: [tiny]\n")
    with pytest.raises(ConfigError, match=r"listed\.yaml: base: expected an experiment name or a path"):
        load_experiment(tmp_path / "listed.yaml")


def test_base_is_consumed_by_loading_not_a_field() -> None:
    assert "base" not in from_dict({}).__dataclass_fields__
    with pytest.raises(ConfigError, match=r"--set base=tiny: base: unknown field"):
        parse_overrides(["base=tiny"])


# -- --set FIELD=VALUE and SPIRAL_SET --------------------------------------------------------------

def test_override_values_are_yaml_and_nest_by_their_dotted_field() -> None:
    assert parse_overrides(["learner.reward.band=[-5,5]", "env.conditional=false", "seed=3", "dataset.path=",
                            "learner.learning_rate=3e-4", "learner.reward.band=[-4, 4]"]) == {
        "learner": {"reward": {"band": [-4, 4]}, "learning_rate": "3e-4"},
        "env": {"conditional": False}, "seed": 3, "dataset": {"path": ""}}
    cfg = resolve_experiment(experiment_path("tiny"), ["learner.reward.band=[-5,5]", "env.conditional=false",
                                                       "learner.learning_rate=3e-4"]).config
    assert cfg.learner.reward.band == (-5.0, 5.0) and cfg.env.conditional is False
    assert cfg.learner.learning_rate == pytest.approx(3e-4)


@pytest.mark.parametrize("item, message", [
    ("learner.batchsize=3", r"--set learner\.batchsize=3: learner\.batchsize: unknown field \(known: .*batch_size"),
    ("learner=3", r"--set learner=3: learner: a section, not a setting: set one of its fields"),
    ("learner.batch_size", r"--set learner\.batch_size: expected FIELD=VALUE"),
    ("=3", r"--set =3: expected a dotted field before '='"),
    ("learner.batch_size.more=1", r"learner\.batch_size: a setting, not a section"),
    ("learner.reward.band=[1,", r"learner\.reward\.band: the value '\[1,' is not valid YAML"),
    ("env={paint: {gridsize: 4}}", r"--set env=\{paint: \{gridsize: 4\}\}: env\.paint\.gridsize: unknown field"),
])
def test_bad_overrides_name_the_item_and_the_field(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_overrides([item])


def test_an_override_that_fails_validation_is_named_with_its_field() -> None:
    with pytest.raises(ConfigError, match=r"^--set learner\.batch_size=0: learner\.batch_size: must be >= 1$"):
        resolve_experiment(experiment_path("tiny"), ["seed=1", "learner.batch_size=0"])
    with pytest.raises(ConfigError, match=r"^SPIRAL_SET learner\.batch_size=many: learner\.batch_size: expected int"):
        resolve_experiment(experiment_path("tiny"), ["learner.batch_size=many"], source="SPIRAL_SET")
    with pytest.raises(ConfigError, match=r"tiny\.yaml with --set env\.paint\.canvas_size=40: discriminator\.input_pool"):
        resolve_experiment(experiment_path("tiny"), ["env.paint.canvas_size=40"])


def test_spiral_set_separates_items_by_newlines_or_semicolons_and_keeps_list_commas() -> None:
    text = "learner.reward.band=[-5, 5]; seed=3\n  env.conditional=false ;;\n\n"
    assert split_override_items(text) == ["learner.reward.band=[-5, 5]", "seed=3", "env.conditional=false"]
    assert parse_overrides(split_override_items(text))["learner"] == {"reward": {"band": [-5, 5]}}


def test_a_resolved_experiment_says_how_it_was_made(tmp_path: Path) -> None:
    (tmp_path / "variant.yaml").write_text("base: tiny\nname: variant\n")
    resolved = resolve_experiment(tmp_path / "variant.yaml", ["seed=3"])
    assert resolved.config.seed == 3 and resolved.config.name == "variant"
    assert resolved.provenance() == {"experiment": str(tmp_path / "variant.yaml"),
                                     "bases": [str(experiment_path("tiny"))], "set": ["seed=3"]}


def test_config_resolve_prints_every_field_without_base_and_says_how_it_was_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "variant.yaml").write_text("base: tiny\nname: variant\nlearner:\n  batch_size: 8\n")
    assert spiral_main(["config", "resolve", str(tmp_path / "variant.yaml"), "--set", "seed=3"]) == 0
    text = capsys.readouterr().out
    first, second, third = text.splitlines()[:3]
    assert first.startswith(f"# {(tmp_path / 'variant.yaml').as_posix()} on ")
    assert first.endswith("tiny.yaml, fully resolved with --set seed=3.")
    assert third == f"#   spiral config resolve {tmp_path / 'variant.yaml'} --set seed=3"
    data = yaml.safe_load(text)
    assert "base" not in data and set(data) == {f.name for f in dataclasses.fields(ExperimentConfig)}
    assert data["learner"] == to_dict(load_experiment(tmp_path / "variant.yaml"))["learner"]  # every field
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_experiment(tmp_path / "resolved.yaml") == resolve_experiment(tmp_path / "variant.yaml",
                                                                             ["seed=3"]).config

    assert spiral_main(["config", "resolve", "tiny", "--set", "learner.batchsize=3"]) == 2
    assert "spiral config: --set learner.batchsize=3: learner.batchsize: unknown field" in capsys.readouterr().err
    assert spiral_main(["config", "resolve", "no-such-experiment"]) == 2
    assert "no-such-experiment.yaml: no such experiment file" in capsys.readouterr().err
