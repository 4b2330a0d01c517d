"""Smoke runs of the paper-sized experiments on CPU: does the discriminator's reward keep its scale?

The paper-sized experiments (``mnist``, ``omniglot``, ``celeba``, ``mujoco``) ship with the
discriminator's reward as it learnt at small scale. They are meant for GPUs and many actors, so a CPU
cannot show them learning; what it can show in a few minutes is that they start, update, and
that the reward stays finite and at the level it is configured for: each batch's mean episode
return inside ``learner.reward.band`` (the band the learner alerts on), and the
discriminator's level pinned near 0 (reported as ``critic_level_max_abs``, the results' name).

Each experiment runs ``spiral up`` for ``--minutes`` with ``--actors`` actors and one member
(``pbt.population_size`` 1). Where an experiment's data is not on this machine, the run says
which stand-in it used: CelebA's ``/data/celeba`` becomes scikit-image's LFW faces, Omniglot's
``/data/omniglot`` the directory in ``SPIRAL_OMNIGLOT_PATH``. It prints one row per experiment
and writes them to ``OUT/summary.json``; it exits non-zero when a run made no update or had a
return that was not finite or left the band.

Usage::

    python -m bench.paper_smoke --minutes 3 --out bench/results/paper-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any


from bench.training_run import run_up
from pbt_controller.state import read_jsonl
from spiral.config import ExperimentConfig, dump_experiment, experiment_path, load_experiment
from spiral.data import OMNIGLOT_PATH_ENV

PAPER_EXPERIMENTS = ("mnist", "omniglot", "celeba", "mujoco")


def smoke_experiment(name: str) -> tuple[ExperimentConfig, str]:
    """The paper experiment ``name`` as this machine can run it, and what was substituted."""
    cfg = load_experiment(experiment_path(name))
    notes = ["pbt.population_size 1"]
    dataset = cfg.dataset
    if dataset.name == "celeba" and not Path(dataset.path).is_dir():
        dataset = dataclasses.replace(dataset, name="lfw", path="")
        notes.append(f"LFW faces for CelebA (no {cfg.dataset.path})")
    if dataset.name == "omniglot" and not Path(dataset.path).is_dir():
        local = os.environ.get(OMNIGLOT_PATH_ENV, "")
        if not local:
            raise SystemExit(f"omniglot: {cfg.dataset.path} is missing; set {OMNIGLOT_PATH_ENV}")
        dataset = dataclasses.replace(dataset, path=local)
        notes.append(f"Omniglot from {OMNIGLOT_PATH_ENV}")
    cfg = dataclasses.replace(cfg, dataset=dataset, pbt=dataclasses.replace(cfg.pbt, population_size=1))
    return cfg.validate(), "; ".join(notes)


def summarise(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Updates, the returns' range against the band, and the discriminator's level, from a run's logs."""
    learner = read_jsonl(run_dir / "learner.jsonl") if (run_dir / "learner.jsonl").exists() else []
    discriminator = read_jsonl(run_dir / "discriminator.jsonl") if (run_dir / "discriminator.jsonl").exists() else []
    low, high = cfg.learner.reward.band
    returns = [float(r["mean_reward"]) for r in learner]
    finite = [r for r in returns if math.isfinite(r)]
    levels = [float(r["level"]) for r in discriminator if "level" in r]
    row: dict[str, Any] = {
        "updates": len(learner),
        "frames": int(learner[-1]["frames"]) if learner else 0,
        "critic_updates": len(discriminator),
        "band": [low, high],
        "non_finite_returns": len(returns) - len(finite),
        "out_of_band": sum(1 for r in finite if not low <= r <= high) + len(returns) - len(finite),
        "return_min": min(finite) if finite else None,
        "return_max": max(finite) if finite else None,
        "critic_level_max_abs": max(abs(v) for v in levels) if levels else None,
        "d_real_last": float(discriminator[-1]["d_real"]) if discriminator else None,
        "d_fake_last": float(discriminator[-1]["d_fake"]) if discriminator else None,
    }
    row["ok"] = row["updates"] > 0 and row["out_of_band"] == 0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(PAPER_EXPERIMENTS), choices=PAPER_EXPERIMENTS)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", default="bench/results/paper-smoke")
    args = parser.parse_args()
    out = Path(args.out)
    summary: dict[str, Any] = {}
    for name in args.experiments:
        cfg, notes = smoke_experiment(name)
        where = out / name
        where.mkdir(parents=True, exist_ok=True)
        dump_experiment(cfg, where / "experiment.yaml")
        print(f"{name}: {args.minutes:g} minutes of spiral up ({notes})")
        run_up(str(where / "experiment.yaml"), where, args.minutes, args.actors)
        row = summarise(cfg, where / "run")
        row["substitutions"] = notes
        summary[name] = row
        print(f"\n{name}: " + json.dumps(row))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| experiment | updates | frames | return min | return max | band | out of band | critic level, max abs |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for name, row in summary.items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
        print(f"| {name} | {row['updates']} | {row['frames']} | {fmt(row['return_min'])} | {fmt(row['return_max'])} "
              f"| {row['band']} | {row['out_of_band']} | {fmt(row['critic_level_max_abs'])} |")
    if not all(row["ok"] for row in summary.values()):
        raise SystemExit("a paper-sized run made no update or lost its reward's scale (see the table)")


if __name__ == "__main__":
    main()
