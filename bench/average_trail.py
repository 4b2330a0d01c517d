"""How long a horizon should the policy's weight average have? Score averages rebuilt from a run's checkpoints.

``learner.policy_average_decay`` keeps one exponential moving average of the policy's weights,
with one decay, during a run. To compare horizons without a run each, copy the learner's
checkpoints aside as they appear (it keeps only its newest three; ``checkpoint_every_updates``
apart, say K): that trail rebuilds the average of any decay ``d``, as an average over the
checkpoints with decay ``d ** K`` per checkpoint, started at the first one. With ``K`` = 50 and
``d`` = 0.999 the rebuilt average follows the learner's own to within the weights of the
updates between two checkpoints; the script scores the learner's own average too (when the
last checkpoint has one), which checks the rebuild. Like the learner's, the average starts at
the first weights it sees, so a decay whose horizon is a large part of the run keeps much of
the early, untrained policy (``d ** updates`` of it).

Each policy paints ``--samples`` episodes from seed 0 (as ``bench/unconditional.py``) and is
scored by the Fréchet distance to the held-out digits in the cached digit classifier's
features, beside the untrained policy's distance (the goal's unit). Choose a horizon on one
seed and confirm it on another: the held-out digits are the score, not a validation set.

Usage::

    # during the run: while true; do cp -n RUN/learner/ckpt-*.pt TRAIL/; sleep 3; done
    python -m bench.average_trail --config experiments/tiny-unconditional-average.yaml --seed 1 \\
        --trail TRAIL --up-to 9100 --decays 0.999 0.9995 0.9998 --out DIR/average-trail.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


from bench.unconditional import GRID, add_classifier_arguments, classifier_and_reference, run_experiment
from spiral.runtime.checkpoint import checkpoint_version, list_checkpoints, load_checkpoint
from spiral.data import for_experiment
from spiral.evaluation.digit_fid import score_paintings
from spiral.nets import build_policy
from spiral.nets.policy import SpiralPolicy
from spiral.evaluation.sampling import has_average, policy_from_state, sample_policy
from spiral.evaluation.visualize import image_grid, save_png


def trail_averages(paths: list[Path], decays_per_checkpoint: list[float]) -> list[dict[str, torch.Tensor]]:
    """Exponential moving averages of the trained weights over ``paths`` (oldest first), one per decay.

    Each checkpoint is read once and folded into every average; each average starts at the
    first checkpoint's weights.
    """
    averages: list[dict[str, torch.Tensor]] = [{} for _ in decays_per_checkpoint]
    for path in paths:
        _, state = load_checkpoint(path)
        weights = state["trainer"]["policy"]
        for decay, average in zip(decays_per_checkpoint, averages):
            if not average:
                average.update({name: value.detach().clone().float() for name, value in weights.items()})
                continue
            for name, value in weights.items():
                if value.is_floating_point():
                    average[name].mul_(decay).add_(value.float(), alpha=1 - decay)
                else:
                    average[name] = value.clone()
    return averages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (the untrained reference's weights)")
    parser.add_argument("--trail", required=True, help="directory of the run's copied learner checkpoints")
    parser.add_argument("--up-to", type=int, default=None, help="use checkpoints up to this version (default: all)")
    parser.add_argument("--decays", type=float, nargs="+", required=True, help="per-update decays to rebuild")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--backend", choices=["libmypaint", "fast"], default=None,
                        help="paint backend (default: the experiment's)")
    add_classifier_arguments(parser)
    parser.add_argument("--out", required=True, help="JSON file for the table (grids are written beside it)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = run_experiment(args.config, args.seed)
    if args.backend:
        cfg = dataclasses.replace(cfg, env=dataclasses.replace(
            cfg.env, paint=dataclasses.replace(cfg.env.paint, backend=args.backend)))

    paths = [p for p in list_checkpoints(Path(args.trail))
             if args.up_to is None or checkpoint_version(p) <= args.up_to]
    if len(paths) < 2:
        raise SystemExit(f"{args.trail}: {len(paths)} checkpoints; a trail needs at least two")
    versions = [checkpoint_version(p) for p in paths]
    spacing = int(np.median(np.diff(versions)))
    print(f"trail: {len(paths)} checkpoints, versions {versions[0]}..{versions[-1]}, every {spacing} updates")

    classifier, reference = classifier_and_reference(cfg, for_experiment(cfg), args.cache_dir, args.classifier_epochs)
    model = classifier.model

    def score(name: str, policy: SpiralPolicy) -> dict[str, Any]:
        canvases = sample_policy(cfg, policy, args.samples, seed=0).canvases
        save_png(image_grid(canvases[:GRID], columns=8), out.parent / f"{out.stem}-{name.replace(' ', '-')}.png")
        return score_paintings(model, canvases, reference)

    torch.manual_seed(cfg.seed)
    rows: dict[str, Any] = {"untrained": score("untrained", build_policy(cfg))}
    last_version, last_state = load_checkpoint(paths[-1])
    rows["trained"] = score("trained", policy_from_state(cfg, last_state))
    if has_average(last_state):
        rows["learner's average"] = score("learners-average", policy_from_state(cfg, last_state, average=True))
    for decay, weights in zip(args.decays, trail_averages(paths, [decay ** spacing for decay in args.decays])):
        policy = build_policy(cfg)
        policy.load_state_dict(weights)
        rows[f"trail average {decay:g}"] = score(f"trail-{decay:g}", policy)
    untrained = rows["untrained"]["fid"]
    for row in rows.values():
        row["ratio_to_untrained"] = row["fid"] / untrained
    result = {"config": args.config, "seed": cfg.seed, "version": last_version, "checkpoints": len(paths),
              "spacing": spacing, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    for name, row in rows.items():
        print(f"  {name:26s} FID {row['fid']:8.2f}  x untrained {row['ratio_to_untrained']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
