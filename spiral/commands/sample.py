"""``spiral sample``: paint N episodes with a trained agent and keep canvases, a grid and programs.

Usage::

    spiral sample RUN_DIR|CHECKPOINT|EXPORT --num N --out DIR [--targets FILE.npz] [--seed S]
                  [--greedy] [--average] [--animate] [--backend libmypaint|fast]
                  [--config FILE.yaml] [--set FIELD=VALUE ...]

``RUN_DIR`` (or ``RUN_URI``: ``s3://``, ``gs://``, ``file://``, a run in ``run.artifact_uri``, fetched
first) is a ``spiral up`` run directory (its newest ``learner/ckpt-*.pt``; a PBT member
directory ``member-K`` works too), ``CHECKPOINT`` one checkpoint file, whose config is read
from ``<ckpt dir>/../config.yaml`` unless ``--config`` names one, and ``EXPORT`` a ``spiral
export`` directory (its ``experiment.yaml``; the same seed paints the same canvases as the
checkpoint it was exported from); ``--set`` changes a setting of
that config (``--set env.paint.brush_type=classic/pen``: the same policy with another brush;
``--seed`` is the sampling seed, not the run's). Conditional runs paint the
experiment's held-out images, or those of ``--targets`` (one uint8 ``[N, H, W, C]`` array),
cycled when ``--num`` exceeds them; ``--num`` defaults to the number of targets (conditional)
or 64 (unconditional). ``--animate`` also writes the stroke animations: ``animation.gif`` (the
grid, step by step) and ``animations/episode-NNNNN.gif``. See :mod:`spiral.evaluation.sampling`
for what is written. Exit status: 0 on
success, 2 for a missing run, config or checkpoint, a bad targets file or bad arguments, 1 when
the outputs cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spiral.commands.overrides import add_override_arguments

UNCONDITIONAL_DEFAULT_NUM = 64
"""Episodes painted by an unconditional run when ``--num`` is not given."""


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``spiral sample``'s arguments."""
    parser.add_argument("run", metavar="RUN_DIR|CHECKPOINT|EXPORT",
                        help="a spiral up run directory (newest learner checkpoint), a checkpoint file, "
                             "or a spiral export directory; any of them in a store: s3://..., gs://..., file://... (run.artifact_uri/RUN)")
    parser.add_argument("--num", type=int, default=None, metavar="N",
                        help="episodes to paint (default: every target, or 64 for unconditional runs)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for canvases.npz, grid.png, programs/")
    parser.add_argument("--targets", default=None, metavar="FILE.npz",
                        help="conditional runs: paint these uint8 [N, H, W, C] images instead of the holdout")
    parser.add_argument("--seed", type=int, default=0, help="seed of noise, environments and sampling (default: 0)")
    parser.add_argument("--greedy", action="store_true", help="take each head's most likely action instead of sampling")
    parser.add_argument("--average", action="store_true",
                        help="paint with the moving average of the policy's weights (runs with "
                             "learner.policy_average_decay > 0) instead of the trained weights")
    parser.add_argument("--animate", action="store_true",
                        help="also write stroke animations: animation.gif (the grid, step by step) and "
                             "animations/episode-NNNNN.gif")
    parser.add_argument("--backend", choices=("libmypaint", "fast"), default=None,
                        help="paint renderer (default: the experiment's env.paint.backend)")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="experiment config (default: the run's config.yaml)")
    add_override_arguments(parser, seed=False)  # --seed is the sampling seed here


def run(args: argparse.Namespace) -> int:
    """Sample the policy and write the outputs; returns the exit status."""
    from spiral.evaluation.sampling import (SampleError, check_targets, load_targets, resolve_run, sample_policy,
                                            with_backend, write_animations, write_samples)

    try:
        resolved = resolve_run(args.run, args.config, args.set)
        cfg = with_backend(resolved.cfg, args.backend)
        targets = None
        if args.targets is not None:
            if not cfg.env.conditional:
                raise SampleError(f"{args.targets}: --targets needs a conditional experiment "
                                  f"({resolved.config_path} has env.conditional: false)")
            targets = load_targets(args.targets, cfg)
        elif cfg.env.conditional:
            from spiral.data import for_experiment

            try:
                targets = check_targets(for_experiment(cfg).holdout, cfg,
                                        source=f"dataset {cfg.dataset.name!r} holdout")
            except (OSError, ImportError, ValueError) as exc:
                raise SampleError(f"held-out targets of dataset {cfg.dataset.name!r}: {exc}") from exc
        num = args.num if args.num is not None else (len(targets) if targets is not None else UNCONDITIONAL_DEFAULT_NUM)
        policy = resolved.policy(average=args.average)
        result = sample_policy(cfg, policy, num, seed=args.seed, targets=targets, greedy=args.greedy,
                               keep_steps=args.animate)
    except SampleError as exc:
        return _fail(2, str(exc))
    try:
        outputs = write_samples(result, Path(args.out))
        animations = write_animations(result, Path(args.out)) if args.animate else None
    except OSError as exc:
        return _fail(1, f"{args.out}: cannot write the samples: {exc}")
    mode = ("greedy" if args.greedy else "sampled") + (", averaged weights" if args.average else "")
    renderer = result.cfg.env.paint.backend if result.cfg.env.kind == "paint" else "mujoco"
    l2 = "" if result.mean_l2 is None else (
        f", mean {'held-out' if args.targets is None else 'target'} L2 {result.mean_l2:.4f}")
    print(f"painted {len(result)} episodes ({mode}, {renderer}) "
          f"with policy version {resolved.version} from {resolved.checkpoint}{l2}; wrote {outputs.canvases}, "
          f"{outputs.grid} and {len(result)} programs in {outputs.programs}/"
          + ("" if animations is None else f"; animations {animations.grid} and {animations.episodes}/"))
    return 0


def _fail(status: int, message: str) -> int:
    print(f"spiral sample: error: {message}", file=sys.stderr)
    return status
