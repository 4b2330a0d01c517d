"""What the learning benchmarks share: the experiment they run and a timed ``spiral up`` run.

``bench/learning.py`` (held-out reconstruction) and ``bench/unconditional.py`` (a digit
Fréchet distance) both train the one-machine system for a few minutes, copy the learner's
newest checkpoint at given times and then score the copies. This module holds those two steps.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from spiral.runtime.checkpoint import list_checkpoints
from spiral.config import ExperimentConfig, dump_experiment, experiment_path, resolve_experiment


def bench_experiment(config: str, out: Path, backend: str | None = None,
                     seed: int | None = None, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, str]:
    """The experiment ``config`` with the benchmark's overrides, and the ``--config`` to run it with.

    With an override (``backend``, ``seed``, ``--set`` items as ``FIELD=VALUE``) the changed
    experiment is written to ``out/experiment.yaml`` and that file is what ``spiral up`` is given.
    """
    cfg = resolve_experiment(experiment_path(config), overrides).config
    if backend:
        cfg = dataclasses.replace(cfg, env=dataclasses.replace(
            cfg.env, paint=dataclasses.replace(cfg.env.paint, backend=backend)))
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    if not backend and seed is None and not overrides:
        return cfg, config
    path = out / "experiment.yaml"
    dump_experiment(cfg, path)
    return cfg, str(path)


def run_up(config_arg: str, out: Path, minutes: float, actors: int,
           marks: dict[float, Callable[[], None]] | None = None) -> None:
    """Run ``spiral up`` under ``out/run`` for ``minutes``, calling ``marks[m]`` at minute ``m``.

    The run is stopped with SIGINT (a clean shutdown) at the end or on an error; its log is
    ``out/up.log``. Progress is printed as it goes.
    """
    shutil.rmtree(out / "run", ignore_errors=True)
    proc = subprocess.Popen([sys.executable, "-m", "spiral.commands.cli", "up", "--config", config_arg, "--name", "run",
                             "--runs-dir", str(out), "--actors", str(actors), "--status-every", "30",
                             "--no-restart"], stdout=open(out / "up.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    started = time.monotonic()
    try:
        for mark in sorted({*(marks or {}), minutes}):
            while time.monotonic() - started < 60 * mark:
                time.sleep(5)
                if proc.poll() is not None:
                    raise SystemExit(f"spiral up exited ({proc.returncode}) after "
                                     f"{(time.monotonic() - started) / 60:.1f} minutes; see {out / 'up.log'}")
                print(f"\r{(time.monotonic() - started) / 60:5.1f}/{minutes:g} min", end="", flush=True)
            if marks and mark in marks:
                marks[mark]()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


def train_and_copy(config_arg: str, out: Path, minutes: list[float], actors: int) -> dict[float, Path]:
    """Run ``spiral up`` (:func:`run_up`) until the last of ``minutes``; copy a checkpoint at each.

    At each mark the learner's newest checkpoint is copied to ``out/policy-<M>min.pt``.

    Returns:
        ``{minutes: copied checkpoint}``.
    """
    run_dir = out / "run"
    copies: dict[float, Path] = {}

    def copy(mark: float) -> None:
        ckpts = list_checkpoints(run_dir / "learner")
        if not ckpts:
            raise SystemExit(f"no learner checkpoint after {mark} minutes; see {out / 'up.log'}")
        copies[mark] = Path(shutil.copy(ckpts[-1], out / f"policy-{mark:g}min.pt"))
        print(f"\n{mark:g} min: copied {ckpts[-1].name}")

    run_up(config_arg, out, max(minutes), actors, {mark: (lambda mark=mark: copy(mark)) for mark in minutes})
    return copies
