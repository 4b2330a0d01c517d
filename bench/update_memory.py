"""Update speed with and without keeping freed memory (spiral.runtime.allocator), measured in one run.

One policy-learner update (:class:`learner.training.PolicyTrainer` on a batch of real
episodes from the actor loop, the experiment's ``learner.batch_size``) and one discriminator
update (:class:`discriminator.training.DiscriminatorTrainer`, ``discriminator_learner.batch_size``)
are timed in two child processes that differ only in ``SPIRAL_MALLOC_RETAIN``: ``0`` (glibc's
defaults, the baseline) and ``1`` (what the policy learner does at start-up,
:func:`spiral.runtime.allocator.retain_freed_memory`). Each child also counts the minor page faults
per update. The last line is every figure as one JSON object.

Usage::

    python -m bench.update_memory [--config tiny] [--updates 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def per_update(fn: Callable[[], object], updates: int) -> dict[str, float]:
    """Milliseconds and minor page faults per call of ``fn`` (after two warm-up calls)."""
    for _ in range(2):
        fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(updates):
        fn()
    elapsed = time.perf_counter() - start
    return {"ms": 1000 * elapsed / updates,
            "page_faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / updates}


def measure(config: str, updates: int) -> dict[str, float]:
    """In this process (the child): time both trainers' updates."""
    import numpy as np
    import torch

    from spiral.runtime.allocator import retain_freed_memory

    torch.set_num_threads(1)
    retained = retain_freed_memory()
    from spiral.agent.acting import EpisodeRunner
    from discriminator.training import DiscriminatorTrainer
    from learner.training import PolicyTrainer
    from spiral.config import experiment_path, load_experiment
    from spiral.data import for_experiment
    from spiral.envs import make_env
    from spiral.nets import build_discriminator, build_policy
    from spiral.agent.trajectory import Unroll

    cfg = load_experiment(experiment_path(config))
    torch.manual_seed(cfg.seed)
    data = for_experiment(cfg)
    num_envs = cfg.actor.num_envs
    runner = EpisodeRunner(cfg, make_env(cfg, num_envs, seed=0), build_policy(cfg),
                           data.images if cfg.env.conditional else None, seed=0, actor_id="bench")
    episodes = -(-cfg.learner.batch_size // num_envs)
    batch = Unroll.concatenate([runner.run_episode() for _ in range(episodes)])
    policy = PolicyTrainer(cfg, build_policy(cfg))
    discriminator = build_discriminator(cfg).eval()
    figures = {f"policy_update_{k}": v
               for k, v in per_update(lambda: policy.update(batch, discriminator, 1), updates).items()}

    b = cfg.discriminator_learner.batch_size
    rng = np.random.default_rng(0)
    real = data.images[rng.integers(0, len(data.images), size=b)]
    fake = np.resize(batch.final_canvases, (b, *batch.final_canvases.shape[1:]))
    discriminator = DiscriminatorTrainer(cfg, build_discriminator(cfg))
    targets = real if cfg.env.conditional else None
    figures.update({f"discriminator_update_{k}": v
                    for k, v in per_update(lambda: discriminator.update(real, fake, targets), updates).items()})
    figures["retained"] = float(retained)
    figures["frames_per_policy_update"] = float(batch.num_steps * batch.batch_size)
    return figures


def child(config: str, updates: int, retain: bool) -> dict[str, float]:
    env = {**os.environ, "SPIRAL_MALLOC_RETAIN": "1" if retain else "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "bench.update_memory", "--config", config, "--updates", str(updates), "--child"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--updates", type=int, default=20, help="timed updates of each trainer")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, args.updates)))
        return
    base = child(args.config, args.updates, retain=False)
    kept = child(args.config, args.updates, retain=True)
    results: dict[str, float] = {}
    print(f"{args.config}: one update on one core, glibc defaults (baseline) vs freed memory kept "
          f"(spiral.runtime.allocator, what the learner does):")
    for what in ("policy_update", "discriminator_update"):
        speedup = base[f"{what}_ms"] / kept[f"{what}_ms"]
        results.update({f"{what}_ms_default": base[f"{what}_ms"], f"{what}_ms_retained": kept[f"{what}_ms"],
                        f"{what}_page_faults_default": base[f"{what}_page_faults"],
                        f"{what}_page_faults_retained": kept[f"{what}_page_faults"], f"{what}_speedup": speedup})
        print(f"  {what.replace('_', ' '):22s} {base[f'{what}_ms']:7.1f} ms ({base[f'{what}_page_faults']:7.0f} faults)"
              f" -> {kept[f'{what}_ms']:7.1f} ms ({kept[f'{what}_page_faults']:5.0f} faults)   {speedup:.2f}x")
    frames = kept["frames_per_policy_update"]
    results["learner_frames_per_second_per_core_default"] = 1000 * frames / base["policy_update_ms"]
    results["learner_frames_per_second_per_core_retained"] = 1000 * frames / kept["policy_update_ms"]
    print(f"  learner capacity: {results['learner_frames_per_second_per_core_default']:.0f} -> "
          f"{results['learner_frames_per_second_per_core_retained']:.0f} frames/s per core")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
