"""Every Prometheus metric spiral exports, declared once.

Services import the metrics they update from here, so dashboards, alert rules and the tests
that check them against the code read one list. Names carry their unit (``_seconds``,
``_bytes``, ``_total`` for counters) as Prometheus recommends. Each process serves the default
registry over HTTP with :func:`serve_metrics` (which also answers ``/healthz`` for liveness
probes); a metric a process never touches is simply absent from its samples (labelled
metrics) or stays at zero.

Labels: ``member`` is the population member a learner, discriminator, replay buffer or actor
serves (``"0"`` outside PBT); ``actor`` identifies an actor process; ``method`` and ``code``
describe gRPC calls.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# -- gRPC, every service ----------------------------------------------------------------------
GRPC_HANDLING_SECONDS = Histogram(
    "spiral_grpc_server_handling_seconds", "Time to handle a gRPC call, by method.",
    ["service", "method", "code"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
GRPC_HANDLED_TOTAL = Counter(
    "spiral_grpc_server_handled_total", "gRPC calls handled, by method and status code.",
    ["service", "method", "code"])
REJECTED_MESSAGES_TOTAL = Counter(
    "spiral_rejected_messages_total", "Messages refused as malformed or stale, by reason.",
    ["service", "reason"])

# -- actor ------------------------------------------------------------------------------------
ACTOR_ENV_STEPS_TOTAL = Counter(
    "spiral_actor_env_steps_total", "Environment steps executed (one per canvas per action).",
    ["member", "actor"])
ACTOR_EPISODES_TOTAL = Counter(
    "spiral_actor_episodes_total", "Episodes finished.", ["member", "actor"])
ACTOR_POLICY_LAG = Gauge(
    "spiral_actor_policy_lag_versions", "Learner parameter version minus the version the actor acts with.",
    ["member", "actor"])
ACTOR_POLICY_VERSION = Gauge(
    "spiral_actor_policy_version", "Parameter version the actor acts with.", ["member", "actor"])
ACTOR_RENDER_SECONDS = Histogram(
    "spiral_actor_render_seconds", "Time to execute one batched environment step.",
    ["member"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
ACTOR_INFERENCE_SECONDS = Histogram(
    "spiral_actor_inference_seconds", "Time of one batched policy forward.",
    ["member"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
ACTOR_DROPPED_EPISODES_TOTAL = Counter(
    "spiral_actor_dropped_episodes_total",
    "Episodes an actor made and could not hand over: to the learner (unrolls) or the replay buffer (renders), "
    "by reason (stale: refused as too old; refused: any other refusal; unreachable: the peer stayed down or busy).",
    ["member", "actor", "to", "reason"])
ACTOR_RPC_RETRIES_TOTAL = Counter(
    "spiral_actor_rpc_retries_total", "Calls to a peer that failed and were retried.",
    ["member", "peer"])

# -- policy learner ---------------------------------------------------------------------------
LEARNER_UPDATES_TOTAL = Counter(
    "spiral_learner_updates_total", "Policy updates applied.", ["member"])
LEARNER_FRAMES_TOTAL = Counter(
    "spiral_learner_frames_total", "Environment steps consumed by updates.", ["member"])
LEARNER_TRAJECTORIES_TOTAL = Counter(
    "spiral_learner_trajectories_total", "Episodes received from actors and queued.", ["member"])
LEARNER_PRIOR_EPISODES_TOTAL = Counter(
    "spiral_learner_prior_episodes_total",
    "Episodes of prior programs received from actors for program recovery (learner.hindsight_weight).",
    ["member"])
LEARNER_UNACKNOWLEDGED_UNROLLS_TOTAL = Counter(
    "spiral_learner_unacknowledged_unrolls_total",
    "Unrolls queued from SubmitUnrolls streams that ended without a summary (the actor cancelled, or a "
    "later unroll of the stream was refused): trained on, though the actor never heard so.", ["member"])
LEARNER_ACTOR_RESTARTS_TOTAL = Counter(
    "spiral_learner_actor_restarts_total",
    "Actors seen with a new run id (a restarted actor process), by the unrolls they send.", ["member"])
LEARNER_QUEUE_DEPTH = Gauge(
    "spiral_learner_queue_depth_episodes", "Episodes waiting in the ingest queue.", ["member"])
LEARNER_PARAMETER_VERSION = Gauge(
    "spiral_learner_parameter_version", "Version of the published policy parameters.", ["member"])
LEARNER_LOSS = Gauge(
    "spiral_learner_loss", "Last update's loss terms.", ["member", "term"])
LEARNER_REWARD = Gauge(
    "spiral_learner_episode_reward", "Mean final reward of the last batch.", ["member"])
LEARNER_REWARD_OUT_OF_BAND = Counter(
    "spiral_learner_reward_out_of_band_total",
    "Updates whose mean episode return was outside learner.reward.band or not finite.", ["member"])
LEARNER_DISCRIMINATOR_VERSION = Gauge(
    "spiral_learner_discriminator_version", "Discriminator version that scored the last batch.", ["member"])
LEARNER_RECONSTRUCTION_L2 = Gauge(
    "spiral_learner_reconstruction_l2", "Mean squared error of final canvases to targets (conditional runs).",
    ["member"])
LEARNER_EVAL = Gauge(
    "spiral_learner_eval",
    "Newest held-out evaluation (learner.eval_every_updates), by measure: l2_sampled, l2_greedy, ratio_sampled, "
    "ratio_greedy, baseline_l2, digit_fid, placement shares, update (the update its weights were taken at).",
    ["member", "measure"])
LEARNER_EVAL_SKIPPED_TOTAL = Counter(
    "spiral_learner_eval_skipped_total",
    "Held-out evaluations skipped because the previous one was still running.", ["member"])
LEARNER_UPDATE_SECONDS = Histogram(
    "spiral_learner_update_seconds", "Time of one policy update.", ["member"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

# -- discriminator learner ------------------------------------------------------------------
DISCRIMINATOR_UPDATES_TOTAL = Counter(
    "spiral_discriminator_updates_total", "Discriminator updates applied.", ["member"])
DISCRIMINATOR_PARAMETER_VERSION = Gauge(
    "spiral_discriminator_parameter_version", "Version of the published discriminator parameters.", ["member"])
DISCRIMINATOR_WASSERSTEIN = Gauge(
    "spiral_discriminator_wasserstein_estimate", "Mean D(real) minus mean D(fake) of the last batch.", ["member"])
DISCRIMINATOR_SCORE = Gauge(
    "spiral_discriminator_score", "Mean discriminator score of the last batch, by kind (real or fake).",
    ["member", "kind"])
DISCRIMINATOR_LOSS = Gauge(
    "spiral_discriminator_loss", "Last update's loss terms.", ["member", "term"])

# -- the run's budget (learner.max_frames) ------------------------------------------------------
RUN_DONE = Gauge(
    "spiral_run_done",
    "1 once the member's policy learner reached learner.max_frames and stopped training, else 0 "
    "(exported by the learner, its discriminator and its actors; they keep running, idle).", ["member"])

# -- replay buffer ----------------------------------------------------------------------------
REPLAY_SIZE = Gauge("spiral_replay_size_items", "Renders held.", ["member"])
REPLAY_CAPACITY = Gauge("spiral_replay_capacity_items", "Renders the buffer can hold.", ["member"])
REPLAY_INSERTS_TOTAL = Counter("spiral_replay_inserts_total", "Renders inserted.", ["member"])
REPLAY_SAMPLES_TOTAL = Counter("spiral_replay_samples_total", "Renders sampled.", ["member"])

# -- population-based training ---------------------------------------------------------------
PBT_FITNESS = Gauge("spiral_pbt_fitness", "Last reported fitness of each member.", ["member"])
PBT_HYPERPARAMETER = Gauge("spiral_pbt_hyperparameter", "Current hyperparameters of each member.",
                           ["member", "name"])
PBT_EXPLOITS_TOTAL = Counter("spiral_pbt_exploits_total", "Exploit events (a member copied a donor).", ["member"])
PBT_FAILED_EXPLOITS_TOTAL = Counter("spiral_pbt_failed_exploits_total",
                                    "Exploits a member could not carry out (donor unreachable).", ["member"])
PBT_EXPLORES_TOTAL = Counter("spiral_pbt_explores_total", "Explore events (hyperparameters perturbed).", ["member"])
PBT_ACTORS = Gauge("spiral_pbt_actors", "Actors assigned to each member.", ["member"])


# -- artifacts sent off the cluster (run.artifact_uri) -----------------------------------------
ARTIFACT_UPLOADS_TOTAL = Counter(
    "spiral_artifact_uploads_total", "Files sent to run.artifact_uri, by result (ok, failed: retried later).",
    ["role", "member", "result"])
ARTIFACT_SKIPPED_TOTAL = Counter(
    "spiral_artifact_skipped_total",
    "Files not sent because the uploader fell behind: a checkpoint replaced by a newer one before it was sent, "
    "a file gone before its turn, or a mirrored file over run.artifact_queue (sent at a later sync).",
    ["role", "member"])
ARTIFACT_PENDING = Gauge(
    "spiral_artifact_pending_files", "Files waiting to be sent to run.artifact_uri (checkpoints included).",
    ["role", "member"])

def metric_names() -> set[str]:
    """Every sample name spiral's metrics can produce (``_total``, ``_bucket``, ... included)."""
    names: set[str] = set()
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - the public API has no listing
        for name in REGISTRY._collector_to_names[collector]:  # noqa: SLF001
            if name.startswith("spiral_"):
                names.add(name)
    return names


HealthCheck = Callable[[], tuple[bool, str]]
"""Returns ``(healthy, detail)``: what ``/healthz`` answers (200 or 503, with the detail as text)."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Scrapes and probes every few seconds would drown the service's own log."""


def metrics_app(health: HealthCheck | None = None) -> Callable[..., Iterable[bytes]]:
    """WSGI app: ``/healthz`` answers ``health()`` (always healthy without one); every other path
    is prometheus-client's exposition of the default registry."""
    exposition = make_wsgi_app()

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:  # type: ignore[type-arg]
        if environ.get("PATH_INFO") == "/healthz":
            healthy, detail = health() if health is not None else (True, "ok")
            start_response("200 OK" if healthy else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [detail.encode() + b"\n"]
        return exposition(environ, start_response)

    return app


def serve_metrics(port: int, address: str = "0.0.0.0", health: HealthCheck | None = None) -> WSGIServer:
    """Serve ``/metrics`` (the default registry) and ``/healthz`` on ``address:port`` from a daemon thread.

    Args:
        port: TCP port (0 picks a free one: read it from the returned server's ``server_port``).
        address: Interface to bind (IPv4 or IPv6).
        health: What ``/healthz`` reports (the actor's episode-loop watchdog); None: always healthy.
    """
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server = make_server(address, port, metrics_app(health), server_class, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
