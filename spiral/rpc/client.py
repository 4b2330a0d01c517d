"""Dialing spiral services, and calling them so that a peer that is down never hangs the caller.

:func:`make_channel` opens a channel with the same message limits and keepalive as the
servers (:mod:`spiral.rpc.server`), TLS client credentials when configured, gRPC's own
retries off (retrying is explicit, below) and a bounded reconnect backoff, so a restarted
peer is found again within seconds. Every call on it carries the process's experiment
contract (:mod:`spiral.rpc.contract`), which the peer checks.

:func:`call_with_retry` runs one call with a per-attempt deadline; when it fails with a
transient status (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED) it sleeps for
an exponential backoff with *full jitter* (uniformly in ``[0, min(max, initial * 2**n)]``,
which spreads out actors that all lost the same peer) and tries again, until it succeeds, a
non-transient status arrives (raised at once: resending a malformed message will not help),
its overall deadline passes (:class:`RetryDeadlineExceeded`) or a stop event is set
(:class:`RetryStopped`). It never blocks longer than the remaining overall deadline and
wakes up at once when stopped.

Example::

    channel = make_channel(cfg.services.learner_address, cfg.services)
    stub = learner_pb2_grpc.PolicyLearnerStub(channel)
    summary = call_with_retry(lambda timeout: stub.SubmitUnrolls(iter(msgs), timeout=timeout),
                              policy=RetryPolicy(), stop=stop_event, deadline_seconds=120,
                              retry_labels=("0", "learner"), description="SubmitUnrolls")
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import grpc

from spiral.runtime import metrics
from spiral.config import ServicesConfig
from spiral.rpc.contract import Contract, process_contract, with_contract
from spiral.rpc.server import KeepaliveSettings
from spiral.rpc.tls import channel_credentials

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_CODES: frozenset[grpc.StatusCode] = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
})
"""Status codes worth retrying: the peer is down, slow, busy or asked us to retry."""


def channel_options(services_cfg: ServicesConfig, keepalive: KeepaliveSettings,
                    server_name: str | None = None, max_reconnect_backoff_ms: int = 5_000) -> list[tuple[str, object]]:
    """The channel arguments of a spiral client."""
    limit = min(2**31 - 1, services_cfg.max_message_bytes)
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", max(keepalive.time_ms, keepalive.min_client_ping_interval_ms)),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def make_channel(address: str, services_cfg: ServicesConfig, *, keepalive: KeepaliveSettings = KeepaliveSettings(),
                 server_name: str | None = None, contract: Contract | None = None) -> grpc.Channel:
    """Open a channel to a spiral service (TLS when the config names a CA or a client certificate).

    Args:
        address: ``host:port`` of the service.
        services_cfg: Message limit and TLS files (see :mod:`spiral.rpc.tls`).
        keepalive: Keepalive settings; must match the servers'.
        server_name: Name to verify in the server's certificate instead of ``address``'s host.
        contract: The experiment contract sent with every call (default: the one this process
            declared with :func:`spiral.rpc.contract.declare_process_contract`; none: not sent).
    """
    options = channel_options(services_cfg, keepalive, server_name)
    credentials = channel_credentials(services_cfg)
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    return with_contract(channel, process_contract() if contract is None else contract)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff and deadlines of :func:`call_with_retry` (seconds).

    Attributes:
        initial_backoff: Upper bound of the first sleep.
        max_backoff: Largest upper bound of a sleep.
        multiplier: Growth of the upper bound per failed attempt.
        call_timeout: Deadline of one attempt.
        retry_codes: Status codes that are retried; others are raised at once.
    """

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    call_timeout: float = 10.0
    retry_codes: frozenset[grpc.StatusCode] = TRANSIENT_CODES

    def __post_init__(self) -> None:
        for name in ("initial_backoff", "max_backoff", "call_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"RetryPolicy.{name} must be a positive number, got {value}")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")

    def backoff_bound(self, failures: int) -> float:
        """Upper bound of the sleep after ``failures`` consecutive failures (>= 1)."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** min(failures - 1, 64))


class RetryError(Exception):
    """A retried call did not succeed.

    Attributes:
        attempts: Attempts made.
        last_error: The last failure (None if stopped before the first attempt).
    """

    def __init__(self, message: str, attempts: int, last_error: grpc.RpcError | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error


class RetryDeadlineExceeded(RetryError):
    """The overall deadline passed before an attempt succeeded."""


class RetryStopped(RetryError):
    """The stop event was set (the process is shutting down)."""


def _describe(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


def call_with_retry(call: Callable[[float], T], *, policy: RetryPolicy = RetryPolicy(),
                    deadline_seconds: float | None = None, stop: threading.Event | None = None,
                    retry_labels: tuple[str, str] | None = None, description: str = "call",
                    rng: random.Random | None = None, retry_window_seconds: float | None = None) -> T:
    """Run ``call(timeout)`` until it succeeds, retrying transient failures with backoff and jitter.

    Args:
        call: Makes one attempt; must pass its argument (seconds) as the gRPC ``timeout``.
        policy: Backoff and per-attempt deadline.
        deadline_seconds: Give up after this long overall (None: keep trying until ``stop``;
            then each attempt still has a deadline, so the caller is never stuck in a call).
        stop: Set it to make the retry loop give up at once (even mid-sleep).
        retry_labels: ``(member, peer)`` labels of ``spiral_actor_rpc_retries_total`` to count
            each retry in, or None to not count.
        description: Names the call in log lines and errors.
        rng: Random source of the jitter.
        retry_window_seconds: Retry only within this long from the start (None: until the
            deadline); a transient failure after it is raised as it is. An attempt itself may
            still run until the deadline (a long stream after a short wait for a peer to start).

    Returns:
        What ``call`` returned.

    Raises:
        grpc.RpcError: A non-transient failure (e.g. INVALID_ARGUMENT), immediately.
        RetryDeadlineExceeded: ``deadline_seconds`` passed.
        RetryStopped: ``stop`` was set.
    """
    if deadline_seconds is None and stop is None:
        raise ValueError("call_with_retry needs deadline_seconds or a stop event, or it could retry forever")
    rng = rng or random.Random()
    start = time.monotonic()
    end = math.inf if deadline_seconds is None else start + deadline_seconds
    attempts = 0
    last_error: grpc.RpcError | None = None
    while True:
        if stop is not None and stop.is_set():
            raise RetryStopped(f"{description}: stopped after {attempts} attempt(s)", attempts, last_error)
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise RetryDeadlineExceeded(
                f"{description}: gave up after {attempts} attempt(s) in {time.monotonic() - start:.1f} s"
                + (f"; last error {_describe(last_error)}" if last_error is not None else ""), attempts, last_error)
        attempts += 1
        if attempts > 1 and retry_labels is not None:
            metrics.ACTOR_RPC_RETRIES_TOTAL.labels(*retry_labels).inc()
        try:
            return call(min(policy.call_timeout, remaining))
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            if code not in policy.retry_codes:
                raise
            last_error = error
        sleep = rng.uniform(0.0, policy.backoff_bound(attempts))
        sleep = min(sleep, max(0.0, end - time.monotonic()))
        if retry_window_seconds is not None and time.monotonic() + sleep - start > retry_window_seconds:
            raise last_error
        log.debug("%s failed (%s); retry %d in %.2f s", description, _describe(last_error), attempts, sleep)
        if stop is not None:
            if stop.wait(sleep):
                continue  # the loop head raises RetryStopped
        else:
            time.sleep(sleep)
