"""``spiral up``: the whole system on one machine, every service its own process on loopback.

``spiral up`` is what ``make run`` runs. It starts the replay buffer, the discriminator
learner, the policy learner and N actors (N defaults to half the machine's cores; with
``--population K``, K such members plus the PBT controller) as separate ``spiral ROLE``
processes bound to 127.0.0.1 on free ports, exactly as they run in Kubernetes, and supervises
them:

* everything a run produces lands under ``runs/NAME/``: the resolved ``config.yaml`` and
  ``overrides.yaml`` (the experiment file, its bases and the ``--set`` items that made it;
  :mod:`spiral.runtime.run_config`), one log
  per process in ``logs/``, checkpoints, sample grids and TensorBoard event files
  (``tensorboard/``, printed as a ``tensorboard --logdir`` line at start) written by the services, and
  ``cluster.json`` listing each process (role, member, pid, gRPC address, metrics URL, log) so
  other tools (tests, Prometheus, dashboards) can find the services;
* a live one-line status, scraped from the services' own Prometheus endpoints: environment
  steps/s, learner updates/s, discriminator updates/s, policy lag, replay fill, reward and,
  in conditional runs, the reconstruction error;
* a process that dies unexpectedly is restarted with exponential backoff (a restarted learner
  resumes from its checkpoint and the actors reconnect);
* Ctrl-C, SIGTERM or ``--duration SECONDS`` stop every process cleanly: actors first, then
  the learners and the replay buffer, each with SIGTERM and a grace period before SIGKILL;
* with a budget (``--frames N``, the same as ``--set learner.max_frames=N``) the run ends by
  itself: once every member's learner and discriminator say they are done, ``spiral up`` stops
  every process the same way and exits 0.

Any setting of the experiment can be changed for one run with ``--set FIELD=VALUE`` (repeatable;
the value is YAML: ``--set learner.reward.band=[-5,5] --set env.conditional=false``), and
``--seed N`` is ``--set seed=N``. A run directory that already holds a run is resumed only with
the same experiment: started with other settings it is refused, naming the fields that differ.

``--device cuda`` (or ``SPIRAL_DEVICE=cuda``) puts both learners of every member on the GPU; the
actors act on the CPU whatever it says. A GPU that this machine lacks is refused before any
process starts.

With ``--shared-discriminator`` (or ``pbt.shared_discriminator``) a population runs SPIRAL++'s
population discriminator: one replay buffer and one discriminator, member 0's, serve every
member. Every member's learner scores with that discriminator and every member's actors insert
into that replay buffer; members 1..K-1 run only a learner and actors.

This module is the command itself (its flags, and the loop that prints events and the status
line until it is told to stop); its parts live beside it: :mod:`spiral.commands.layout` (which
process runs where, on which ports), :mod:`spiral.commands.supervisor` (start, restart with
back-off, stop, ``cluster.json``) and :mod:`spiral.commands.status` (the status line).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from spiral.commands.layout import plan_layout
from spiral.commands.overrides import add_budget_argument, add_override_arguments, override_items
from spiral.commands.status import all_done, format_status, take_snapshot
from spiral.commands.supervisor import Supervisor
from spiral.config import ConfigError, experiment_path, resolve_experiment
from spiral.runtime.run_config import RunConfigMismatch, record_run_config
from spiral.runtime.service_options import add_device_argument, device_problem


def default_actors(cores: int | None = None) -> int:
    """Actor processes per member when ``--actors`` is not given: half the cores this process may
    use, at least 1.

    The other half is left to the learner and the critic, which on a CPU machine bound how fast
    the system learns: on 2 cores one actor fed the learner 14-26% more updates in 20 minutes
    than two did (bench/RESULTS.md), and the runs that met the critic-reward goal used one.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="experiment YAML or name under experiments/ (default: tiny)")
    add_override_arguments(parser)
    parser.add_argument("--name", help="run name (default: the experiment's name); output goes to RUNS_DIR/NAME")
    parser.add_argument("--runs-dir", default="runs", help="parent directory of runs (default: runs)")
    parser.add_argument("--actors", type=int, default=None,
                        help="actor processes per member (default: half this machine's cores, at least 1)")
    parser.add_argument("--population", type=int, default=None,
                        help="population members (default: the config's pbt.population_size)")
    parser.add_argument("--shared-discriminator", action=argparse.BooleanOptionalAction, default=None,
                        help="population: one discriminator and replay buffer (member 0's) serve every member "
                             "(default: the config's pbt.shared_discriminator)")
    add_device_argument(parser, "policy and discriminator learners (actors act on the CPU)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    add_budget_argument(parser)
    parser.add_argument("--status-every", type=float, default=2.0, help="seconds between status lines")
    parser.add_argument("--no-restart", action="store_true", help="do not restart processes that exit")


def run(args: argparse.Namespace) -> int:
    config_path = experiment_path(args.config)
    if not config_path.exists():
        print(f"spiral up: config {config_path} does not exist", file=sys.stderr)
        return 2
    if args.population is not None and args.population < 1:
        print(f"spiral up: --population must be >= 1, got {args.population}", file=sys.stderr)
        return 2
    actors = default_actors() if args.actors is None else args.actors
    if actors < 1:
        print("spiral up: --actors must be >= 1", file=sys.stderr)
        return 2
    device, problem = device_problem(args)
    if problem:
        print(f"spiral up: {problem}", file=sys.stderr)
        return 2
    try:
        experiment = resolve_experiment(config_path, override_items(args))
        cfg = experiment.config
        run_dir = Path(args.runs_dir) / (args.name or cfg.name)
        resolved = record_run_config(run_dir, experiment)
    except (ConfigError, RunConfigMismatch) as exc:
        print(f"spiral up: {exc}", file=sys.stderr)
        return 2
    population = cfg.pbt.population_size

    layout = plan_layout(cfg, resolved.resolve(), run_dir.resolve(), actors, population, device=device)
    supervisor = Supervisor(layout, run_dir, restart=not args.no_restart)
    stopping = {"flag": False}

    def request_stop(signum: int, _frame: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print(f"spiral up: {len(layout.processes)} processes ({actors} actor{'s' if actors > 1 else ''} per member, "
          f"learners on {device}), run directory {run_dir} "
          f"(cluster.json, logs/); Ctrl-C stops", flush=True)
    board_dir = run_dir / "tensorboard" if population == 1 else run_dir  # members: member-N/tensorboard/
    print(f"spiral up: tensorboard --logdir {board_dir}", flush=True)
    supervisor.start()
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    prev = take_snapshot(layout)
    next_status = started + args.status_every
    try:
        while not stopping["flag"]:
            if args.duration and time.monotonic() - started >= args.duration:
                break
            for event in supervisor.poll():
                print(("\n" if interactive else "") + f"spiral up: {event}", flush=True)
            if time.monotonic() >= next_status:
                cur = take_snapshot(layout)
                line = format_status(prev, cur, time.monotonic() - started)
                print(("\r" + line.ljust(150)) if interactive else line, end="" if interactive else "\n", flush=True)
                prev, next_status = cur, time.monotonic() + args.status_every
                if all_done(cur):
                    print(("\n" if interactive else "") + f"spiral up: done: every member reached "
                          f"learner.max_frames {cfg.learner.max_frames}", flush=True)
                    break
            time.sleep(0.2)
    finally:
        print(("\n" if interactive else "") + "spiral up: stopping", flush=True)
        supervisor.stop()
        supervisor.write_cluster_file()
    print(f"spiral up: stopped; outputs in {run_dir}", flush=True)
    return 0
