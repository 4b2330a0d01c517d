"""Environment throughput: renderers alone, the actor loop in one process, and the whole system.

Prints, measured in one run on this machine (so the ratios are fair on a noisy machine):

1. renderer steps/s per core with random actions for N batched environments (N = 8 and 64):
   libmypaint (the baseline), the fast torch rasterizer, and MuJoCo scenes;
2. baseline 1, the actor loop alone in one process with no gRPC (policy inference +
   libmypaint, N canvases, one thread): environment frames/s. Nothing consumes its episodes.
3. baseline 2, the whole training loop in one process with no gRPC (``spiral local``,
   :class:`spiral.commands.local.LocalSystem`): the same actor loop, the policy update, the replay table
   and the discriminator updates in turn, on as many torch threads as the machine has cores
   (:func:`inprocess_training_rate`): the same work per frame as the system;
4. the one-machine system (replay buffer, discriminator, learner and ``--actors`` actors as
   separate processes talking gRPC, the learner training all the while): environment
   frames/s summed over actors, read from their Prometheus counters, and its ratios to (2)
   and (3). The baselines are measured before and after the system and averaged.

The last line is all figures as one JSON object.

Usage::

    python -m bench.env_throughput [--config tiny] [--num-envs 8] [--seconds 20] [--system-seconds 90]
                                   [--actors 1 2 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from spiral.agent.acting import EpisodeRunner
from spiral.runtime.allocator import retain_freed_memory
from spiral.config import ExperimentConfig, dump_experiment, experiment_path, load_experiment
from spiral.envs import action_spec_for, make_env
from spiral.nets import build_policy


def random_actions(cfg: ExperimentConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    spec = action_spec_for(cfg)
    actions = np.stack([rng.integers(0, size, size=n) for size in spec.sizes], axis=1)
    actions[:, 0] = 1 if cfg.env.kind == "paint" else rng.integers(0, 2, size=n)  # paint steps (the costly kind)
    return actions


def renderer_rate(cfg: ExperimentConfig, backend: str | None, num_envs: int, seconds: float,
                  compiled: bool = True) -> float:
    """Batched env steps per second (one step = one action on one canvas).

    ``compiled`` False steps the fast backend with its torch operations instead of its compiled
    CPU loop (:mod:`spiral.envs.fast_paint_kernel`): the step before that loop existed.

    The random actions are drawn before the clock starts (256 batches, cycled; drawing them in
    the loop cost ~0.07 ms per batch, ~14% of the fast backend's step at N=8), and one step is
    taken before it too (the compiled loop loads or compiles then), so the figure is the
    renderer's alone.
    """
    env = make_env(cfg, num_envs, seed=0, backend=backend)
    if not compiled:
        env.compiled = False
    rng = np.random.default_rng(0)
    actions = [random_actions(cfg, rng, num_envs) for _ in range(256)]
    size = cfg.env.image_size
    targets = np.full((num_envs, size, size, cfg.image_channels), 255, np.uint8) if cfg.env.conditional else None
    env.reset(targets)  # warm-up, off the clock: the compiled loop's first step loads or compiles it
    env.step(actions[0])
    steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(targets)
        while not env.done:
            env.step(actions[(steps // num_envs) % len(actions)])
            steps += num_envs
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def inprocess_actor_rate(cfg: ExperimentConfig, num_envs: int, seconds: float) -> float:
    """Frames/s of the actor loop (policy forward + environment) in this process, no gRPC."""
    env = make_env(cfg, num_envs, seed=0)
    targets = None
    if cfg.env.conditional:
        from spiral.data import for_experiment
        targets = for_experiment(cfg).images
    runner = EpisodeRunner(cfg, env, build_policy(cfg), targets, seed=0, actor_id="bench")
    frames = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        unroll = runner.run_episode()
        frames += unroll.num_steps * unroll.batch_size
    return frames / (time.perf_counter() - start)


def inprocess_training_rate(cfg: ExperimentConfig, num_envs: int, seconds: float, threads: int) -> dict[str, float]:
    """Frames/s of the whole training loop in one process, no gRPC, on ``threads`` torch threads.

    This is ``spiral local`` (:class:`spiral.commands.local.LocalSystem`): the same work per frame as
    the system, done by the same classes the services wrap: one actor (its own policy copy,
    refreshed from the learner as a remote actor's is), a policy learner update per
    ``learner.batch_size`` episodes scored by the discriminator, every final render
    into a replay table with the experiment's limits, and as many discriminator updates as its
    ``samples_per_insert`` allows, all in turn on one Python thread (checkpoints, logs and
    sample grids go to a temporary run directory, as the services write theirs).
    """
    from spiral.commands.local import LocalSystem

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            local_cfg = dataclasses.replace(cfg, actor=dataclasses.replace(cfg.actor, num_envs=num_envs))
            system = LocalSystem(local_cfg, Path(run_dir), num_actors=1)
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                system.step()
            elapsed = time.perf_counter() - start
            frames, updates = system.frames, system.learner.updates
            discriminator_updates = system.discriminator.updates
            system.close()
    finally:
        torch.set_num_threads(previous)
    return {"frames_per_second": frames / elapsed, "learner_updates_per_second": updates / elapsed,
            "discriminator_updates_per_second": discriminator_updates / elapsed}


def system_actor_rate(config_path: Path, num_actors: int, seconds: float, warmup: float) -> dict[str, float]:
    """Frames/s summed over the actors of a real one-machine system (after ``warmup`` seconds),
    started as ``spiral up`` starts it (:func:`spiral.commands.layout.plan_layout`,
    :class:`spiral.commands.supervisor.Supervisor`)."""
    from spiral.commands.layout import plan_layout
    from spiral.commands.status import scrape
    from spiral.commands.supervisor import Supervisor

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        layout = plan_layout(load_experiment(config_path), config_path, run_dir, num_actors, 1)
        supervisor = Supervisor(layout, run_dir, restart=False)
        urls = {spec.name: spec.metrics_url for spec in layout.processes}
        actors = [f"actor-{i}" for i in range(num_actors)]

        def total(metric: str, names: list[str]) -> float:
            return sum(scrape(urls[name]).get(metric, 0.0) for name in names)

        supervisor.start()
        try:
            deadline = time.monotonic() + 300
            while total("spiral_actor_env_steps_total", actors) == 0:
                if time.monotonic() > deadline or supervisor.poll():
                    raise RuntimeError(f"the system did not start stepping; see the logs under {run_dir / 'logs'}")
                time.sleep(0.5)
            time.sleep(warmup)
            steps0, updates0, t0 = (total("spiral_actor_env_steps_total", actors),
                                    total("spiral_learner_updates_total", ["learner"]), time.monotonic())
            time.sleep(seconds)
            steps1, updates1, t1 = (total("spiral_actor_env_steps_total", actors),
                                    total("spiral_learner_updates_total", ["learner"]), time.monotonic())
        finally:
            supervisor.stop(grace_seconds=20)
    return {"frames_per_second": (steps1 - steps0) / (t1 - t0),
            "learner_updates_per_second": (updates1 - updates0) / (t1 - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--num-envs", type=int, default=8, help="canvases per actor (the tiny profile's 8)")
    parser.add_argument("--renderer-envs", type=int, nargs="*", default=[64],
                        help="further batch sizes for the renderer comparison")
    parser.add_argument("--seconds", type=float, default=15.0, help="per in-process measurement")
    parser.add_argument("--system-seconds", type=float, default=60.0, help="system measurement window")
    parser.add_argument("--actors", type=int, nargs="+", default=[1],
                        help="actor processes in the system measurement; several (e.g. 1 2 4) measure the "
                             "system once per count, in one run, and print how frames/s scale with actors")
    parser.add_argument("--skip-system", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()  # allocate as the learner does (the actor loop is unaffected: its blocks are small)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = load_experiment(experiment_path(args.config))
    results: dict[str, float] = {}

    scene_cfg = load_experiment(experiment_path("mujoco"))
    for n in sorted({args.num_envs, *args.renderer_envs}):
        print(f"renderers, {n} batched canvases, random paint actions (same seed), 1 thread = 1 core:")
        base = renderer_rate(cfg, "libmypaint", n, args.seconds)
        fast = renderer_rate(cfg, "fast", n, args.seconds)
        fast_torch = renderer_rate(cfg, "fast", n, args.seconds, compiled=False)
        scene = renderer_rate(scene_cfg, None, n, args.seconds)
        results.update({f"libmypaint_steps_per_second_per_core_n{n}": base,
                        f"fast_steps_per_second_per_core_n{n}": fast,
                        f"mujoco_steps_per_second_per_core_n{n}": scene,
                        f"fast_torch_steps_per_second_per_core_n{n}": fast_torch,
                        f"fast_over_libmypaint_n{n}": fast / base,
                        f"fast_torch_over_libmypaint_n{n}": fast_torch / base})
        print(f"  libmypaint  {base:9.0f} steps/s   (baseline)")
        print(f"  fast        {fast:9.0f} steps/s   {fast / base:6.1f}x libmypaint   (compiled CPU loop)")
        print(f"  fast, torch {fast_torch:9.0f} steps/s   {fast_torch / base:6.1f}x libmypaint   "
              f"(its torch operations; the compiled loop is {fast / fast_torch:.2f}x)")
        print(f"  mujoco      {scene:9.0f} steps/s   {scene / base:6.2f}x libmypaint")

    # The two in-process baselines are measured before and, when the system runs, again after
    # it; their means are what the system is compared with (this machine drifts by ~15%).
    threads = os.cpu_count() or 1
    shipped = load_experiment(experiment_path(args.config), {"actor": {"num_envs": args.num_envs}})

    def baselines(when: str) -> tuple[float, dict[str, float]]:
        actor = inprocess_actor_rate(cfg, args.num_envs, args.seconds)
        print(f"[{when}] actor loop alone in one process, no gRPC, 1 thread ({cfg.name}, N={args.num_envs}): "
              f"{actor:8.0f} frames/s (baseline 1)")
        training = inprocess_training_rate(shipped, args.num_envs, args.seconds * 2, threads)
        print(f"[{when}] whole training loop in one process, no gRPC, {threads} threads: "
              f"{training['frames_per_second']:8.0f} frames/s (baseline 2; learner "
              f"{training['learner_updates_per_second']:.2f} updates/s, discriminator "
              f"{training['discriminator_updates_per_second']:.2f})")
        return actor, training

    rounds = [baselines("before")]
    if not args.skip_system:
        # The experiment as shipped (its checkpoint, sample-grid and refresh intervals), not the
        # test harness's quick-turnover settings; only the canvases per actor are the baseline's.
        config_path = Path(tempfile.mkdtemp()) / "experiment.yaml"
        dump_experiment(shipped, config_path)
        systems = {n: system_actor_rate(config_path, n, args.system_seconds, warmup=10.0) for n in args.actors}
        system = systems[args.actors[0]]
        rounds.append(baselines("after"))
    inproc = float(np.mean([actor for actor, _ in rounds]))
    training = {key: float(np.mean([t[key] for _, t in rounds])) for key in rounds[0][1]}
    results["inprocess_actor_frames_per_second"] = inproc
    results.update({f"inprocess_training_{k}": v for k, v in training.items()})
    if not args.skip_system:
        rate = system["frames_per_second"]
        results.update({f"system_{k}": v for k, v in system.items()})
        results["system_over_inprocess"] = rate / inproc
        results["system_over_inprocess_training"] = rate / training["frames_per_second"]
        print(f"one-machine system, {args.actors[0]} actor process(es), learner training: {rate:8.0f} frames/s "
              f"(learner {system['learner_updates_per_second']:.2f} updates/s)")
        print(f"  = {rate / inproc:.2f} of the actor loop alone ({inproc:.0f}, mean of before and after)")
        print(f"  = {rate / training['frames_per_second']:.2f} of the whole training loop in one process "
              f"({training['frames_per_second']:.0f}, mean of before and after)")
    if not args.skip_system and len(args.actors) > 1:
        first = args.actors[0]
        print(f"scaling with actor processes ({os.cpu_count()} cores):")
        for n, figures in systems.items():
            fps = figures["frames_per_second"]
            results[f"system_actors{n}_frames_per_second"] = fps
            results[f"system_actors{n}_learner_updates_per_second"] = figures["learner_updates_per_second"]
            results[f"system_actors{n}_over_actors{first}"] = fps / systems[first]["frames_per_second"]
            print(f"  {n} actor(s): {fps:8.0f} frames/s  {fps / systems[first]['frames_per_second']:5.2f}x "
                  f"{first} actor(s)  (learner {figures['learner_updates_per_second']:.2f} updates/s)")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
