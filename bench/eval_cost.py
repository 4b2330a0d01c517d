"""What held-out evaluation while training costs the system: frames/s with it on and off.

Runs the one-machine system as ``spiral up`` does (:func:`spiral.commands.layout.plan_layout`,
:class:`spiral.commands.supervisor.Supervisor`, everything on the CPU) twice per repeat, once
with ``learner.eval_every_updates`` at the experiment's cadence (``--eval-every`` to change it)
and once with it 0, alternating which goes first from one repeat to the next, each on a fresh run
directory (one compile cache for all). Each run waits for the learner's first ``--warmup-updates``
updates (its unroll compiles then) and measures for ``--seconds`` (:func:`bench.actor_scaling.measure`):
the actors' environment steps per second (``spiral_actor_env_steps_total``) and the frames the
learner trained on. For each pair it prints both figures and their ratio (on / off; the issue asks
for at least 0.95), and how many evaluations finished inside the window: a window too short for
one measures nothing, and says so.

Usage::

    python -m bench.eval_cost --config experiments/tiny.yaml --seconds 300 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.actor_scaling import learner_rows, measure, warm_up
from spiral.commands.layout import plan_layout
from spiral.commands.supervisor import Supervisor
from spiral.config import experiment_path, resolve_experiment
from spiral.runtime.run_config import record_run_config


def evaluation_rows(run_dir: Path, since: float, until: float) -> list[dict[str, Any]]:
    """The learner's held-out evaluation rows (``"event": "eval"``) written between two wall-clock times."""
    return [row for row in learner_rows(run_dir, since, until, event="eval") if "update" in row]


def run_once(config: str, overrides: list[str], eval_every: int, run_dir: Path, actors: int, seconds: float,
             warmup_updates: int, warmup_timeout: float) -> dict[str, Any]:
    """One system run with ``learner.eval_every_updates=eval_every``; its measurement window's figures."""
    shutil.rmtree(run_dir, ignore_errors=True)
    experiment = resolve_experiment(experiment_path(config), [*overrides, f"learner.eval_every_updates={eval_every}"])
    config_path = record_run_config(run_dir, experiment)
    layout = plan_layout(experiment.config, config_path.resolve(), run_dir, actors, 1, device="cpu")
    supervisor = Supervisor(layout, run_dir)
    events: list[str] = []
    supervisor.start()
    try:
        warmup = warm_up(supervisor, layout, warmup_updates, warmup_timeout, events)
        if warmup["failed"] or not warmup["complete"]:
            return {"eval_every_updates": eval_every, "warmup": warmup, "failed": True, "events": events[-20:]}
        since = time.time()
        figures = measure(supervisor, layout, run_dir, seconds, events)
        evaluations = evaluation_rows(run_dir, since, time.time())
    finally:
        supervisor.stop(grace_seconds=20)
    return {"eval_every_updates": eval_every, "warmup": warmup, "frames_per_second": figures["frames_per_second"],
            "learner_frames_per_second": figures["learner_frames_per_second"],
            "learner_updates_per_second": figures["learner_updates_per_second"],
            "evaluations": len(evaluations), "eval_seconds": [row.get("eval_seconds") for row in evaluations],
            "cpu_percent": figures["cpu_percent"], "events": events[-20:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/tiny.yaml")
    parser.add_argument("--seconds", type=float, default=300.0, help="measurement window of each run")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (on and off)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="learner.eval_every_updates of the runs with evaluation (default: the experiment's)")
    parser.add_argument("--actors", type=int, default=max(1, len(os.sched_getaffinity(0)) // 2),
                        help="actors (default half the cores, as spiral up)")
    parser.add_argument("--warmup-updates", type=int, default=3, help="policy updates before the window")
    parser.add_argument("--warmup-timeout", type=float, default=300.0, help="give up waiting for them after this")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a setting")
    parser.add_argument("--work-dir", help="run directories and compile cache (default: a temporary directory)")
    args = parser.parse_args()
    if args.repeats < 1 or args.seconds <= 0:
        parser.error("--repeats must be >= 1 and --seconds > 0")
    eval_every = args.eval_every
    if eval_every is None:
        eval_every = resolve_experiment(experiment_path(args.config), args.set).config.learner.eval_every_updates
    if eval_every <= 0:
        parser.error("the runs with evaluation need learner.eval_every_updates > 0 (--eval-every)")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="spiral-eval-cost-"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "compile-cache"))  # the children inherit it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit's SIGTERM still stops the system
    print(f"evaluation cost: {args.config}, eval every {eval_every} updates vs off, {args.actors} actor(s), "
          f"{args.seconds:.0f} s windows, {args.repeats} repeat(s); runs under {work}", flush=True)
    pairs: list[dict[str, Any]] = []
    results: dict[str, Any] = {"config": args.config, "eval_every_updates": eval_every, "actors": args.actors,
                               "seconds": args.seconds, "cores": len(os.sched_getaffinity(0)),
                               "overrides": list(args.set), "pairs": pairs}
    try:
        for repeat in range(args.repeats):
            order = (("on", eval_every), ("off", 0)) if repeat % 2 == 0 else (("off", 0), ("on", eval_every))
            pair: dict[str, Any] = {}
            for mode, every in order:
                pair[mode] = run_once(args.config, args.set, every, work / f"run-{repeat}-{mode}", args.actors,
                                      args.seconds, args.warmup_updates, args.warmup_timeout)
                figure = pair[mode]
                if figure.get("failed"):
                    print(f"repeat {repeat} eval {mode}: the system did not warm up: {figure['warmup']}", flush=True)
                    continue
                print(f"repeat {repeat} eval {mode:3s}: {figure['frames_per_second']:8.1f} frames/s "
                      f"(learner {figure['learner_frames_per_second']:.1f}, "
                      f"{figure['learner_updates_per_second']:.2f} updates/s), "
                      f"{figure['evaluations']} evaluation(s) in the window {figure['eval_seconds']}", flush=True)
            if not (pair["on"].get("failed") or pair["off"].get("failed")) and pair["off"]["frames_per_second"] > 0:
                pair["ratio"] = pair["on"]["frames_per_second"] / pair["off"]["frames_per_second"]
                note = "" if pair["on"]["evaluations"] else " (no evaluation finished in the window: it measured none)"
                print(f"repeat {repeat}: frames/s with evaluation / without = {pair['ratio']:.3f}{note}", flush=True)
            pairs.append(pair)
    except SystemExit:
        results["interrupted"] = True
    ratios = [p["ratio"] for p in pairs if "ratio" in p]
    results["mean_ratio"] = sum(ratios) / len(ratios) if ratios else None
    if ratios:
        print(f"mean frames/s ratio (on / off) over {len(ratios)} pair(s): {results['mean_ratio']:.3f}", flush=True)
    print(json.dumps(results))
    return 0 if ratios and not results.get("interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
