"""The capacity model, measured and checked: frames/s, policy lag and bytes for N actors.

Every input of :mod:`bench.capacity_model` is measured here, on the machine this runs on, in one
run:

1. **message sizes**: a real unroll acted by the configuration's policy, encoded as
   ``SubmitUnrolls`` does; its final renders encoded as the replay ``Insert`` does; the
   policy's parameters chunked as ``GetParameters`` sends them;
2. **CPU per frame, per role**: the system started as ``spiral up`` starts it
   (:mod:`bench.actor_scaling`, on the CPU) with one actor; each process's CPU seconds from
   ``/proc`` over the window, divided by the frames it handled (actors and replay buffer: the
   frames the actors made; the policy learner: the frames it trained on; the discriminator: the
   frames the actors made, since the replay's rate limiter ties its samples to the inserts).

The model then predicts two placements, and the script checks them against measurements:

* ``spiral up`` (every process on this machine's cores): 1 actor is the calibration point;
  2 and 4 actors are measured in the same ``bench.actor_scaling`` run and compared;
* ``--harness``: the manifest harness with per-pod CPU quotas (``tests/overlays/harness-limits``:
  actors 200m, learner 800m, discriminator 300m, replay buffer 100m), 1 -> 2 -> 4 actor pods,
  measured as :mod:`tests.test_manifest_containers` measures them (needs Docker and the image).

Prints a table of predicted and measured frames/s (and policy lag where measured) with the
error, the actor count at which the learner saturates, and the network bytes/s per actor;
``--out`` keeps every figure as JSON.

Usage::

    python -m bench.capacity [--config tiny] [--seconds 40] [--harness] [--set FIELD=VALUE ...] [--out FILE]
    python -m bench.capacity --costs FILE --predict 1 2 4 8 16 [--quotas 0.2 0.8 0.3 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.capacity_model import Costs, Prediction, Quotas, SharedCores, predict, saturating_actors

ROOT = Path(__file__).resolve().parents[1]
HARNESS_QUOTAS = Quotas(actor=0.2, learner=0.8, discriminator=0.3, replay=0.1)
"""tests/overlays/harness-limits/limits.yaml's CPU limits."""


def message_sizes(config: str, overrides: list[str]) -> dict[str, int]:
    """Bytes of one real unroll, its renders and a full parameter set, encoded as the RPCs send them."""
    import torch

    from spiral.agent.acting import EpisodeRunner
    from spiral.config import experiment_path, resolve_experiment
    from spiral.core import ParameterSnapshot
    from spiral.envs import action_spec_for, make_env
    from spiral.nets import build_policy
    from spiral.rpc.messages import encode_insert_request, encode_unroll
    from spiral.rpc.parameters import chunk_parameters

    cfg = resolve_experiment(experiment_path(config), overrides).config
    torch.manual_seed(0)
    policy = build_policy(cfg)
    shape = (cfg.actor.num_envs, cfg.env.image_size, cfg.env.image_size, cfg.image_channels)
    targets = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8) if cfg.env.conditional else None
    runner = EpisodeRunner(cfg, make_env(cfg, cfg.actor.num_envs, seed=0), policy, targets, seed=0,
                           actor_id="capacity")
    tensors = {name: value.detach().cpu().numpy() for name, value in policy.state_dict().items()}
    runner.load_parameters(ParameterSnapshot(1, tensors))
    unroll = runner.run_episode()
    spec = action_spec_for(cfg)
    unroll_bytes = encode_unroll(unroll, spec.names).ByteSize()
    renders_bytes = encode_insert_request(unroll.final_canvases, targets, 1, "capacity").ByteSize()
    parameter_bytes = sum(chunk.ByteSize() for chunk in chunk_parameters(1, tensors))
    return {"unroll_bytes": unroll_bytes, "renders_bytes": renders_bytes, "parameter_bytes": parameter_bytes}


def run_actor_scaling(config: str, counts: list[int], seconds: float, work: Path,
                      overrides: list[str]) -> dict[str, Any]:
    """``bench.actor_scaling`` on the CPU (``spiral up``'s layout), its final JSON line."""
    command = [sys.executable, "-m", "bench.actor_scaling", "--config", config, "--device", "cpu", "--actors",
               *map(str, counts), "--seconds", str(seconds), "--work-dir", str(work),
               *[arg for item in overrides for arg in ("--set", item)]]
    print("$", " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench.actor_scaling failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def costs_from(config: str, calibration: dict[str, Any], sizes: dict[str, int],
               overrides: list[str] | None = None) -> Costs:
    """The model's inputs from one measured window (``bench.actor_scaling``'s figures) and the sizes."""
    from spiral.config import experiment_path, resolve_experiment

    cfg = resolve_experiment(experiment_path(config), overrides or []).config
    cores = {role: percent / 100.0 for role, percent in calibration["cpu_percent"]["per_role"].items()}
    frames, trained = calibration["frames_per_second"], calibration["learner_frames_per_second"]
    if frames <= 0 or trained <= 0:
        raise RuntimeError(f"nothing to calibrate on: {frames} frames/s made, {trained} trained on")
    return Costs(config=config,
                 actor_cpu_per_frame=cores["actor"] / frames,
                 learner_cpu_per_frame=cores["learner"] / trained,
                 replay_cpu_per_frame=cores.get("replaybuffer", 0.0) / frames,
                 discriminator_cpu_per_frame=cores.get("discriminator", 0.0) / frames,
                 frames_per_update=cfg.learner.batch_size * cfg.env.episode_length,
                 frames_per_unroll=cfg.actor.num_envs * cfg.env.episode_length,
                 episode_length=cfg.env.episode_length,
                 parameter_refresh_seconds=cfg.actor.parameter_refresh_seconds,
                 queue_episodes=cfg.learner.queue_capacity, **sizes)


def measure_harness(counts: list[int], seconds: float) -> list[dict[str, float]]:
    """Frames/s and the largest actor policy lag for each actor-pod count, in one harness run."""
    sys.path.insert(0, str(ROOT / "tests"))
    from manifest_containers import ManifestCluster, render  # noqa: PLC0415 - the harness lives with the tests
    from spiral.commands.status import scrape

    cluster = ManifestCluster(render(ROOT / "tests" / "overlays" / "harness-limits"))

    def total(metric: str) -> float:
        return sum(scrape(cluster.metrics_url(pod.name)).get(metric, 0.0) for pod in cluster.of("spiral-actor"))

    def window(length: float) -> tuple[float, float]:
        start, t0, lags = total("spiral_actor_env_steps_total"), time.monotonic(), [0.0]
        while time.monotonic() - t0 < length:
            time.sleep(1.0)
            lags.append(max(scrape(cluster.metrics_url(p.name)).get("spiral_actor_policy_lag_versions", 0.0)
                            for p in cluster.of("spiral-actor")))
        return (total("spiral_actor_env_steps_total") - start) / (time.monotonic() - t0), max(lags)

    figures = []
    cluster.up()
    try:
        for count in counts:
            cluster.scale("spiral-actor", count)
            deadline = time.monotonic() + 600
            while not all(scrape(cluster.metrics_url(p.name)).get("spiral_actor_env_steps_total", 0) > 0
                          for p in cluster.of("spiral-actor")):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} actor pods did not all step within 10 minutes")
                time.sleep(2.0)
            window(15.0)
            rate, lag = window(seconds)
            figures.append({"actors": count, "frames_per_second": rate, "policy_lag_max": lag})
            print(f"harness, {count} actor pods: {rate:.0f} frames/s, largest policy lag {lag:.0f}", flush=True)
    finally:
        cluster.down()
    return figures


def row(label: str, predicted: Prediction, measured: float | None, lag: float | None = None) -> dict[str, Any]:
    error = (predicted.frames_per_second - measured) / measured if measured else None
    print(f"{label:<28} {predicted.actors:>6} {predicted.frames_per_second:>10.0f} "
          f"{'' if measured is None else f'{measured:.0f}':>10} {'' if error is None else f'{100 * error:+.0f}%':>7} "
          f"{predicted.bottleneck:>10} {predicted.policy_lag_versions:>8.1f} {'' if lag is None else f'{lag:.1f}':>8} "
          f"{predicted.bytes_per_second_per_actor / 1e6:>9.2f}")
    return {"placement": label, "actors": predicted.actors, "predicted": predicted.__dict__,
            "measured_frames_per_second": measured, "error": error, "measured_policy_lag": lag}


def header() -> None:
    print(f"{'placement':<28} {'actors':>6} {'predicted':>10} {'measured':>10} {'error':>7} {'bound by':>10} "
          f"{'lag pred':>8} {'lag meas':>8} {'MB/s/actor':>9}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--seconds", type=float, default=40.0, help="measurement window per actor count")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4], help="actor counts to check")
    parser.add_argument("--harness", action="store_true", help="also check the per-pod quota placement (Docker)")
    parser.add_argument("--costs", help="predict from these measured costs (a previous --out) instead of measuring")
    parser.add_argument("--predict", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="counts to predict")
    parser.add_argument("--quotas", type=float, nargs=4, metavar=("ACTOR", "LEARNER", "DISCRIMINATOR", "REPLAY"),
                        help="per-pod CPU slices to predict for (default: the harness's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a setting (e.g. dataset.name=lfw for celeba without its volume)")
    parser.add_argument("--out", help="write every figure here as JSON")
    args = parser.parse_args()
    quotas = Quotas(*args.quotas) if args.quotas else HARNESS_QUOTAS
    cores = len(os.sched_getaffinity(0))
    results: dict[str, Any] = {"config": args.config, "overrides": args.set, "cores": cores, "quotas": quotas.__dict__}

    if args.costs:
        costs = Costs(**json.loads(Path(args.costs).read_text())["costs"])
        spiral_up: dict[str, Any] = {"counts": []}
    else:
        sizes = message_sizes(args.config, args.set)
        with tempfile.TemporaryDirectory(prefix="spiral-capacity-") as work:
            spiral_up = run_actor_scaling(args.config, sorted(set(args.actors)), args.seconds, Path(work), args.set)
        costs = costs_from(args.config, spiral_up["counts"][0], sizes, args.set)
        results["spiral_up"] = spiral_up
    results["costs"] = costs.as_dict()
    print("costs: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in costs.as_dict().items()), flush=True)

    harness = measure_harness(sorted(set(args.actors)), args.seconds) if args.harness else []
    results["harness"] = harness
    header()
    rows = []
    for figures in spiral_up.get("counts", []):
        label = f"spiral up, {cores} shared cores" + (" (calibration)" if figures is spiral_up["counts"][0] else "")
        rows.append(row(label, predict(costs, figures["actors"], SharedCores(cores)), figures["frames_per_second"],
                        figures.get("policy_lag_mean")))
    for figures in harness:
        rows.append(row("harness, per-pod quotas", predict(costs, figures["actors"], quotas),
                        figures["frames_per_second"]))
    for count in args.predict:
        rows.append(row("per-pod quotas (predicted)", predict(costs, count, quotas), None))
    results["rows"] = rows
    results["saturating_actors"] = {"quotas": saturating_actors(costs, quotas),
                                    "shared": saturating_actors(costs, SharedCores(cores))}
    checked = [r["error"] for r in rows if r["error"] is not None and "calibration" not in r["placement"]]
    results["largest_error"] = max(map(abs, checked)) if checked else None
    largest = "n/a" if results["largest_error"] is None else f"{100 * results['largest_error']:.0f}%"
    print(f"the learner saturates at {results['saturating_actors']['quotas']} actor pods of {quotas.actor} cores "
          f"(learner {quotas.learner} cores), at {results['saturating_actors']['shared']} actors on {cores} shared "
          f"cores; largest error against measurements (calibration point excluded): {largest}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
