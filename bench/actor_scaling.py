"""How one machine's system scales with its actors: frames/s, updates/s, policy lag, GPU and CPU use.

Starts the system as ``spiral up`` does (:func:`spiral.commands.layout.plan_layout`,
:class:`spiral.commands.supervisor.Supervisor`: a replay buffer, a discriminator learner and a
policy learner, both learners on ``--device``, and actors on the CPU), waits for the policy
learner's first updates (its unroll compiles then, with ``learner.compile``), and grows the
actors through the counts given (default 1, 4 and 12) without restarting anything: one process
tree, one compile, the compile cache kept in one place (``TORCHINDUCTOR_CACHE_DIR`` under the
work directory, so a learner that restarts loads its kernels instead of compiling again).

For each count, after ``--settle`` seconds for the new actors to start acting, it measures for
``--seconds``:

* frames/s: environment steps of all actors (``spiral_actor_env_steps_total``), and the frames
  the learner trained on (``spiral_learner_frames_total``);
* policy-learner and discriminator updates/s, and the policy update's mean time;
* policy lag: learner version minus the version that acted, per update (``learner.jsonl``);
* GPU utilisation and memory, sampled from ``nvidia-smi`` every second (absent without one);
* each process's CPU use, from ``/proc/PID/stat`` (percent of one core), summed per role.

The last line is every figure as one JSON object (``bench/gpu_check.sh call2`` keeps it).

Usage::

    python -m bench.actor_scaling [--config mnist] [--device cuda] [--actors 1 4 12] [--seconds 40]
                                  [--settle 10] [--warmup-updates 3] [--warmup-timeout 180]
                                  [--set FIELD=VALUE ...] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from spiral.commands.layout import Layout, plan_layout
from spiral.commands.status import StatusSnapshot, take_snapshot
from spiral.commands.supervisor import Supervisor
from spiral.config import experiment_path, resolve_experiment
from spiral.runtime.device import DeviceUnavailable, training_device
from spiral.runtime.run_config import record_run_config

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class GpuSampler:
    """``nvidia-smi``'s utilisation and memory of GPU 0, sampled every ``period`` seconds on a thread."""

    QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self.available = shutil.which("nvidia-smi") is not None
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> tuple[float, float] | None:
        try:
            done = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=10, check=True)
            utilization, memory = done.stdout.splitlines()[0].split(",")[:2]
            return float(utilization), float(memory)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            sample = self._sample()
            if sample is not None:
                self._samples.append(sample)

    def start(self) -> None:
        self._samples, self._stop = [], threading.Event()
        if self.available:
            self._thread = threading.Thread(target=self._loop, name="nvidia-smi", daemon=True)
            self._thread.start()

    def stop(self) -> dict[str, float] | None:
        """The window's mean and peak utilisation (%) and peak memory (MiB); None without nvidia-smi."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._samples:
            return None
        utilization = [u for u, _ in self._samples]
        return {"utilization_percent_mean": sum(utilization) / len(utilization),
                "utilization_percent_max": max(utilization),
                "memory_used_mib_max": max(m for _, m in self._samples), "samples": len(self._samples)}


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far (None when it is gone)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


def process_cpu(supervisor: Supervisor) -> dict[str, tuple[str, float | None]]:
    """``name -> (role, CPU seconds)`` of every supervised process."""
    return {child.spec.name: (child.spec.role, cpu_seconds(child.popen.pid if child.popen else None))
            for child in supervisor.children}


def cpu_percent(before: dict[str, tuple[str, float | None]], after: dict[str, tuple[str, float | None]],
                seconds: float) -> dict[str, Any]:
    """Percent of one core each process used between two :func:`process_cpu` readings, and per role."""
    per_process: dict[str, float] = {}
    for name, (_, end) in after.items():
        start = before.get(name, ("", None))[1]
        if start is not None and end is not None and end >= start:
            per_process[name] = 100.0 * (end - start) / seconds
    per_role: dict[str, float] = {}
    for name, percent in per_process.items():
        role = after[name][0]
        per_role[role] = per_role.get(role, 0.0) + percent
    return {"per_process": per_process, "per_role": per_role}


def learner_rows(run_dir: Path, since: float, until: float, event: str | None = None) -> list[dict[str, Any]]:
    """The policy learner's update records (or, with ``event``, its rows of that event, e.g.
    ``"eval"``) written between two wall-clock times."""
    path = run_dir / "learner.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if row.get("event") == event and since <= row.get("time", 0.0) <= until:
            rows.append(row)
    return rows


def rate(before: StatusSnapshot, after: StatusSnapshot, metric: str) -> float:
    return max(0.0, after.totals.get(metric, 0.0) - before.totals.get(metric, 0.0)) / max(1e-6, after.time - before.time)


def wait(supervisor: Supervisor, seconds: float, events: list[str]) -> None:
    """Sleep ``seconds`` while restarting processes that exit (their events are kept)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        events += supervisor.poll()
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def warm_up(supervisor: Supervisor, layout: Layout, updates: int, timeout: float, events: list[str]) -> dict[str, Any]:
    """Wait until the policy learner has made ``updates`` updates (its unroll is compiled by then).

    A learner that exits twice first ends the wait (``failed``): measuring a crashing system
    would spend the device's minutes on zeros; its log says why.
    """
    started = time.monotonic()
    first_update = None
    done = 0.0
    failed = None
    while time.monotonic() - started < timeout:
        events += supervisor.poll()
        crashes = [e for e in events if e.startswith(("learner exited", "discriminator exited"))]
        if len(crashes) >= 2:
            failed = "; ".join(crashes)
            break
        done = take_snapshot(layout).totals.get("spiral_learner_updates_total", 0.0)
        if done >= 1 and first_update is None:
            first_update = time.monotonic() - started
        if done >= updates:
            break
        time.sleep(1.0)
    return {"seconds": time.monotonic() - started, "first_update_seconds": first_update, "updates": done,
            "complete": done >= updates, "failed": failed}


def measure(supervisor: Supervisor, layout: Layout, run_dir: Path, seconds: float, events: list[str]) -> dict[str, Any]:
    """One measurement window of the running system (see the module docstring)."""
    gpu = GpuSampler()
    cpu_before, wall_before, snap_before = process_cpu(supervisor), time.time(), take_snapshot(layout)
    gpu.start()
    wait(supervisor, seconds, events)
    gpu_figures = gpu.stop()
    cpu_after, wall_after, snap_after = process_cpu(supervisor), time.time(), take_snapshot(layout)
    rows = learner_rows(run_dir, wall_before, wall_after)
    lags = [row["policy_lag"] for row in rows if "policy_lag" in row]
    update_seconds = [row["seconds"] for row in rows if "seconds" in row]
    return {
        "seconds": snap_after.time - snap_before.time,
        "frames_per_second": rate(snap_before, snap_after, "spiral_actor_env_steps_total"),
        "learner_frames_per_second": rate(snap_before, snap_after, "spiral_learner_frames_total"),
        "learner_updates_per_second": rate(snap_before, snap_after, "spiral_learner_updates_total"),
        "discriminator_updates_per_second": rate(snap_before, snap_after, "spiral_discriminator_updates_total"),
        "policy_lag_mean": sum(lags) / len(lags) if lags else None,
        "policy_lag_max": max(lags) if lags else None,
        "update_ms_mean": 1000 * sum(update_seconds) / len(update_seconds) if update_seconds else None,
        "gpu": gpu_figures,
        "cpu_percent": cpu_percent(cpu_before, cpu_after, wall_after - wall_before),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--device", default="cuda", help="both learners' device (actors act on the CPU)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 4, 12], help="actor counts, rising")
    parser.add_argument("--seconds", type=float, default=40.0, help="measurement window per count")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds for added actors to start acting")
    parser.add_argument("--warmup-updates", type=int, default=3, help="policy updates before the first window")
    parser.add_argument("--warmup-timeout", type=float, default=180.0, help="give up waiting for them after this")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a setting")
    parser.add_argument("--work-dir", help="run directory and compile cache (default: a temporary directory)")
    args = parser.parse_args()
    counts = sorted(set(args.actors))
    if counts[0] < 1:
        parser.error("--actors: counts must be >= 1")
    try:  # a missing GPU fails here, not as learners restarting until the warm-up gives up
        training_device(args.device, "--device")
    except DeviceUnavailable as exc:
        parser.error(str(exc))

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="spiral-actor-scaling-"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "compile-cache"))  # the children inherit it
    experiment = resolve_experiment(experiment_path(args.config), args.set)
    cfg = experiment.config
    run_dir = (work / "run").resolve()
    config_path = record_run_config(run_dir, experiment)
    full = plan_layout(cfg, config_path.resolve(), run_dir, counts[-1], 1, device=args.device)
    actors = full.of_role("actor")
    layout = Layout(processes=[p for p in full.processes if p.role != "actor"] + actors[:counts[0]],
                    members=full.members)
    supervisor = Supervisor(layout, run_dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit's SIGTERM still stops the system below
    events: list[str] = []
    results: dict[str, Any] = {"config": cfg.name, "device": args.device, "renderer": cfg.env.paint.backend
                               if cfg.env.kind == "paint" else cfg.env.kind, "overrides": list(args.set),
                               "batch_size": cfg.learner.batch_size, "num_envs": cfg.actor.num_envs,
                               "compile": cfg.learner.compile, "precision_configured": cfg.learner.precision,
                               "cores": len(os.sched_getaffinity(0)), "counts": []}
    print(f"actor scaling: {args.config} on {args.device}, actors {counts}, {args.seconds:.0f} s each; logs in "
          f"{run_dir / 'logs'}", flush=True)
    supervisor.start()
    try:
        results["warmup"] = warm_up(supervisor, layout, args.warmup_updates, args.warmup_timeout, events)
        print(f"warm-up: {json.dumps(results['warmup'])}", flush=True)
        running = counts[0]
        for count in [] if results["warmup"]["failed"] else counts:  # a crashing learner: nothing to measure
            supervisor.add(actors[running:count])
            running = count
            wait(supervisor, args.settle, events)
            figures = {"actors": count, **measure(supervisor, layout, run_dir, args.seconds, events)}
            results["counts"].append(figures)
            print(f"{count:3d} actors: {figures['frames_per_second']:9.0f} frames/s, "
                  f"{figures['learner_updates_per_second']:6.2f} updates/s, lag {figures['policy_lag_mean']}, "
                  f"gpu {figures['gpu']}", flush=True)
    except SystemExit:  # the time limit's SIGTERM: stop the system and report what was measured
        results["interrupted"] = True
    finally:
        supervisor.stop(grace_seconds=20)
        supervisor.write_cluster_file()
    measured = results["counts"]
    results["speedup"] = (measured[-1]["frames_per_second"] / measured[0]["frames_per_second"]
                          if measured and measured[0]["frames_per_second"] > 0 else None)
    results["events"] = events[-50:]
    print(json.dumps(results))
    return 0 if measured and not results.get("interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
