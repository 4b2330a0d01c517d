"""``spiral pbt-controller``: the population-based-training controller as a service process.

Serves ``spiral.v1.PBTController`` on ``--listen`` (default ``127.0.0.1:50054``) for a
population of ``pbt.population_size`` members (the experiment is the one place that sets it;
``spiral up --population K`` writes K there). Member addresses come from ``--members FILE``
(JSON/YAML list of ``{member, learner_address, discriminator_address, replay_address}``) or,
in a Kubernetes pod without that flag, from the Kubernetes API
(:mod:`pbt_controller.discovery`).

State and logs live in ``RUN_DIR/pbt/``: ``state.json`` (reloaded on start, so a restarted
controller loses no member, hyperparameter or assignment), ``lineage.jsonl``,
``reports.jsonl`` and ``population.png`` (redrawn every ``--plot-seconds`` when there is news,
and at shutdown). Metrics: ``spiral_pbt_fitness``, ``spiral_pbt_hyperparameter``,
``spiral_pbt_exploits_total``, ``spiral_pbt_explores_total``, ``spiral_pbt_actors`` and the
gRPC call metrics on ``--metrics-port``. SIGTERM/SIGINT: NOT_SERVING, in-flight calls finish,
state saved, plot drawn, exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading

from pbt_controller.controller import Controller
from pbt_controller.discovery import make_discovery
from pbt_controller.service import PBTControllerServicer
from pbt_controller.state import StateStore
from spiral.rpc.contract import declare_process_contract
from spiral.rpc.server import BindError, build_server
from spiral.runtime.service_artifacts import start_service_artifacts
from spiral.runtime.service_runtime import start_process
from spiral.runtime.service_options import add_service_arguments, resolve_service_options

log = logging.getLogger(__name__)


def register(parser: argparse.ArgumentParser) -> None:
    add_service_arguments(parser)
    parser.add_argument("--members", default=os.environ.get("SPIRAL_PBT_MEMBERS") or None,
                        help="JSON/YAML list of {member, learner_address, discriminator_address, replay_address}; "
                             "without it, members are discovered from Kubernetes when in a cluster "
                             "[SPIRAL_PBT_MEMBERS]")
    parser.add_argument("--actor-timeout", type=float, default=None,
                        help="seconds after which an actor that has not called AssignActor is forgotten "
                             "(default: the experiment's pbt.actor_timeout_seconds, 4 actor heartbeats)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the PBT decisions (default: experiment seed)")
    parser.add_argument("--initial-hyperparameters", default=None, metavar="JSON",
                        help='starting hyperparameters of chosen members instead of sampled ones, '
                             'e.g. \'{"1": {"learning_rate": 1e-9}}\'')
    parser.add_argument("--plot-seconds", type=float, default=60.0,
                        help="redraw population.png at most this often (default 60; 0 only at shutdown)")


def run(args: argparse.Namespace) -> int:
    opts = resolve_service_options("pbt-controller", args)
    cfg = opts.config
    declare_process_contract(cfg)  # peers of another experiment are refused, and refuse this one
    start_process(opts, member_in_log=False)
    population = cfg.pbt.population_size  # the experiment is the one place that sets it
    artifacts = start_service_artifacts(opts)  # restores an empty pbt/ from run.artifact_uri
    try:
        discovery = make_discovery(args.members, population, shared=cfg.pbt.shared_discriminator)
        initial = {int(k): {n: float(v) for n, v in hp.items()}
                   for k, hp in json.loads(args.initial_hyperparameters or "{}").items()}
        actor_timeout = cfg.pbt.actor_timeout_seconds if args.actor_timeout is None else args.actor_timeout
        controller = Controller(cfg.pbt, population, StateStore(opts.run_dir / "pbt"), discovery,
                                actor_timeout=actor_timeout, seed=cfg.seed if args.seed is None else args.seed,
                                initial_hyperparameters=initial)
        server = build_server([PBTControllerServicer(controller).binding()], opts.listen, cfg.services)
    except (ValueError, BindError, json.JSONDecodeError, AttributeError) as exc:
        log.error("%s", exc)
        if artifacts is not None:
            artifacts.close(0)
        return 1
    server.start()
    log.info("PBT controller serving on %s: %d members (%s), state in %s", server.address, population,
             "restored" if controller.restored else "new", controller.store.directory)
    if cfg.pbt.shared_discriminator and population > 1:
        log.info("population discriminator: the members share one discriminator and replay buffer; exploits "
                 "copy the policy only")

    stop = threading.Event()

    def plotter() -> None:
        drawn = -1
        while not stop.wait(args.plot_seconds):
            size = controller.store.reports_path.stat().st_size if controller.store.reports_path.exists() else 0
            if size != drawn:
                try:
                    controller.write_plot()
                    drawn = size
                except Exception:  # noqa: BLE001 - a plot must never stop the controller
                    log.exception("drawing %s failed", controller.store.plot_path)

    thread = threading.Thread(target=plotter, name="pbt-plot", daemon=True)
    if args.plot_seconds > 0:
        thread.start()

    def stopped() -> None:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=30)
        controller.save()
        try:
            controller.write_plot()
        except Exception:  # noqa: BLE001
            log.exception("drawing %s failed", controller.store.plot_path)

    server.serve_until_signal(grace=cfg.services.shutdown_grace_seconds, on_stopping=stop.set, on_stopped=stopped)
    if artifacts is not None:  # the final state, lineage and plot, within run.artifact_flush_seconds
        artifacts.close(cfg.run.artifact_flush_seconds)
    log.info("PBT controller stopped (state saved in %s)", controller.store.state_path)
    return 0
