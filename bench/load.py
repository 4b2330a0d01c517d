"""Load test: many concurrent actor clients at one real learner and one real replay buffer.

Starts a policy learner, a replay buffer and the discriminator learner that scores for it as
real processes (``spiral learner``, ``spiral replaybuffer``, ``spiral discriminator``: the tiny
experiment made to turn over quickly, a temporary run directory, started by the supervisor
``spiral up`` uses), records a few real unrolls by running
an :class:`~spiral.agent.acting.EpisodeRunner` against the learner's parameters, and then
replays them from ``--clients`` client threads, each at ``--rate`` iterations per second. An
iteration is what an actor does: ``GetParameters`` (newer than the version held),
``SubmitUnrolls`` (one recorded unroll stamped with that version) and the replay buffer's
``Insert`` (its final renders and targets), which the discriminator samples and trains on.

Every call has a deadline; RESOURCE_EXHAUSTED (the learner's ingest queue stayed full:
back-pressure) and the other transient codes are retried with the project's backoff
(:func:`spiral.rpc.client.call_with_retry`); a FAILED_PRECONDITION (a stale policy version) makes
the client refetch parameters and resubmit, after a backoff. Each client counts every attempt by
method and status code, and the run compares that with what the servers counted
(``spiral_grpc_server_handled_total``, ``spiral_learner_trajectories_total``,
``spiral_learner_unacknowledged_unrolls_total``, ``spiral_replay_inserts_total``,
``spiral_rejected_messages_total``, ``spiral_learner_actor_restarts_total``), scenario by scenario:

* ``steady``: the loop above;
* ``disconnect``: every other iteration opens a ``SubmitUnrolls`` stream, sends two unrolls,
  cancels it mid-stream and reconnects (new channels). Such a stream ends CANCELLED at the
  server (what it queued before the cancel stays queued and is counted in
  ``spiral_learner_unacknowledged_unrolls_total``), or RESOURCE_EXHAUSTED / FAILED_PRECONDITION
  when a refusal raced the cancel, or OK when gRPC Python delivered the cancel as the end of the
  stream (a summary nobody reads: the server's OK count exceeds the clients' by these), or the
  server never saw it. So the learner's episodes are B x (unrolls of the clients' OK calls +
  unacknowledged unrolls + unrolls of the streams answered OK after a cancel), the last term
  between 0 and 2 per such stream; in every other scenario both sides agree exactly;
* ``stale``: each iteration first submits with a policy version more than
  ``learner.max_policy_lag`` behind (FAILED_PRECONDITION, ``stale_version``), then refetches and
  resubmits;
* ``restart``: after every iteration the client comes back as a new incarnation (new run id,
  new channels); the learner counts each in ``spiral_learner_actor_restarts_total``.

It also polls the servers' gRPC health every second (all must be SERVING) and samples their
resident memory (``/proc/PID/status`` VmRSS) every 2 s for the whole run. Warm-up lasts until
the replay table is full, the learner is past ``max_policy_lag`` versions and
:data:`WARM_UPDATES` updates, and no server's peak RSS of the last minute is 2% above the
minute before's (the allocator warm: its high-water mark has stopped rising). The memory check
compares each server's peak in the first scenario after warm-up with its peak in the last
(growth at most +10%): a single reading is noise, since the learner's RSS swings by 5-10% with
the work in flight. The report keeps the RSS timeline (one sample per 10 s). Latencies are of
each attempt (p50/p99, ms), every code included and OK only. The checks that fail are listed; the exit status is 1 when any does. The achieved rate of
iterations is printed beside the set one: back-pressure, not the clients, holds it down.

Usage::

    python -m bench.load --quick [--out load.json]          # 8 clients x 10 s per scenario
    python -m bench.load --clients 64 --minutes 5 [--out load.json] [--scenarios steady stale]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from spiral.agent.acting import EpisodeRunner
from spiral.commands.layout import plan_layout
from spiral.commands.supervisor import Supervisor
from spiral.config import ExperimentConfig, dump_experiment, experiment_path, load_experiment
from spiral.data import for_experiment
from spiral.envs import action_spec_for, make_env
from spiral.nets import build_policy
from spiral.rpc.client import RetryDeadlineExceeded, RetryPolicy, RetryStopped, call_with_retry, make_channel
from spiral.rpc.contract import experiment_contract
from spiral.rpc.messages import encode_insert_request, encode_unroll
from spiral.rpc.parameters import fetch_parameters
from spiral.v1 import learner_pb2, learner_pb2_grpc, replay_pb2, replay_pb2_grpc

T = TypeVar("T")

SCENARIOS = ("steady", "disconnect", "stale", "restart")
LEARNER_SERVICE = "spiral.v1.PolicyLearner"
REPLAY_SERVICE = "spiral.v1.ReplayBuffer"
METHODS = {"GetParameters": LEARNER_SERVICE, "SubmitUnrolls": LEARNER_SERVICE, "Insert": REPLAY_SERVICE}
"""The methods an actor calls, and the service of each."""

LOAD_OVERRIDES: dict[str, dict[str, Any]] = {
    # Eager, small batches: the learner turns over on 2 cores beside the clients. A one-second
    # queue wait makes back-pressure show within a call's deadline; a lag of 2 versions lets the
    # stale scenario refuse unrolls soon after the start.
    "learner": {"batch_size": 8, "compile": False, "queue_capacity": 32, "queue_wait_seconds": 1.0,
                "max_policy_lag": 2, "checkpoint_every_updates": 1000, "sample_grid_every_updates": 1000},
    "replay": {"capacity": 64, "min_size": 8},
    "actor": {"num_envs": 4},
}
"""Overrides of the tiny experiment for the load test."""

CALL_DEADLINE_SECONDS = 20.0
"""Deadline of every attempt: far above the learner's queue wait, so a DEADLINE_EXCEEDED is a hang."""
RETRY = RetryPolicy(initial_backoff=0.05, max_backoff=1.0, call_timeout=CALL_DEADLINE_SECONDS)
RETRY_DEADLINE_SECONDS = 60.0
"""How long one call is retried (RESOURCE_EXHAUSTED and other transient codes) before it is given up."""
MAX_RESUBMITS = 3
"""Resubmissions after a FAILED_PRECONDITION (refetching parameters first)."""
RECORDED_UNROLLS = 4
STREAM_UNROLLS_BEFORE_CANCEL = 2
CANCEL_AFTER_SECONDS = 0.3
RESTART_EVERY = 1
WARM_UPDATES = 10
"""Learner updates before the memory is read as warm (its allocator has seen a few batches)."""
MAX_RSS_GROWTH = 0.10
PLATEAU_WINDOW_SECONDS = 60.0
PLATEAU_TOLERANCE = 0.02
"""The allocator is warm once no server's peak RSS of the last PLATEAU_WINDOW_SECONDS is more than
2% above its peak of the window before: under 64 clients the learner's RSS swings by ~30 MB
(~5%) with what is in flight, and its high-water mark rose for ~3 minutes (full-2026-12-07)."""


# -- what a client counts ------------------------------------------------------------------------

@dataclass
class Tally:
    """What one client (or all of them, :meth:`merge`) saw."""

    codes: collections.Counter = field(default_factory=collections.Counter)
    """``(method, code name)`` -> attempts."""
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    ok_latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    accepted_unrolls: int = 0
    """Unrolls the learner's summaries of OK calls said it queued."""
    inserted_items: int = 0
    """Renders the replay buffer's summaries of OK calls said it inserted."""
    cancelled_stream_unrolls: int = 0
    """Unrolls handed to gRPC on streams that were cancelled or refused before their summary."""
    restarts: int = 0
    """New run ids whose first unroll reached the learner."""
    iterations: int = 0
    gave_up: collections.Counter = field(default_factory=collections.Counter)
    """method -> calls whose retries ran past :data:`RETRY_DEADLINE_SECONDS`."""

    def merge(self, other: "Tally") -> None:
        self.codes.update(other.codes)
        for method, values in other.latencies.items():
            self.latencies[method].extend(values)
        for method, values in other.ok_latencies.items():
            self.ok_latencies[method].extend(values)
        self.accepted_unrolls += other.accepted_unrolls
        self.inserted_items += other.inserted_items
        self.cancelled_stream_unrolls += other.cancelled_stream_unrolls
        self.restarts += other.restarts
        self.iterations += other.iterations
        self.gave_up.update(other.gave_up)


@dataclass
class Recording:
    """Real unrolls and their renders, encoded once, replayed by every client."""

    unrolls: list[learner_pb2.Unroll]
    inserts: list[replay_pb2.InsertRequest]
    episodes_per_unroll: int


class LoadClient:
    """One simulated actor: its channels, its identity and what it counted."""

    def __init__(self, index: int, phase: str, scenario: str, cfg: ExperimentConfig, learner_address: str, replay_address: str,
                 recording: Recording, rate: float, stop: threading.Event) -> None:
        self.index = index
        self.scenario = scenario
        self.cfg = cfg
        self.addresses = (learner_address, replay_address)
        self.rate = rate
        self.stop = stop
        self.actor_id = f"load-{phase}-{index}"  # a phase's actors are new to the learner
        self.run_id = uuid.uuid4().hex[:12]
        self.tally = Tally()
        self.rng = random.Random(index)
        self.contract = experiment_contract(cfg)
        self.unrolls = [self._own(msg) for msg in recording.unrolls]
        self.inserts = [self._own(msg) for msg in recording.inserts]
        self.version = -1
        self.restart_pending = False
        self.channels: list[grpc.Channel] = []
        self.connect()

    @staticmethod
    def _own(message: T) -> T:
        copy = type(message)()  # type: ignore[operator]
        copy.CopyFrom(message)  # type: ignore[attr-defined]
        return copy

    def connect(self) -> None:
        """(Re)open both channels, as a (re)started actor does."""
        self.close()
        learner = make_channel(self.addresses[0], self.cfg.services, contract=self.contract)
        replay = make_channel(self.addresses[1], self.cfg.services, contract=self.contract)
        self.channels = [learner, replay]
        self.learner = learner_pb2_grpc.PolicyLearnerStub(learner)
        self.replay = replay_pb2_grpc.ReplayBufferStub(replay)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.channels = []

    # -- counting calls --------------------------------------------------------------------

    def _attempt(self, method: str, call: Callable[[float], T], timeout: float) -> T:
        start = time.perf_counter()
        try:
            result = call(timeout)
        except grpc.RpcError as error:
            self._count(method, error.code().name, time.perf_counter() - start)
            raise
        self._count(method, "OK", time.perf_counter() - start)
        return result

    def _count(self, method: str, code: str, seconds: float) -> None:
        self.tally.codes[(method, code)] += 1
        self.tally.latencies[method].append(seconds)
        if code == "OK":
            self.tally.ok_latencies[method].append(seconds)
        if method == "SubmitUnrolls" and self.restart_pending and code in ("OK", "RESOURCE_EXHAUSTED",
                                                                           "FAILED_PRECONDITION"):
            self.tally.restarts += 1  # the learner saw the new run id (it observes it before queueing)
            self.restart_pending = False

    def _call(self, method: str, call: Callable[[float], T]) -> T | None:
        """``call`` with retries; None when given up or stopped. Raises non-transient RpcErrors."""
        try:
            return call_with_retry(lambda timeout: self._attempt(method, call, timeout), policy=RETRY,
                                   deadline_seconds=RETRY_DEADLINE_SECONDS, stop=self.stop,
                                   description=f"{method} from {self.actor_id}", rng=self.rng)
        except RetryDeadlineExceeded:
            self.tally.gave_up[method] += 1
        except RetryStopped:
            pass
        return None

    # -- what an actor does ----------------------------------------------------------------

    def fetch(self, force: bool = False) -> None:
        have = -1 if force else self.version
        snapshot = self._call("GetParameters", lambda timeout: fetch_parameters(self.learner, have, timeout=timeout))
        if snapshot is not None:
            self.version = snapshot.version

    def unroll_message(self, version: int) -> learner_pb2.Unroll:
        message = self.unrolls[self.tally.iterations % len(self.unrolls)]
        message.actor_id, message.run_id, message.policy_version = self.actor_id, self.run_id, version
        return message

    def submit(self, version: int) -> None:
        """Submit one unroll; a stale refusal makes it refetch (after a backoff) and resubmit."""
        for resubmit in range(MAX_RESUBMITS + 1):
            message = self.unroll_message(version)
            try:
                summary = self._call("SubmitUnrolls",
                                     lambda timeout: self.learner.SubmitUnrolls(iter((message,)), timeout=timeout))
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION or resubmit == MAX_RESUBMITS:
                    return
                if self.stop.wait(self.rng.uniform(0.0, RETRY.backoff_bound(resubmit + 1))):
                    return
                self.fetch(force=True)
                version = self.version
                continue
            if summary is not None:
                self.tally.accepted_unrolls += int(summary.accepted)
            return

    def cancelled_submit(self) -> None:
        """Open a stream, send unrolls, cancel it before it ends, and reconnect."""
        release = threading.Event()
        handed = [0]

        def requests():  # noqa: ANN202 - a generator of Unroll messages
            for _ in range(STREAM_UNROLLS_BEFORE_CANCEL):
                handed[0] += 1
                message = learner_pb2.Unroll()
                message.CopyFrom(self.unroll_message(self.version))
                yield message
            release.wait(CALL_DEADLINE_SECONDS)

        future = self.learner.SubmitUnrolls.future(requests(), timeout=CALL_DEADLINE_SECONDS)
        time.sleep(CANCEL_AFTER_SECONDS)
        cancelled = future.cancel()
        release.set()
        if cancelled:
            code = "CANCELLED"
        else:
            code = future.code().name
            if code == "OK":
                self.tally.accepted_unrolls += int(future.result().accepted)
        self.tally.codes[("SubmitUnrolls", code)] += 1
        if code != "OK":
            self.tally.cancelled_stream_unrolls += handed[0]
        self.connect()

    def insert(self) -> None:
        message = self.inserts[self.tally.iterations % len(self.inserts)]
        message.actor_id, message.policy_version = self.actor_id, max(self.version, 0)
        summary = self._call("Insert", lambda timeout: self.replay.Insert(iter((message,)), timeout=timeout))
        if summary is not None:
            self.tally.inserted_items += int(summary.inserted)

    def iteration(self) -> None:
        self.fetch()
        if self.version < 0:
            return
        n = self.tally.iterations
        if self.scenario == "disconnect" and n % 2 == 1:
            self.cancelled_submit()
        elif self.scenario == "stale":
            lag = self.cfg.learner.max_policy_lag
            # Older than the learner allows; before it got that far, a version it never had.
            self.submit(self.version - lag - 1 if self.version > lag else self.version + 1000)
        else:
            self.submit(self.version)
        self.insert()
        if self.scenario == "restart" and (n + 1) % RESTART_EVERY == 0:
            self.run_id = uuid.uuid4().hex[:12]
            self.restart_pending = True
            self.connect()

    def run(self) -> None:
        """Iterate at :attr:`rate` (no catching up after a slow one) until stopped."""
        period = 1.0 / self.rate
        next_start = time.monotonic() + self.rng.uniform(0.0, period)
        try:
            while not self.stop.wait(max(0.0, next_start - time.monotonic())):
                self.iteration()
                self.tally.iterations += 1
                next_start = max(next_start + period, time.monotonic())
        finally:
            self.close()


# -- the servers' side -------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_samples(url: str) -> Samples:
    """Every sample of a Prometheus endpoint, keyed by name and sorted labels."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URL we built
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def metric_delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """Growth of ``name`` summed over samples whose labels include ``labels``."""
    def total(samples: Samples) -> float:
        return sum(value for (sample, sample_labels), value in samples.items()
                   if sample == name and labels.items() <= dict(sample_labels).items())
    return total(after) - total(before)


def server_codes(before: Samples, after: Samples, service: str, method: str) -> dict[str, int]:
    """Calls the server handled between two scrapes, by status code."""
    codes: dict[str, int] = {}
    for (name, labels), value in after.items():
        label = dict(labels)
        if name == "spiral_grpc_server_handled_total" and label["service"] == service and label["method"] == method:
            grown = int(round(value - before.get((name, labels), 0.0)))
            if grown:
                codes[label["code"]] = grown
    return codes


def health_of(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class HealthWatch:
    """Polls each server's gRPC health every second into the counter of the current phase."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses
        self.current: dict[str, collections.Counter] = {name: collections.Counter() for name in addresses}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self._thread.start()

    def phase(self) -> dict[str, collections.Counter]:
        """Start counting a new phase; returns its counters."""
        self.current = {name: collections.Counter() for name in self.addresses}
        return self.current

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            current = self.current
            for name, address in self.addresses.items():
                current[name][health_of(address)] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class RssWatch:
    """Samples each server's resident memory every ``period`` seconds for the whole run."""

    def __init__(self, pids: dict[str, int], period: float = 2.0) -> None:
        self.pids = pids
        self.period = period
        self.started = time.monotonic()
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                sample = {name: rss_bytes(pid) for name, pid in self.pids.items()}
            except (OSError, RuntimeError):  # a server is stopping
                return
            with self._lock:
                self.samples.append((self.now(), sample))
            if self._stop.wait(self.period):
                return

    def peaks(self, start: float, end: float) -> dict[str, int]:
        """Each server's largest RSS sampled in ``[start, end)`` seconds since the watch started."""
        with self._lock:
            window = [sample for t, sample in self.samples if start <= t < end]
        return {name: max(sample[name] for sample in window) for name in self.pids} if window else {}

    def now(self) -> float:
        """Seconds since the watch started."""
        return time.monotonic() - self.started

    def plateaued(self, window: float = PLATEAU_WINDOW_SECONDS, tolerance: float = PLATEAU_TOLERANCE) -> bool:
        """Whether every server's peak of the last ``window`` seconds is within ``tolerance`` of the window before's."""
        now = self.now()
        if now < 2 * window:
            return False
        earlier, recent = self.peaks(now - 2 * window, now - window), self.peaks(now - window, now + 1)
        return bool(earlier and recent) and all(recent[name] <= (1 + tolerance) * earlier[name] for name in earlier)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- one phase: clients, then the comparison -------------------------------------------------------

def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "n": 0}
    array = np.asarray(values) * 1e3
    return {"p50_ms": round(float(np.percentile(array, 50)), 2), "p99_ms": round(float(np.percentile(array, 99)), 2),
            "n": len(values)}


def compare(scenario: str, tally: Tally, before: dict[str, Samples], after: dict[str, Samples],
            episodes_per_unroll: int) -> tuple[dict[str, Any], list[str]]:
    """The clients' counts next to the servers', and the checks that failed."""
    failures: list[str] = []
    learner_before, learner_after = before["learner"], after["learner"]
    methods: dict[str, Any] = {}
    finished_streams = 0
    for method, service in METHODS.items():
        side = "learner" if service == LEARNER_SERVICE else "replaybuffer"
        server = server_codes(before[side], after[side], service, method)
        client = {code: n for (m, code), n in sorted(tally.codes.items()) if m == method}
        methods[method] = {"client": client, "server": server, "latency": percentiles(tally.latencies[method]),
                           "ok_latency": percentiles(tally.ok_latencies[method])}
        for code in ("DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "INTERNAL"):
            if client.get(code) or server.get(code):
                failures.append(f"{scenario}: {method} answered {code} (client {client.get(code, 0)}, "
                                f"server {server.get(code, 0)}): a hang or a failure, not a deliberate refusal")
        if tally.gave_up[method]:
            failures.append(f"{scenario}: {tally.gave_up[method]} {method} calls retried past "
                            f"{RETRY_DEADLINE_SECONDS:.0f} s and given up")
        if scenario == "disconnect" and method == "SubmitUnrolls":
            # A cancelled stream ends CANCELLED at the server, or with a refusal that raced the
            # cancel, or OK when gRPC Python delivered the cancel as the end of the stream, or
            # never reaches a handler.
            raced = sum(server.get(c, 0) - client.get(c, 0) for c in ("RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"))
            finished_streams = server.get("OK", 0) - client.get("OK", 0)
            if finished_streams < 0:
                failures.append(f"{scenario}: {method} OK: client {client.get('OK', 0)}, server {server.get('OK', 0)}")
            for code in ("RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"):
                if server.get(code, 0) < client.get(code, 0):
                    failures.append(f"{scenario}: {method} {code}: client saw {client.get(code, 0)}, server "
                                    f"counted only {server.get(code, 0)}")
            if finished_streams + raced + server.get("CANCELLED", 0) > client.get("CANCELLED", 0) or raced < 0:
                failures.append(f"{scenario}: {method}: {client.get('CANCELLED', 0)} cancelled by clients, server "
                                f"counted {server.get('CANCELLED', 0)} cancelled, {raced} raced refusals and "
                                f"{finished_streams} more OK")
            unexpected = set(server) - {"OK", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "CANCELLED"}
            if unexpected:
                failures.append(f"{scenario}: {method}: unexpected server codes {sorted(unexpected)}")
        elif server != client:
            failures.append(f"{scenario}: {method} by code: client {client}, server {server}")

    unacknowledged = int(metric_delta(learner_before, learner_after, "spiral_learner_unacknowledged_unrolls_total"))
    episodes = int(metric_delta(learner_before, learner_after, "spiral_learner_trajectories_total"))
    expected_episodes = episodes_per_unroll * (tally.accepted_unrolls + unacknowledged)
    # Unrolls of cancelled streams the server answered OK (none outside the disconnect scenario).
    finished_unrolls, remainder = divmod(episodes - expected_episodes, episodes_per_unroll)
    if remainder or not 0 <= finished_unrolls <= STREAM_UNROLLS_BEFORE_CANCEL * finished_streams:
        failures.append(f"{scenario}: the learner queued {episodes} episodes; the clients' accepted unrolls "
                        f"({tally.accepted_unrolls}) and the unacknowledged ones ({unacknowledged}) make "
                        f"{expected_episodes}, and {finished_streams} cancelled streams were answered OK")
    if not 0 <= unacknowledged + finished_unrolls <= tally.cancelled_stream_unrolls:
        failures.append(f"{scenario}: {unacknowledged + finished_unrolls} unrolls queued without a summary read, "
                        f"but clients sent only {tally.cancelled_stream_unrolls} on streams without one")
    inserted = int(metric_delta(before["replaybuffer"], after["replaybuffer"], "spiral_replay_inserts_total"))
    if inserted != tally.inserted_items:
        failures.append(f"{scenario}: the replay buffer inserted {inserted} renders, the clients' summaries "
                        f"say {tally.inserted_items}")
    stale = int(metric_delta(learner_before, learner_after, "spiral_rejected_messages_total",
                             service=LEARNER_SERVICE, reason="stale_version"))
    refused = methods["SubmitUnrolls"]["server"].get("FAILED_PRECONDITION", 0)
    if stale != refused:
        failures.append(f"{scenario}: {refused} SubmitUnrolls refused FAILED_PRECONDITION, "
                        f"{stale} counted as stale_version")
    if scenario == "stale" and not stale:
        failures.append("stale: no unroll was refused as stale")
    restarts = int(metric_delta(learner_before, learner_after, "spiral_learner_actor_restarts_total"))
    if restarts != tally.restarts:
        failures.append(f"{scenario}: the learner saw {restarts} actor restarts, the clients made {tally.restarts}")
    if scenario == "restart" and not restarts:
        failures.append("restart: no actor restart was seen")
    counts = {"learner_episodes": episodes, "accepted_unrolls": tally.accepted_unrolls,
              "unacknowledged_unrolls": unacknowledged, "cancelled_stream_unrolls_sent": tally.cancelled_stream_unrolls,
              "cancelled_streams_answered_ok": finished_streams, "their_unrolls": finished_unrolls,
              "replay_inserted": inserted, "stale_refusals": stale, "actor_restarts": restarts,
              "client_restarts": tally.restarts}
    return {"methods": methods, "counts": counts}, failures


@dataclass
class Servers:
    """The two service processes under load."""

    supervisor: Supervisor
    addresses: dict[str, str]
    metrics_urls: dict[str, str]
    pids: dict[str, int]

    def scrape(self) -> dict[str, Samples]:
        return {name: scrape_samples(url) for name, url in self.metrics_urls.items()}

    def settled_scrape(self, timeout: float = 10.0) -> dict[str, Samples]:
        """A scrape once two in a row half a second apart agree (handlers of cancelled calls finish late)."""
        previous = self.scrape()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)
            current = self.scrape()
            if current_counts(current) == current_counts(previous):
                return current
            previous = current
        return previous

    def check_running(self) -> None:
        for child in self.supervisor.children:
            if child.popen is None or child.popen.poll() is not None:
                log = child.spec.log_path.read_text(errors="replace")[-3000:] if child.spec.log_path.exists() else ""
                raise RuntimeError(f"{child.spec.name} is not running\n{log}")


COMPARED_COUNTERS = ("spiral_learner_trajectories_total", "spiral_learner_unacknowledged_unrolls_total",
                     "spiral_replay_inserts_total", "spiral_rejected_messages_total",
                     "spiral_learner_actor_restarts_total")
"""The counters :func:`compare` reads, besides the calls of :data:`METHODS`."""


def current_counts(samples: dict[str, Samples]) -> dict[str, float]:
    """What :func:`compare` reads (health checks and training go on counting meanwhile)."""
    return {f"{side}:{name}:{labels}": value for side, scraped in samples.items()
            for (name, labels), value in scraped.items()
            if name in COMPARED_COUNTERS
            or (name == "spiral_grpc_server_handled_total" and dict(labels).get("method") in METHODS)}


def start_servers(cfg: ExperimentConfig, work: Path) -> Servers:
    config_path = work / "experiment.yaml"
    dump_experiment(cfg, config_path)
    run_dir = work / "run"
    layout = plan_layout(cfg, config_path, run_dir, num_actors=0, population=1)
    # The discriminator too: without one the learner waits out its refresh deadline on every update
    # and the load would measure little but back-pressure.
    layout.processes = [spec for spec in layout.processes if spec.role in ("learner", "replaybuffer", "discriminator")]
    run_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(layout, run_dir, restart=False)
    supervisor.start()
    servers = Servers(supervisor, {s.role: s.grpc_address for s in layout.processes},
                      {s.role: s.metrics_url for s in layout.processes},
                      {c.spec.role: c.popen.pid for c in supervisor.children})  # type: ignore[union-attr]
    deadline = time.monotonic() + 300
    while not all(health_of(address) == "SERVING" for address in servers.addresses.values()):
        servers.check_running()
        if time.monotonic() > deadline:
            raise RuntimeError("the learner, replay buffer and discriminator did not become SERVING within 300 s")
        time.sleep(0.5)
    return servers


def record_unrolls(cfg: ExperimentConfig, learner_address: str) -> Recording:
    """Run a real episode runner on the learner's parameters and encode what it produced."""
    channel = make_channel(learner_address, cfg.services, contract=experiment_contract(cfg))
    snapshot = fetch_parameters(learner_pb2_grpc.PolicyLearnerStub(channel), -1, timeout=60)
    channel.close()
    assert snapshot is not None
    targets = for_experiment(cfg).images if cfg.env.conditional else None
    runner = EpisodeRunner(cfg, make_env(cfg, cfg.actor.num_envs, seed=0), build_policy(cfg), targets, seed=0,
                           actor_id="load-recorder")
    runner.load_parameters(snapshot)
    names = action_spec_for(cfg).names
    unrolls, inserts = [], []
    for _ in range(RECORDED_UNROLLS):
        unroll = runner.run_episode()
        unrolls.append(encode_unroll(unroll, names))
        inserts.append(encode_insert_request(unroll.final_canvases, unroll.targets, unroll.policy_version,
                                             "load-recorder"))
    return Recording(unrolls, inserts, cfg.actor.num_envs)


def run_phase(name: str, scenario: str, servers: Servers, cfg: ExperimentConfig, recording: Recording,
              clients: int, rate: float, seconds: float, health: HealthWatch,
              until: Callable[[Tally], bool], max_seconds: float) -> tuple[dict[str, Any], list[str]]:
    """Run ``clients`` clients of ``scenario`` for ``seconds`` and then until ``until`` (of what they
    counted so far) holds or ``max_seconds`` pass, then compare what they counted with the servers."""
    settle_start = time.monotonic()
    before = servers.settled_scrape()
    settle_seconds = time.monotonic() - settle_start
    statuses = health.phase()
    stop = threading.Event()
    workers = [LoadClient(i, name, scenario, cfg, servers.addresses["learner"], servers.addresses["replaybuffer"],
                          recording, rate, stop) for i in range(clients)]
    threads = [threading.Thread(target=w.run, name=f"load-{name}-{w.index}", daemon=True) for w in workers]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    reached = True
    while True:
        time.sleep(0.5)
        servers.check_running()
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            so_far = Tally()
            for worker in workers:
                so_far.merge(worker.tally)
            if until(so_far):
                break
        if elapsed >= max_seconds:
            reached = False
            break
    stop.set()
    join_by = time.monotonic() + CALL_DEADLINE_SECONDS + 10
    for thread in threads:
        thread.join(timeout=max(0.1, join_by - time.monotonic()))
    duration = time.monotonic() - start
    hung = sum(thread.is_alive() for thread in threads)
    settle_start = time.monotonic()
    after = servers.settled_scrape()
    settle_seconds += time.monotonic() - settle_start
    progress(f"{name}: {duration:.0f} s of load, {time.monotonic() - start:.0f} s with joining, "
             f"{settle_seconds:.0f} s settling the servers' counts")
    tally = Tally()
    for worker in workers:
        tally.merge(worker.tally)
    result, failures = compare(name, tally, before, after, recording.episodes_per_unroll)
    if hung:
        failures.append(f"{name}: {hung} client threads still in a call {CALL_DEADLINE_SECONDS + 10:.0f} s after stop")
    health_counts = {side: dict(counter) for side, counter in statuses.items()}
    for side, counter in statuses.items():
        if set(counter) - {"SERVING"}:
            failures.append(f"{name}: {side} health was not always SERVING: {dict(counter)}")
    result.update(scenario=scenario, clients=clients, seconds=round(duration, 1), health=health_counts,
                  set_rate=round(clients * rate, 2), achieved_rate=round(tally.iterations / duration, 2),
                  reached=reached)
    return result, failures


def scenario_happened(scenario: str, tally: Tally) -> bool:
    """Whether every method was answered OK at least once and the scenario's event happened."""
    if not all(tally.codes[(method, "OK")] for method in METHODS):
        return False
    if scenario == "disconnect":
        return tally.codes[("SubmitUnrolls", "CANCELLED")] > 0
    if scenario == "stale":
        return tally.codes[("SubmitUnrolls", "FAILED_PRECONDITION")] > 0
    if scenario == "restart":
        return tally.restarts > 0
    return True


def progress(message: str) -> None:
    print(f"[load] {message}", file=sys.stderr, flush=True)


# -- the whole run -----------------------------------------------------------------------------

@dataclass
class LoadSettings:
    clients: int = 64
    rate: float = 1.0
    """Iterations per second of each client."""
    scenario_seconds: float = 300.0
    warmup_seconds: float = 30.0
    warmup_max_seconds: float = 300.0
    scenarios: tuple[str, ...] = SCENARIOS
    assert_memory: bool = True
    plateau_seconds: float = PLATEAU_WINDOW_SECONDS
    """Warm-up lasts until the servers' peak RSS stops rising over two windows this long
    (:meth:`RssWatch.plateaued`); 0: no such wait."""


def run_load(settings: LoadSettings, work: Path) -> dict[str, Any]:
    cfg = load_experiment(experiment_path("tiny"), LOAD_OVERRIDES)
    started = time.monotonic()
    servers = start_servers(cfg, work)
    startup_seconds = time.monotonic() - started
    health = HealthWatch(servers.addresses)
    rss_watch = RssWatch(servers.pids)
    failures: list[str] = []
    phases: dict[str, Any] = {}
    progress(f"learner and replay buffer SERVING after {startup_seconds:.0f} s")
    try:
        recording = record_unrolls(cfg, servers.addresses["learner"])
        progress(f"recorded {RECORDED_UNROLLS} unrolls at {time.monotonic() - started:.0f} s")
        replay_channel = make_channel(servers.addresses["replaybuffer"], cfg.services)
        replay = replay_pb2_grpc.ReplayBufferStub(replay_channel)
        learner_channel = make_channel(servers.addresses["learner"], cfg.services)
        learner = learner_pb2_grpc.PolicyLearnerStub(learner_channel)

        def warm(tally: Tally) -> bool:
            full = replay.Info(replay_pb2.InfoRequest(), timeout=5).size >= cfg.replay.capacity
            status = learner.Status(learner_pb2.StatusRequest(), timeout=5)
            return (full and status.version > cfg.learner.max_policy_lag and status.updates >= WARM_UPDATES
                    and scenario_happened("steady", tally)
                    and (not settings.plateau_seconds or rss_watch.plateaued(settings.plateau_seconds)))

        result, phase_failures = run_phase("warmup", "steady", servers, cfg, recording, settings.clients,
                                           settings.rate, settings.warmup_seconds, health, until=warm,
                                           max_seconds=settings.warmup_max_seconds)
        phases["warmup"] = result
        failures += phase_failures
        warmed = result["reached"]
        windows: list[tuple[float, float]] = []
        for scenario in settings.scenarios:
            window_start = rss_watch.now()
            result, phase_failures = run_phase(scenario, scenario, servers, cfg, recording, settings.clients,
                                               settings.rate, settings.scenario_seconds, health,
                                               until=lambda tally, scenario=scenario: scenario_happened(scenario, tally),
                                               max_seconds=4 * settings.scenario_seconds)
            phases[scenario] = result
            windows.append((window_start, rss_watch.now()))
            failures += phase_failures
            if not result["reached"]:
                failures.append(f"{scenario}: within {4 * settings.scenario_seconds:.0f} s, not every method was "
                                f"answered OK once, or what the scenario does never happened")
        if len(windows) == 1:  # one scenario: its first half against its second
            start, end = windows[0]
            windows = [(start, (start + end) / 2), ((start + end) / 2, end)]
        rss_warm = rss_watch.peaks(*windows[0])
        rss_end = rss_watch.peaks(*windows[-1])
        status = learner.Status(learner_pb2.StatusRequest(), timeout=5)
        replay_channel.close()
        learner_channel.close()
    finally:
        health.close()
        rss_watch.close()
        stopping = time.monotonic()
        servers.supervisor.stop(grace_seconds=30)
        progress(f"servers stopped in {time.monotonic() - stopping:.0f} s")
    memory = {side: {"warm_mb": round(rss_warm[side] / 2**20, 1), "end_mb": round(rss_end[side] / 2**20, 1),
                     "growth": round(rss_end[side] / rss_warm[side] - 1, 4)} for side in rss_warm}
    if not warmed:
        failures.append(f"warm-up: the replay table was not full, the learner not past version "
                        f"{cfg.learner.max_policy_lag} and {WARM_UPDATES} updates, or the servers' peak memory "
                        f"still rising after {settings.warmup_max_seconds:.0f} s")
    if settings.assert_memory and warmed:
        for side, figures in memory.items():
            if figures["growth"] > MAX_RSS_GROWTH:
                failures.append(f"memory: {side} grew {100 * figures['growth']:.1f}% from warm-up to the end "
                                f"(at most {100 * MAX_RSS_GROWTH:.0f}%)")
    return {"clients": settings.clients, "rate_per_client": settings.rate, "scenario_seconds": settings.scenario_seconds,
            "episodes_per_unroll": recording.episodes_per_unroll, "warmed": warmed, "phases": phases,
            "memory": memory, "rss_timeline": timeline(rss_watch.samples),
            "learner": {"version": int(status.version), "updates": int(status.updates)},
            "startup_seconds": round(startup_seconds, 1), "wall_seconds": round(time.monotonic() - started, 1), "failures": failures, "ok": not failures}


def timeline(samples: list[tuple[float, dict[str, int]]], every: float = 10.0) -> list[dict[str, float]]:
    """One sample per ``every`` seconds, in MB, with its time since the servers started."""
    kept: list[dict[str, float]] = []
    for t, sample in samples:
        if not kept or t - kept[-1]["t"] >= every:
            kept.append({"t": round(t, 1), **{name: round(v / 2**20, 1) for name, v in sample.items()}})
    return kept


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['clients']} clients x {report['rate_per_client']:g} iterations/s each; learner at version "
             f"{report['learner']['version']} after {report['learner']['updates']} updates; "
             f"{report['wall_seconds']:.0f} s in all ({report['startup_seconds']:.0f} s to start the servers)"]
    header = f"{'phase':10} {'method':14} {'client codes':52} {'server codes':52} {'p50 ms':>8} {'p99 ms':>8}"
    lines += [header, "-" * len(header)]
    for name, phase in report["phases"].items():
        for method, figures in phase["methods"].items():
            client = " ".join(f"{code}={n}" for code, n in figures["client"].items())
            server = " ".join(f"{code}={n}" for code, n in sorted(figures["server"].items()))
            lines.append(f"{name:10} {method:14} {client:52} {server:52} {figures['latency']['p50_ms']:8.1f} "
                         f"{figures['latency']['p99_ms']:8.1f}")
        counts = phase["counts"]
        lines.append(f"{name:10} {phase['seconds']:.0f} s, rate {phase['achieved_rate']:.1f}/{phase['set_rate']:.1f} "
                     f"iterations/s achieved/set; learner episodes {counts['learner_episodes']} = "
                     f"{report['episodes_per_unroll']} x ({counts['accepted_unrolls']} accepted + "
                     f"{counts['unacknowledged_unrolls']} unacknowledged + {counts['their_unrolls']} of "
                     f"{counts['cancelled_streams_answered_ok']} cancelled streams answered OK); replay inserted {counts['replay_inserted']}; "
                     f"stale {counts['stale_refusals']}; restarts {counts['actor_restarts']}; health {phase['health']}")
    for side, figures in report["memory"].items():
        lines.append(f"memory {side}: peak {figures['warm_mb']:.1f} MB in the first scenario after warm-up, "
                     f"{figures['end_mb']:.1f} MB in the last "
                     f"({100 * figures['growth']:+.1f}%)")
    for side in report["memory"]:
        curve = " ".join(f"{row[side]:.0f}" for row in report["rss_timeline"][::3])
        lines.append(f"rss {side} every 30 s (MB): {curve}")
    lines.append("all checks passed" if report["ok"] else "FAILED:\n  " + "\n  ".join(report["failures"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="8 clients, 10 s per scenario, 5-120 s of warm-up (CI; about 3 minutes)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1.0, help="iterations per second of each client (default 1)")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of each scenario (default 5)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    if args.quick:
        settings = LoadSettings(clients=8, rate=args.rate, scenario_seconds=10.0, warmup_seconds=5.0,
                                warmup_max_seconds=120.0, plateau_seconds=15.0, scenarios=tuple(args.scenarios))
    else:
        settings = LoadSettings(clients=args.clients, rate=args.rate, scenario_seconds=60.0 * args.minutes,
                                scenarios=tuple(args.scenarios))
    with tempfile.TemporaryDirectory(prefix="spiral-load-") as work:
        report = run_load(settings, Path(work))
    print(format_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"ok": report["ok"], "failures": len(report["failures"]), "wall_seconds": report["wall_seconds"],
                      **{f"{name}_{method}_p99_ms": figures["latency"]["p99_ms"]
                         for name, phase in report["phases"].items() for method, figures in phase["methods"].items()},
                      **{f"{side}_rss_growth": figures["growth"] for side, figures in report["memory"].items()}}))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
