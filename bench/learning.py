"""Learning evidence: held-out reconstruction error of a conditional profile after a few minutes of training.

Runs the one-machine system (``spiral up``, the tiny conditional-MNIST experiment) for the
longest of ``--minutes``, copies the learner's newest checkpoint at each of those times, and
then scores each copy on the fixed held-out targets (``dataset.holdout``, never trained on):
mean squared error in [0, 1] pixel units between final canvas and target, and that error as a
multiple of the domain's baseline canvas (blank for strokes, empty floor for scenes, mean
intensity for faces). The same run scores an untrained policy. MNIST runs add the share of
reconstructions read as the right digit, scene runs the per-placement diagnostics (see
:func:`evaluate`). A picture of targets and reconstructions for each time is written next to
the JSON figures, and the newest policy's paintings step by step (``sequence.png``).

Usage::

    python -m bench.learning --minutes 10 30 --out bench/results/learning
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


from bench.run_record import read_record, summarize
from bench.training_run import bench_experiment, train_and_copy
from spiral.config import ExperimentConfig
from spiral.data import for_experiment
from spiral.evaluation.heldout import DomainMeasures
from spiral.evaluation.reconstruction import Reconstruction, domain_baseline, empty_canvas_l2, reconstruct
from spiral.evaluation.sampling import load_policy
from spiral.evaluation.visualize import image_grid, plot_curves, save_png
from spiral.nets import build_policy
from spiral.nets.policy import SpiralPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--out", default="bench/results/learning")
    parser.add_argument("--backend", choices=["libmypaint", "fast"], default=None,
                        help="paint backend for training and evaluation (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=None, help="the experiment's seed (default: the file's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override one setting of the experiment, as spiral up --set (repeatable)")
    parser.add_argument("--evaluate", nargs="+", metavar="MINUTES=CHECKPOINT",
                        help="only score these checkpoints (e.g. 10=policy-10min.pt), without training")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, config_arg = bench_experiment(args.config, out, backend=args.backend, seed=args.seed, overrides=args.overrides)
    if args.evaluate:
        evaluate(cfg, {float(m): Path(p) for m, p in (item.split("=", 1) for item in args.evaluate)}, out)
        return
    copies = train_and_copy(config_arg, out, args.minutes, args.actors)

    evaluate(cfg, copies, out)


def evaluate(cfg: ExperimentConfig, copies: dict[float, Path], out: Path) -> dict[str, dict[str, float]]:
    """Score the baselines, an untrained policy and each checkpoint on the held-out targets.

    Each policy paints every held-out target twice: sampling its actions as the actors do
    (``l2``) and taking each head's most likely value (``l2_greedy``). ``l2_x`` and
    ``l2_greedy_x`` are the same errors as a multiple of the domain's baseline canvas
    (:func:`spiral.evaluation.reconstruction.domain_baseline`: the blank canvas for strokes,
    the empty floor for scenes, the mean-intensity canvas for faces), named under
    ``"baseline"``. Per domain, a measure that L2 misses is added:

    * MNIST: ``digit_match`` (and ``_greedy``), the share of reconstructions that the digit
      classifier of :mod:`spiral.evaluation.digit_fid` reads as the target's digit;
    * scenes: ``placements`` (and ``_greedy``), the per-placement diagnostics of
      :mod:`spiral.evaluation.placements` against the targets' own programs.

    Where the run's per-update record is there (``out/run/learner.jsonl``), its summary
    (bench/run_record.py: speed, collapses, entropy, clip fraction) is stored as
    ``"training record"``.
    """
    dataset = for_experiment(cfg)
    holdout = dataset.holdout
    measures = DomainMeasures(cfg, dataset)
    results: dict[str, dict[str, float]] = {}
    rows = [holdout]
    baseline_name, baseline = domain_baseline(cfg, holdout)
    results["baseline"] = {"name": baseline_name, "l2": baseline}
    if baseline_name != "blank canvas" and cfg.env.kind == "paint":
        results["blank canvas"] = {"l2": empty_canvas_l2(cfg, holdout)}
    results[baseline_name] = {"l2": baseline}
    torch.manual_seed(cfg.seed)  # the same untrained weights in every run
    untrained = build_policy(cfg)
    policies: list[tuple[str, SpiralPolicy, dict[str, float]]] = [("untrained policy", untrained, {})]
    for minutes, path in sorted(copies.items()):
        policy, version = load_policy(cfg, path)
        policies.append((f"trained {minutes:g} min", policy, {"version": version}))
    sequence: Reconstruction | None = None
    for name, policy, extra in policies:
        sampled = reconstruct(cfg, policy, holdout, seed=0)
        sequence = sampled
        greedy = reconstruct(cfg, policy, holdout, seed=0, greedy=True)
        results[name] = {"l2": sampled.mean_l2, "l2_greedy": greedy.mean_l2, "l2_x": sampled.mean_l2 / baseline,
                         "l2_greedy_x": greedy.mean_l2 / baseline, **extra,
                         **measures(sampled), **measures(greedy, suffix="_greedy")}
        rows.extend([sampled.canvases] if name == "untrained policy" else [sampled.canvases, greedy.canvases])
    count = min(16, len(holdout))
    picture = np.concatenate([image_grid(r[:count], columns=count) for r in rows], axis=0)
    save_png(picture, out / "reconstructions.png")
    if sequence is not None:
        save_png(stroke_sequence(sequence), out / "sequence.png")
    run_dir = out / "run"
    if (run_dir / "learner.jsonl").exists():
        plot_curves(run_dir / "learner.jsonl", ["reconstruction_l2", "mean_reward", "reward_critic", "paint_fraction",
                                                "grad_norm"], out / "curves.png")
        results["training record"] = summarize(read_record(run_dir / "learner.jsonl"))
    if (run_dir / "discriminator.jsonl").exists():
        plot_curves(run_dir / "discriminator.jsonl", ["d_real", "d_fake", "level", "gp"], out / "critic_curves.png")
    (out / "learning.json").write_text(json.dumps(results, indent=2))
    print_results(cfg, results, len(holdout), out)
    return results


def stroke_sequence(reconstruction: Reconstruction, count: int = 8) -> np.ndarray:
    """One row per held-out target: the target, then the canvas after each of the policy's steps."""
    steps = reconstruction.steps[1:, :count]  # [T, count, H, W, C]: after each action
    rows = [np.concatenate([reconstruction.targets[i:i + 1], steps[:, i]]) for i in range(steps.shape[1])]
    return np.concatenate([image_grid(row, columns=len(row)) for row in rows], axis=0)


def print_results(cfg: ExperimentConfig, results: dict[str, Any], count: int, out: Path) -> None:
    """The table a reader wants: each row's error, its multiple of the baseline, and the domain's measures."""
    renderer = cfg.env.paint.backend if cfg.env.kind == "paint" else "MuJoCo"
    baseline = results["baseline"]
    print(f"held-out {cfg.dataset.name} images: {count}, {renderer} renderer; mean L2 (lower is better), "
          f"sampled / greedy actions, as a multiple of the {baseline['name']}'s {baseline['l2']:.4f}")
    for name, row in results.items():
        if name in ("training record", "baseline") or "l2_x" not in row:
            continue
        line = (f"  {name:20s} {row['l2']:.4f}  {row['l2_x']:.2f}x   greedy {row['l2_greedy']:.4f}  "
                f"{row['l2_greedy_x']:.2f}x")
        if "digit_match" in row:
            line += f"   right digit {row['digit_match']:.0%} / {row['digit_match_greedy']:.0%}"
        if "placements" in row:
            p, g = row["placements"], row["placements_greedy"]
            line += (f"   on a target cell {p['on_target_cell']:.0%} / {g['on_target_cell']:.0%} "
                     f"(chance {p['chance']:.0%}), right object {p['right_object']:.0%} / {g['right_object']:.0%}, "
                     f"placed {p['placements_per_episode']:.1f} / {g['placements_per_episode']:.1f}")
        print(line)
    print(f"pictures: {out / 'reconstructions.png'} (rows: targets, untrained, then per time sampled and greedy); "
          f"{out / 'sequence.png'} (per target: the target, then the newest policy's canvas after each step)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
