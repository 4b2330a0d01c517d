"""Learning evidence: held-out MNIST reconstruction error of the CPU profile after 10 and 30 minutes.

Runs the one-machine system (``spiral up``, the tiny conditional-MNIST experiment) for the
longest of ``--minutes``, copies the learner's newest checkpoint at each of those times, and
then scores each copy on the fixed held-out digits (``dataset.holdout``, never trained on):
mean squared error in [0, 1] pixel units between final canvas and target. The same run also
measures two baselines: an untrained policy (random strokes) and a blank canvas. A picture of
targets and reconstructions for each time is written next to the JSON figures.

Usage::

    python -m bench.learning --minutes 10 30 --out bench/results/learning
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


from bench.run_record import read_record, summarize
from bench.training_run import bench_experiment, train_and_copy
from spiral.config import ExperimentConfig
from spiral.data import for_experiment
from spiral.evaluation.reconstruction import empty_canvas_l2, reconstruct
from spiral.nets import build_policy
from spiral.evaluation.sampling import load_policy
from spiral.evaluation.visualize import image_grid, plot_curves, save_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--out", default="bench/results/learning")
    parser.add_argument("--backend", choices=["libmypaint", "fast"], default=None,
                        help="paint backend for training and evaluation (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=None, help="the experiment's seed (default: the file's)")
    parser.add_argument("--evaluate", nargs="+", metavar="MINUTES=CHECKPOINT",
                        help="only score these checkpoints (e.g. 10=policy-10min.pt), without training")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, config_arg = bench_experiment(args.config, out, backend=args.backend, seed=args.seed)
    if args.evaluate:
        evaluate(cfg, {float(m): Path(p) for m, p in (item.split("=", 1) for item in args.evaluate)}, out)
        return
    copies = train_and_copy(config_arg, out, args.minutes, args.actors)

    evaluate(cfg, copies, out)


def evaluate(cfg: ExperimentConfig, copies: dict[float, Path], out: Path) -> dict[str, dict[str, float]]:
    """Score the blank canvas, an untrained policy and each checkpoint on the held-out digits.

    Each policy paints every held-out target twice: sampling its actions as the actors do
    (``l2``) and taking each head's most likely value (``l2_greedy``). Where the run's
    per-update record is there (``out/run/learner.jsonl``), its summary (bench/run_record.py:
    speed, collapses, entropy, clip fraction) is stored as ``"training record"``.
    """
    holdout = for_experiment(cfg).holdout
    results: dict[str, dict[str, float]] = {}
    rows = [holdout]
    results["blank canvas"] = {"l2": empty_canvas_l2(cfg, holdout)}
    torch.manual_seed(cfg.seed)  # the same untrained weights in every run
    untrained = build_policy(cfg)
    random_rec = reconstruct(cfg, untrained, holdout, seed=0)
    results["untrained policy"] = {"l2": random_rec.mean_l2,
                                   "l2_greedy": reconstruct(cfg, untrained, holdout, seed=0, greedy=True).mean_l2}
    rows.append(random_rec.canvases)
    for minutes, path in sorted(copies.items()):
        policy, version = load_policy(cfg, path)
        rec = reconstruct(cfg, policy, holdout, seed=0)
        greedy = reconstruct(cfg, policy, holdout, seed=0, greedy=True)
        results[f"trained {minutes:g} min"] = {"l2": rec.mean_l2, "l2_greedy": greedy.mean_l2, "version": version}
        rows.extend([rec.canvases, greedy.canvases])
    count = min(16, len(holdout))
    picture = np.concatenate([image_grid(r[:count], columns=count) for r in rows], axis=0)
    save_png(picture, out / "reconstructions.png")
    run_dir = out / "run"
    if (run_dir / "learner.jsonl").exists():
        plot_curves(run_dir / "learner.jsonl", ["reconstruction_l2", "mean_reward", "reward_critic", "paint_fraction",
                                                "grad_norm"], out / "curves.png")
        results["training record"] = summarize(read_record(run_dir / "learner.jsonl"))
    if (run_dir / "discriminator.jsonl").exists():
        plot_curves(run_dir / "discriminator.jsonl", ["d_real", "d_fake", "level", "gp"], out / "critic_curves.png")
    (out / "learning.json").write_text(json.dumps(results, indent=2))
    renderer = cfg.env.paint.backend if cfg.env.kind == "paint" else "MuJoCo"
    print(f"held-out {cfg.dataset.name} images: {len(holdout)}, {renderer} renderer; "
          f"mean L2 (lower is better), sampled / greedy actions")
    blank = results["blank canvas"]["l2"]
    for name, row in results.items():
        if name == "training record":
            continue
        greedy_text = f"   greedy {row['l2_greedy']:.4f}  {row['l2_greedy'] / blank:.2f}x" if "l2_greedy" in row else ""
        print(f"  {name:20s} {row['l2']:.4f}  {row['l2'] / blank:.2f}x blank{greedy_text}")
    print(f"picture: {out / 'reconstructions.png'} (rows: targets, untrained, then per time sampled and greedy)")
    print(json.dumps(results))
    return results

if __name__ == "__main__":
    main()
