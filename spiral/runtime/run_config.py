"""The experiment a run directory was started with, and how it was made.

``spiral up`` and ``spiral local`` keep two files in ``runs/NAME/``:

* ``config.yaml``: the resolved experiment, every field (what the services load);
* ``overrides.yaml``: how it was made: the experiment file, its chain of bases, and the
  ``FIELD=VALUE`` items applied over them (``--set``, ``--seed``, ``--population``, ...)::

      experiment: experiments/tiny-l2.yaml
      bases: [experiments/tiny.yaml]
      set: [learner.batch_size=8, seed=3]

A run directory that already holds a ``config.yaml`` is a run being resumed: its checkpoints
were trained with that experiment, so it is resumed only with the same one. Started again
with a different experiment (another file, other overrides, or an experiment file edited since)
it is refused with the fields that differ and the overrides it was made with, and nothing in
the directory is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spiral.config import ConfigError, ResolvedExperiment, load_experiment, to_dict
from spiral.runtime.atomic import atomic_write_bytes

CONFIG_FILE = "config.yaml"
"""The resolved experiment of a run, in its run directory."""
OVERRIDES_FILE = "overrides.yaml"
"""How :data:`CONFIG_FILE` was made (experiment file, bases, overrides), in the run directory."""


class RunConfigMismatch(ValueError):
    """A run directory holds a run of another experiment than the one it is started with."""


def config_differences(before: Any, after: Any, path: str = "") -> list[str]:
    """``field: A there, B now`` for each dotted field whose value differs between two plain configs."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after), key=str):
            where = f"{path}.{key}" if path else str(key)
            found.extend(config_differences(before.get(key), after.get(key), where))
        return found
    return [] if before == after else [f"{path}: {before!r} there, {after!r} now"]


def _describe_overrides(run_dir: Path) -> str:
    """What ``overrides.yaml`` of ``run_dir`` says the run was made with, in a few words."""
    try:
        made = yaml.safe_load((run_dir / OVERRIDES_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    items = " ".join(f"--set {item}" for item in made.get("set") or [])
    return f" It was started from {made.get('experiment', '?')}" + (f" with {items}" if items else "") + \
        f" ({run_dir / OVERRIDES_FILE})."


def record_run_config(run_dir: Path, resolved: ResolvedExperiment) -> Path:
    """Write ``config.yaml`` and ``overrides.yaml`` to ``run_dir``, or check a resumed run's.

    Returns:
        The path of ``config.yaml``.

    Raises:
        RunConfigMismatch: ``run_dir`` holds a ``config.yaml`` of another experiment (the
            message names the differing fields and how the run was made), or one that no
            longer loads; nothing is written then.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    resolved_data = to_dict(resolved.config)
    if config_path.exists():
        try:
            before = to_dict(load_experiment(config_path))
        except (ConfigError, OSError) as exc:
            raise RunConfigMismatch(f"{run_dir} holds a run whose {CONFIG_FILE} no longer loads ({exc}); "
                                    "start a new run with another --name") from exc
        differences = config_differences(before, resolved_data)
        if differences:
            raise RunConfigMismatch(
                f"{run_dir} holds a run of another experiment, so it cannot be resumed with this one: "
                f"{'; '.join(differences)}.{_describe_overrides(run_dir)} Resume it with the same experiment and "
                f"overrides, or start a new run with another --name.")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(config_path, yaml.safe_dump(resolved_data, sort_keys=False).encode())
    atomic_write_bytes(run_dir / OVERRIDES_FILE, yaml.safe_dump(resolved.provenance(), sort_keys=False).encode())
    return config_path
