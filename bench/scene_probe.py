"""Can the scene policy learn to invert the renderer at all? A supervised probe, per camera and network.

Why scenes did not learn could lie in the reward (the critic), or before it: in what the camera
shows and what the policy network can read from it. This probe takes the reward out. It trains
the policy of a scene experiment by maximum likelihood to write the program that rendered a
scene when that scene is its target (program recovery's loss, with nothing else), on a pool of
programs from the broad prior (:mod:`spiral.agent.prior`) rendered once, and then scores the
greedy policy on the dataset's held-out targets: the held-out error as a multiple of the empty
floor's, and the per-placement diagnostics of :mod:`spiral.evaluation.placements` (the share
of placements on a target object's cell, and of the right shape, size and colour there).

A variant is the experiment with ``--set`` overrides; the default variants are the camera and
network that scenes had (``unframed-55``: 55 degrees above the horizon, the grid filling part
of the image, no location features), the framed camera alone (``framed-80``), and the framed
camera with the location features (``framed-80-features``, the experiment as it is). Every
variant starts from the same seed and sees the same programs::

    python -m bench.scene_probe --config experiments/tiny-scenes.yaml --steps 600 \\
        --out bench/results/scene-probe/probe.json

The programs are prior programs, never the held-out targets' own; the targets' programs are
read only to score the placements.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from spiral.agent.acting import EpisodeRunner
from spiral.agent.trajectory import Unroll
from spiral.config import ExperimentConfig, resolve_experiment
from spiral.data import for_experiment
from spiral.envs import action_spec_for, make_env
from spiral.losses import recovery_loss
from spiral.evaluation.placements import placement_report
from spiral.evaluation.reconstruction import domain_baseline, reconstruct
from spiral.nets import build_policy, observation_to_tensors

VARIANTS: dict[str, tuple[str, ...]] = {
    "unframed-55": ("env.mujoco.camera_pitch_degrees=55", "env.mujoco.frame_grid=false",
                    "policy.location_features=false"),
    "framed-80": ("env.mujoco.camera_pitch_degrees=80", "env.mujoco.frame_grid=true",
                  "policy.location_features=false"),
    "framed-80-features": ("env.mujoco.camera_pitch_degrees=80", "env.mujoco.frame_grid=true",
                           "policy.location_features=true"),
}
"""The default variants: ``--set`` overrides of the experiment, by name."""


def render_pool(cfg: ExperimentConfig, episodes: int, batch: int, seed: int) -> list[Unroll]:
    """``episodes`` prior programs rendered in batches of ``batch``, each an unroll whose targets are its own final canvases."""
    env = make_env(cfg, batch, seed=seed)
    try:
        runner = EpisodeRunner(cfg, env, build_policy(cfg), None, seed=seed)
        return [runner.run_prior_episode() for _ in range(max(1, episodes // batch))]
    finally:
        env.close()


def probe(cfg: ExperimentConfig, steps: int, batch: int, pool_episodes: int, learning_rate: float,
          seed: int) -> dict[str, object]:
    """Train ``cfg``'s policy on recovery alone for ``steps`` and score it greedily on the held-out targets."""
    started = time.perf_counter()
    pool = render_pool(cfg, pool_episodes, batch, seed)
    render_seconds = time.perf_counter() - started
    torch.manual_seed(seed)
    policy = build_policy(cfg)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    policy.train()
    for _ in range(steps):
        unroll = pool[int(rng.integers(len(pool)))]
        inputs = observation_to_tensors(unroll.observations(), "cpu")
        actions = torch.from_numpy(np.ascontiguousarray(unroll.actions)).long()
        out = policy.unroll(inputs, actions, policy.initial_state(unroll.batch_size))
        loss = recovery_loss(out.log_prob) / unroll.batch_size  # nats per episode
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    policy.eval()
    dataset = for_experiment(cfg)
    _, empty_floor = domain_baseline(cfg, dataset.holdout)
    greedy = reconstruct(cfg, policy, dataset.holdout, seed=0, greedy=True)
    report = placement_report(action_spec_for(cfg), greedy.actions, dataset.holdout_programs)
    tail = max(1, steps // 10)
    return {"steps": steps, "batch": batch, "pool_episodes": len(pool) * batch,
            "first_loss": float(np.mean(losses[:tail])), "last_loss": float(np.mean(losses[-tail:])),
            "l2_greedy_x": greedy.mean_l2 / empty_floor, "placements_greedy": report.as_dict(),
            "render_seconds": render_seconds, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/tiny-scenes.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=1024, help="prior programs rendered once and trained on")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="an override of the experiment for every variant, before the variant's own")
    parser.add_argument("--out", default="bench/results/scene-probe/probe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, object] = {"config": args.config, "set": args.overrides, "variants": {}}
    for name in args.variants:
        cfg = resolve_experiment(args.config, [*args.overrides, *VARIANTS[name]]).config
        if cfg.env.kind != "mujoco" or not cfg.env.conditional:
            raise SystemExit(f"{args.config}: the probe needs a conditional mujoco experiment")
        figures = probe(cfg, args.steps, args.batch, args.pool, args.learning_rate, args.seed)
        results["variants"][name] = {"set": list(VARIANTS[name]), **figures}  # type: ignore[index]
        placed = figures["placements_greedy"]
        print(f"{name:20s} loss {figures['first_loss']:.2f} -> {figures['last_loss']:.2f}  "
              f"greedy {figures['l2_greedy_x']:.2f}x the empty floor  on a target cell {placed['on_target_cell']:.0%} "
              f"(chance {placed['chance']:.1%})  right shape {placed['right_shape']:.0%} size {placed['right_size']:.0%} "
              f"colour {placed['right_color']:.0%} object {placed['right_object']:.0%}  "
              f"({figures['seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
