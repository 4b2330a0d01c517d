"""Learner update and acting speed against the hardware's limit, per profile and precision.

For each profile (by default the CPU profile ``tiny`` and the paper profile ``mnist``) this
measures, in one run and on one core (``--threads``), what the policy learner does per update:
:meth:`learner.training.PolicyTrainer.update` on a batch of real episodes from the actor loop
(the profile's ``learner.batch_size``), which scores the episodes with the discriminator and then takes
the forward, backward and Adam step. Each variant is timed in alternating rounds (the median
round is reported):

* ``eager fp32``: the baseline, what the learner ran before precision was configurable;
* ``eager bf16``: ``learner.precision: bf16`` (:mod:`spiral.nets.precision`);
* ``nchw fp32``: the policy's convolutions in channels-first layout instead of channels-last,
  to show what the layout is worth;
* with ``--compile``: ``torch.compile`` (inductor) of the policy's unroll, in fp32 and bf16,
  and its compile time.

Figures: frames/s per core, achieved GFLOP/s (FLOPs counted once with
``torch.utils.flop_counter.FlopCounterMode`` over one update, divided by the measured time),
that as a fraction of the core's matmul peak at the variant's precision (a 2048x2048 matmul,
measured in the same run), and the ratio to eager fp32. A second table times acting: one
sampling forward of the profile's ``actor.num_envs`` environments, fp32 and bf16, and one
discriminator-learner update (``discriminator_learner.batch_size`` real images and as many
renders, gradient penalty included), fp32 and bf16.

The last line is every figure as one JSON object.

The episodes the update trains on are acted on the CPU with the profile's renderer, or with
``--backend fast`` where libmypaint is not installed (a GPU machine: ``bench/gpu_check.sh``);
the update's cost does not depend on which renderer painted its canvases.

Usage::

    python -m bench.update_speed [--config tiny mnist] [--updates 5] [--threads 1] [--compile]
                                 [--device cpu|cuda] [--batch B] [--backend libmypaint|fast]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import numpy as np
import torch


from spiral.runtime.allocator import retain_freed_memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    """GFLOP/s of a ``size x size`` matmul in ``dtype`` on ``device`` (best of repeated calls)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def timed_rounds(variants: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each variant, calling them in alternating rounds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up (and compilation)
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_profile(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    from spiral.agent.acting import EpisodeRunner
    from learner.training import PolicyTrainer
    from spiral.config import experiment_path, load_experiment
    from spiral.data import for_experiment
    from spiral.envs import make_env
    from spiral.nets import build_discriminator, build_policy, observation_to_tensors
    from spiral.nets.precision import autocast
    from spiral.agent.trajectory import Unroll
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_experiment(experiment_path(name))
    batch_size = args.batch or cfg.learner.batch_size
    data = for_experiment(cfg)
    torch.manual_seed(cfg.seed)
    num_envs = cfg.actor.num_envs
    runner = EpisodeRunner(cfg, make_env(cfg, num_envs, seed=0, backend=args.backend), build_policy(cfg),
                           data.images if cfg.env.conditional else None, seed=0, actor_id="bench")
    batch = Unroll.concatenate([runner.run_episode() for _ in range(-(-batch_size // num_envs))])
    frames = batch.num_steps * batch.batch_size
    discriminator = build_discriminator(cfg).to(device).eval()

    def trainer(precision: str, layout: torch.memory_format = torch.channels_last,
                compiled: bool = False) -> tuple[PolicyTrainer, float]:
        # The trainer compiles its own unroll with learner.compile (learner/training.py), exactly
        # as the learner does; patching policy.unroll from here would leave the update eager.
        variant = load_experiment(experiment_path(name),
                                  overrides={"learner": {"precision": precision, "compile": compiled}})
        torch.manual_seed(0)
        policy = build_policy(variant)
        if layout is not torch.channels_last:
            policy.memory_format = layout
            policy.to(memory_format=layout)
        t = PolicyTrainer(variant, policy, device=device)
        compile_seconds = 0.0
        if compiled:
            start = time.perf_counter()
            t.update(batch, discriminator, 1)
            _sync(device)
            compile_seconds = time.perf_counter() - start
        return t, compile_seconds

    trainers: dict[str, tuple[PolicyTrainer, float]] = {
        "eager fp32": trainer("fp32"), "eager bf16": trainer("bf16"),
        "nchw fp32": trainer("fp32", torch.contiguous_format)}
    if args.compile:
        trainers["compiled fp32"] = trainer("fp32", compiled=True)
        trainers["compiled bf16"] = trainer("bf16", compiled=True)
    with FlopCounterMode(display=False) as counter:
        trainers["eager fp32"][0].update(batch, discriminator, 1)
    flops = counter.get_total_flops()
    seconds = timed_rounds({k: (lambda t=t: t.update(batch, discriminator, 1)) for k, (t, _) in trainers.items()},
                           args.updates, device)
    out: dict[str, dict[str, float]] = {}
    for variant, (t, compile_seconds) in trainers.items():
        out[variant] = {"ms": 1000 * seconds[variant], "frames_per_second_per_core": frames / seconds[variant] / args.threads,
                        "gflops": flops / seconds[variant] / 1e9, "precision": t.precision == "bf16",
                        "compile_seconds": compile_seconds}
    out["_meta"] = {"frames": frames, "batch": batch.batch_size, "mflop_per_frame": flops / frames / 1e6,
                    "num_envs": num_envs, "disc_batch": cfg.discriminator_learner.batch_size}

    # The discriminator learner's update (its batch of real images and renders, with the
    # gradient penalty), fp32 and bf16.
    from discriminator.training import DiscriminatorTrainer
    b = cfg.discriminator_learner.batch_size
    rng = np.random.default_rng(0)
    real = data.images[rng.integers(0, len(data.images), size=b)]
    fake = np.resize(batch.final_canvases, (b, *batch.final_canvases.shape[1:]))
    discriminator_updates = {}
    for precision in ("fp32", "bf16"):
        dcfg = load_experiment(experiment_path(name), overrides={"discriminator_learner": {"precision": precision}})
        torch.manual_seed(0)
        trainer_d = DiscriminatorTrainer(dcfg, build_discriminator(dcfg), device=device)
        discriminator_updates[precision] = (
            lambda t=trainer_d: t.update(real, fake, real if cfg.env.conditional else None))
    for precision, s in timed_rounds(discriminator_updates, args.updates, device).items():
        out[f"discriminator {precision}"] = {"ms": 1000 * s, "images_per_second_per_core": 2 * b / s / args.threads}

    # Acting: one sampling forward for the actor's N environments.
    obs = make_env(cfg, num_envs, seed=1, backend=args.backend).reset(data.images[:num_envs] if cfg.env.conditional else None)
    inputs = observation_to_tensors(obs).to(device)
    acting = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        policy = build_policy(cfg).to(device).eval()
        state = policy.initial_state(num_envs, device)

        def act(policy=policy, state=state, precision=precision) -> object:
            with torch.no_grad(), autocast(precision, device):
                return policy(inputs, state)
        acting[precision] = act
    act_seconds = timed_rounds(acting, max(20, 4 * args.updates), device)
    for precision, s in act_seconds.items():
        out[f"acting {precision}"] = {"ms": 1000 * s, "steps_per_second_per_core": num_envs / s / args.threads}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["tiny", "mnist"])
    parser.add_argument("--updates", type=int, default=5, help="timed rounds of each variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=0, help="episodes per update (default: the profile's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the unroll")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=("libmypaint", "fast"), default=None,
                        help="renderer of the episodes the update trains on (default: each profile's own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the learner does at start-up
    device = torch.device(args.device)
    size = 2048 if device.type == "cpu" else 8192
    peaks = {"fp32": matmul_peak(device, torch.float32, size), "bf16": matmul_peak(device, torch.bfloat16, size)}
    results: dict[str, object] = {"peak_gflops": peaks, "device": str(device), "threads": args.threads}
    print(f"{device}, {args.threads} thread(s): {size}x{size} matmul peak fp32 {peaks['fp32']:,.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:,.0f} GFLOP/s")
    for name in args.config:
        figures = measure_profile(name, args, device)
        meta = figures.pop("_meta")
        base = figures["eager fp32"]
        print(f"\n{name}: update of {meta['batch']} episodes ({meta['frames']} frames), "
              f"{meta['mflop_per_frame']:.1f} MFLOP/frame (rewards + forward + backward + Adam)")
        print(f"  {'variant':14s} {'ms':>9s} {'frames/s/core':>14s} {'GFLOP/s':>8s} {'of peak':>8s} {'vs fp32':>8s}")
        for variant, f in figures.items():
            if variant.startswith(("acting", "discriminator")):
                continue
            peak = peaks["bf16" if f["precision"] else "fp32"]
            f["fraction_of_peak"] = f["gflops"] / peak
            f["ratio"] = base["ms"] / f["ms"]
            extra = f"   (compile {f['compile_seconds']:.0f} s)" if f["compile_seconds"] else ""
            if "bf16" in variant and not f["precision"]:
                extra += "   (fp32: bf16 does not pay on this CPU, spiral.nets.precision.bf16_native)"
            print(f"  {variant:14s} {f['ms']:9.1f} {f['frames_per_second_per_core']:14,.0f} {f['gflops']:8.1f} "
                  f"{f['fraction_of_peak']:8.1%} {f['ratio']:7.2f}x{extra}")
        act32, act16 = figures["acting fp32"], figures["acting bf16"]
        act16["ratio"] = act32["ms"] / act16["ms"]
        print(f"  acting forward, N={meta['num_envs']}: fp32 {act32['ms']:.2f} ms ({act32['steps_per_second_per_core']:,.0f} steps/s/core), "
              f"bf16 {act16['ms']:.2f} ms ({act16['steps_per_second_per_core']:,.0f} steps/s/core, {act16['ratio']:.2f}x)")
        d32, d16 = figures["discriminator fp32"], figures["discriminator bf16"]
        d16["ratio"] = d32["ms"] / d16["ms"]
        print(f"  discriminator update, batch {meta['disc_batch']}: fp32 {d32['ms']:.1f} ms, bf16 {d16['ms']:.1f} ms "
              f"({d16['ratio']:.2f}x)")
        figures["_meta"] = meta
        results[name] = figures
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
