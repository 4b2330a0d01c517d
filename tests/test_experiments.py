"""The shipped experiments: each resolves to the settings its published figures were made with,
and each is written as a base and its differences.

``tests/data/resolved_experiments.json`` records every ``experiments/*.yaml`` fully resolved
(``to_dict(load_experiment(path))``, keyed by file stem), as it was when the experiments were
whole copies. However the files are written (a base and its differences), each must still
resolve to exactly that record, apart from its ``name``. A field added to the config
dataclasses later is allowed only where its resolved value is the field's dataclass default,
so a new field needs no new record while no setting behind a published figure changes silently.

A new experiment needs no record; to protect it too (not to change an old one), add its
entry, ``to_dict(load_experiment("experiments/NAME.yaml"))``, to the JSON file.

A file with a ``base`` holds only its differences: no setting whose value its base already
resolves to. Every file opens with a one-line comment saying what it is for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from spiral.config import BASE_KEY, ExperimentConfig, base_path, load_experiment, to_dict

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = ROOT / "experiments"
RECORD = Path(__file__).resolve().parent / "data" / "resolved_experiments.json"
RECORDED: dict[str, dict[str, Any]] = json.loads(RECORD.read_text())
EXPERIMENT_FILES = sorted(EXPERIMENTS_DIR.glob("*.yaml"))


def differences(recorded: Any, resolved: Any, default: Any, path: str = "") -> list[str]:
    """Where ``resolved`` departs from ``recorded``, one line per dotted field.

    A field that ``recorded`` lacks (added to the dataclasses since) is a difference only when
    its resolved value is not its ``default``.
    """
    if not (isinstance(recorded, dict) and isinstance(resolved, dict)):
        return [] if recorded == resolved else [f"{path}: recorded {recorded!r}, resolves to {resolved!r}"]
    found = []
    for key in sorted(set(recorded) | set(resolved)):
        where = f"{path}.{key}" if path else key
        if key not in resolved:
            found.append(f"{where}: recorded {recorded[key]!r}, no longer a field")
        elif key not in recorded:
            fallback = default.get(key) if isinstance(default, dict) else None
            if resolved[key] != fallback:
                found.append(f"{where}: a new field, resolves to {resolved[key]!r} instead of its default {fallback!r}")
        else:
            found.extend(differences(recorded[key], resolved[key],
                                     default.get(key) if isinstance(default, dict) else None, where))
    return found


@pytest.mark.parametrize("stem", sorted(RECORDED))
def test_each_experiment_resolves_to_its_recorded_settings(stem: str) -> None:
    path = EXPERIMENTS_DIR / f"{stem}.yaml"
    assert path.is_file(), f"{path}: a recorded experiment (cited by published figures) is gone"
    recorded = {k: v for k, v in RECORDED[stem].items() if k != "name"}
    resolved = {k: v for k, v in to_dict(load_experiment(path)).items() if k != "name"}
    found = differences(recorded, resolved, to_dict(ExperimentConfig()))
    assert not found, f"{path} no longer resolves to its recorded settings:\n" + "\n".join(found)


def test_the_comparison_catches_a_changed_setting_and_admits_a_new_default_field() -> None:
    recorded = {"learner": {"batch_size": 16, "reward": {"band": [-10.0, 10.0]}}}
    default = {"learner": {"batch_size": 64, "new_knob": 0, "reward": {"band": [-10.0, 10.0]}}}
    assert differences(recorded, {"learner": {"batch_size": 16, "new_knob": 0, "reward": {"band": [-10.0, 10.0]}}},
                       default) == []
    assert differences(recorded, {"learner": {"batch_size": 32, "reward": {"band": [-10.0, 10.0]}}}, default) == [
        "learner.batch_size: recorded 16, resolves to 32"]
    assert differences(recorded, {"learner": {"batch_size": 16, "new_knob": 3, "reward": {"band": [-10.0, 10.0]}}},
                       default) == ["learner.new_knob: a new field, resolves to 3 instead of its default 0"]
    assert differences(recorded, {"learner": {"reward": {"band": [-10.0, 10.0]}}}, default) == [
        "learner.batch_size: recorded 16, no longer a field"]


def settings_of(data: dict[str, Any], path: str = "") -> list[str]:
    """The dotted fields a file's own mapping sets (a section's fields, not the section)."""
    fields = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        fields.extend(settings_of(value, where) if isinstance(value, dict) else [where])
    return fields


def value_at(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def repeated_settings(path: Path) -> list[str]:
    """The settings ``path`` states with the value its base already resolves to."""
    own = yaml.safe_load(path.read_text()) or {}
    if BASE_KEY not in own:
        return []
    base = to_dict(load_experiment(base_path(own.pop(BASE_KEY), path)))
    resolved = to_dict(load_experiment(path))
    return [f"{dotted}: {value_at(resolved, dotted)!r}" for dotted in settings_of(own)
            if value_at(resolved, dotted) == value_at(base, dotted)]


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.stem)
def test_no_experiment_repeats_a_setting_of_its_base(path: Path) -> None:
    assert repeated_settings(path) == [], f"{path} repeats its base's values: drop these lines"


def test_a_repeated_setting_is_found(tmp_path: Path) -> None:
    (tmp_path / "variant.yaml").write_text("base: tiny\nname: variant\nseed: 0\n"
                                           "learner: {batch_size: 16, entropy_cost: 0.5, reward: {l2_pool: 1}}\n")
    assert repeated_settings(tmp_path / "variant.yaml") == ["seed: 0", "learner.batch_size: 16",
                                                            "learner.reward.l2_pool: 1"]


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.stem)
def test_every_experiment_opens_with_a_one_line_purpose(path: Path) -> None:
    first, second = path.read_text().splitlines()[:2]
    assert first.startswith("# ") and len(first) > 10, f"{path}: the first line says what the experiment is for"
    assert not second.startswith("#"), f"{path}: the purpose is one line; a why goes beside the setting it explains"
