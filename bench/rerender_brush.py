"""How much of the digit distance is the brush? Score the same programs drawn with other brushes.

``bench/unconditional.py`` scores an unconditional run's paintings by the Fréchet distance to
held-out digits in a digit classifier's features. That distance mixes two things: the *shapes*
the agent draws (its program) and the *ink* the renderer lays along them (libmypaint's brush).
This script separates them. The untrained policy, the trained weights and (when the checkpoint
has one) the weight average each paint ``--samples`` episodes from seed 0 with the run's own
renderer, as ``bench/unconditional.py`` does; then every episode's actions are executed again
under each brush of ``--brushes`` (``env.paint.brush_type``, libmypaint's ``.myb`` files) and
scored. An episode's canvas depends only on its actions, so each column is the same programs
in other ink, and the ratio to the untrained policy is taken within a column.

It analyses a finished run; it trains nothing, and the policies never saw the other brushes.

Usage::

    python -m bench.rerender_brush --config bench/results/unconditional-average/experiment.yaml \\
        --checkpoint bench/results/unconditional-average/policy-20min.pt \\
        --brushes classic/dry_brush classic/pen --out bench/results/unconditional-average/rerender.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch


from bench.unconditional import GRID, add_classifier_arguments, classifier_and_reference, run_experiment
from spiral.runtime.checkpoint import load_checkpoint
from spiral.config import ExperimentConfig
from spiral.data import for_experiment
from spiral.evaluation.digit_fid import score_paintings
from spiral.envs.programs import execute_actions
from spiral.nets import build_policy
from spiral.evaluation.sampling import has_average, policy_from_state, sample_policy
from spiral.evaluation.visualize import image_grid, save_png


def with_brush(cfg: ExperimentConfig, brush: str) -> ExperimentConfig:
    """``cfg`` with libmypaint's brush set to ``brush`` (a ``.myb`` name under ``brushes_dir``)."""
    if cfg.env.kind != "paint":
        raise SystemExit(f"{cfg.name} is a {cfg.env.kind} experiment; brushes apply to paint experiments")
    if not (Path(cfg.env.paint.brushes_dir) / f"{brush}.myb").is_file():
        raise SystemExit(f"--brushes: no brush {brush!r} in {cfg.env.paint.brushes_dir}")
    paint = dataclasses.replace(cfg.env.paint, backend="libmypaint", brush_type=brush)
    return dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, paint=paint))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's experiment (its experiment.yaml)")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (the untrained reference's weights)")
    parser.add_argument("--checkpoint", required=True, help="a learner checkpoint of the run")
    parser.add_argument("--brushes", nargs="+", required=True, help="libmypaint brushes, e.g. classic/pen")
    parser.add_argument("--samples", type=int, default=1000)
    add_classifier_arguments(parser)
    parser.add_argument("--out", required=True, help="JSON file for the table (grids are written beside it)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = run_experiment(args.config, args.seed)
    brushed = {brush: with_brush(cfg, brush) for brush in args.brushes}

    classifier, reference = classifier_and_reference(cfg, for_experiment(cfg), args.cache_dir, args.classifier_epochs)
    model = classifier.model

    torch.manual_seed(cfg.seed)  # the untrained weights of bench/unconditional.py's reference
    policies = {"untrained": build_policy(cfg)}
    version, state = load_checkpoint(Path(args.checkpoint))
    policies["trained"] = policy_from_state(cfg, state)
    if has_average(state):
        policies["averaged"] = policy_from_state(cfg, state, average=True)

    rows: dict[str, dict[str, Any]] = {}
    for name, policy in policies.items():
        actions = sample_policy(cfg, policy, args.samples, seed=0).actions
        rows[name] = {}
        for brush, brush_cfg in brushed.items():
            canvases = execute_actions(brush_cfg, actions)
            rows[name][brush] = score_paintings(model, canvases, reference)
            save_png(image_grid(canvases[:GRID], columns=8),
                     out.parent / f"{out.stem}-{name}-{brush.replace('/', '-')}.png")
    for brush in args.brushes:
        untrained = rows["untrained"][brush]["fid"]
        for row in rows.values():
            row[brush]["ratio_to_untrained"] = row[brush]["fid"] / untrained
    result = {"config": args.config, "seed": cfg.seed, "checkpoint": args.checkpoint, "version": version,
              "trained_with": cfg.env.paint.brush_type, "samples": args.samples, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    print(f"{'policy':10s}" + "".join(f"  {brush:>32s}" for brush in args.brushes))
    for name, row in rows.items():
        print(f"{name:10s}" + "".join(
            f"  FID {row[b]['fid']:7.1f} ({row[b]['ratio_to_untrained']:.2f}x untrained)" for b in args.brushes))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
