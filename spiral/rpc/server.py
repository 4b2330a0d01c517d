"""The gRPC server every spiral service runs: limits, health, reflection, metrics, shutdown.

:func:`build_server` assembles a ``grpc.server`` the same way for each service:

* a thread pool, and explicit channel options: message-size limits from
  ``services.max_message_bytes``, keepalive pings (time, timeout, allowed without calls),
  a minimum interval for client pings, a maximum connection idle time, and
  ``SO_REUSEPORT`` off so that a port already taken is an error, not a silently shared port;
* the ``grpc.health.v1.Health`` service, reporting SERVING for each registered service and
  for the server as a whole (the empty name) once started, and NOT_SERVING from the moment
  shutdown begins, so Kubernetes probes and load balancers stop sending work;
* server reflection for the registered services (``grpcurl`` works without .proto files);
* the interceptors of :mod:`spiral.rpc.interceptors` (call metrics, message-size policy, and
  the experiment contract of :mod:`spiral.rpc.contract` when the process declared one);
* exactly one listening address, the configured one, plaintext or TLS / mutual TLS from
  :mod:`spiral.rpc.tls`.

:meth:`SpiralServer.serve_until_signal` blocks until SIGTERM or SIGINT, then shuts down
gracefully: health goes NOT_SERVING, the service's ``on_stopping`` hook runs (e.g. wake
calls that wait on a condition), the server stops taking new calls and gives in-flight calls
``grace`` seconds to finish, and finally ``on_stopped`` runs (e.g. write a last checkpoint
that includes everything those calls did).

Example::

    server = build_server([ServiceBinding(replay_pb2.DESCRIPTOR.services_by_name["ReplayBuffer"],
                                          servicer, replay_pb2_grpc.add_ReplayBufferServicer_to_server)],
                          "127.0.0.1:50053", cfg.services)
    server.start()
    server.serve_until_signal(on_stopped=table_checkpoint)
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spiral.config import ServicesConfig
from spiral.rpc.contract import Contract, process_contract
from spiral.rpc.interceptors import ContractInterceptor, MessageSizeInterceptor, MetricsInterceptor
from spiral.rpc.tls import server_credentials

log = logging.getLogger(__name__)

_MAX_GRPC_LENGTH = 2**31 - 1


@dataclass(frozen=True)
class KeepaliveSettings:
    """HTTP/2 keepalive of servers and channels (milliseconds).

    Attributes:
        time_ms: Send a keepalive ping after this long without activity.
        timeout_ms: Close the connection when a ping is not answered within this time.
        permit_without_calls: Ping even when no call is in flight (detects dead peers early).
        min_client_ping_interval_ms: Servers accept client pings this often at most;
            ``time_ms`` of clients must not be smaller, or the server closes the connection.
        max_connection_idle_ms: Servers close connections without calls for this long
            (clients reconnect transparently on their next call).
    """

    time_ms: int = 30_000
    timeout_ms: int = 10_000
    permit_without_calls: bool = True
    min_client_ping_interval_ms: int = 10_000
    max_connection_idle_ms: int = 300_000


def transport_receive_limit(max_message_bytes: int) -> int:
    """gRPC's own receive limit for a configured limit: twice as large, so that messages
    between the two reach :class:`~spiral.rpc.interceptors.MessageSizeInterceptor` and are
    refused with INVALID_ARGUMENT and counted, rather than cut off by the transport."""
    return min(_MAX_GRPC_LENGTH, 2 * int(max_message_bytes))


def server_options(services_cfg: ServicesConfig, keepalive: KeepaliveSettings) -> list[tuple[str, int]]:
    """The channel arguments of a spiral server."""
    return [
        ("grpc.max_send_message_length", min(_MAX_GRPC_LENGTH, services_cfg.max_message_bytes)),
        ("grpc.max_receive_message_length", transport_receive_limit(services_cfg.max_message_bytes)),
        ("grpc.keepalive_time_ms", keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive.min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", keepalive.max_connection_idle_ms),
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to serve.

    Attributes:
        descriptor: The service's descriptor, e.g. ``replay_pb2.DESCRIPTOR.services_by_name["ReplayBuffer"]``.
        servicer: The implementation.
        add_to_server: The generated ``add_XServicer_to_server`` function.
    """

    descriptor: ServiceDescriptor
    servicer: Any
    add_to_server: Callable[[Any, grpc.Server], None]

    @property
    def name(self) -> str:
        return self.descriptor.full_name


class BindError(RuntimeError):
    """The configured address could not be bound (taken, malformed, or not a local address)."""


@dataclass
class SpiralServer:
    """A built server: call :meth:`start`, then :meth:`serve_until_signal` or :meth:`stop`.

    Attributes:
        server: The underlying ``grpc.Server``.
        health: Its health servicer.
        service_names: Full names of the served services.
        address: ``host:port`` actually bound (the port resolved when 0 was asked for).
        tls: Whether the port serves TLS.
    """

    server: grpc.Server
    health: health.HealthServicer
    service_names: tuple[str, ...]
    address: str
    tls: bool
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def start(self) -> None:
        """Start serving and report SERVING for every service and overall."""
        self.server.start()
        for name in (*self.service_names, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def mark_not_serving(self) -> None:
        """Report NOT_SERVING for every service and overall while still taking calls (a failed
        training loop: probes see it before the process exits)."""
        for name in (*self.service_names, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float = 10.0, on_stopping: Callable[[], None] | None = None,
             on_stopped: Callable[[], None] | None = None) -> None:
        """Shut down gracefully (idempotent).

        Args:
            grace: Seconds in-flight calls get to finish before they are cancelled.
            on_stopping: Runs after health turns NOT_SERVING, before the server stops taking
                calls (e.g. wake up calls that wait for data).
            on_stopped: Runs once in-flight calls have finished or were cancelled (e.g. write
                a final checkpoint).
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        _run_hook("on_stopping", on_stopping)
        self.server.stop(grace).wait()
        _run_hook("on_stopped", on_stopped)

    def serve_until_signal(self, grace: float = 10.0, on_stopping: Callable[[], None] | None = None,
                           on_stopped: Callable[[], None] | None = None,
                           signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
                           stop_event: threading.Event | None = None) -> signal.Signals | None:
        """Block until one of ``signals`` arrives (or ``stop_event`` is set), then :meth:`stop`.

        Must be called from the main thread (Python delivers signals there). The previous
        signal handlers are restored afterwards.

        Returns:
            The signal that stopped the server, or None when ``stop_event`` did.
        """
        stop = stop_event or threading.Event()
        received: list[signal.Signals] = []

        def handle(signum: int, _frame: Any) -> None:
            received.append(signal.Signals(signum))
            stop.set()

        previous = {sig: signal.signal(sig, handle) for sig in signals}
        try:
            while not stop.wait(0.5):
                pass
            if received:
                log.info("received %s: shutting down (grace %.1f s)", received[0].name, grace)
            self.stop(grace, on_stopping=on_stopping, on_stopped=on_stopped)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return received[0] if received else None


def _run_hook(name: str, hook: Callable[[], None] | None) -> None:
    if hook is None:
        return
    try:
        hook()
    except Exception:  # noqa: BLE001 - shutdown goes on; the failure is logged with its traceback
        log.exception("shutdown hook %s failed", name)


def build_server(services: Sequence[ServiceBinding], address: str, services_cfg: ServicesConfig, *,
                 max_workers: int = 16, keepalive: KeepaliveSettings = KeepaliveSettings(),
                 maximum_concurrent_rpcs: int | None = None,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 contract: Contract | None = None) -> SpiralServer:
    """Build (not start) a server for ``services`` bound to exactly ``address``.

    Args:
        services: What to serve.
        address: ``host:port`` to bind; port 0 picks a free port (read it from the result).
        services_cfg: Message-size limit and TLS files.
        max_workers: Threads handling calls (a streaming call holds one for its duration).
        keepalive: Keepalive and idle settings.
        maximum_concurrent_rpcs: Calls beyond this many are refused with RESOURCE_EXHAUSTED
            instead of queueing (None: no limit).
        interceptors: Extra interceptors, run inside the metrics, size and contract interceptors.
        contract: The experiment contract callers must match (default: the one this process
            declared with :func:`spiral.rpc.contract.declare_process_contract`; none: no check).

    Raises:
        BindError: The address cannot be bound.
        spiral.rpc.tls.TLSConfigError: A TLS file cannot be read.
    """
    if not services:
        raise ValueError("build_server needs at least one service")
    credentials = server_credentials(services_cfg)
    contract = process_contract() if contract is None else contract
    checks = [ContractInterceptor(contract)] if contract is not None else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-handler"),
        interceptors=[MetricsInterceptor(), MessageSizeInterceptor(services_cfg.max_message_bytes), *checks,
                      *interceptors],
        options=server_options(services_cfg, keepalive),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )
    names = tuple(binding.name for binding in services)
    for binding in services:
        binding.add_to_server(binding.servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*names, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise BindError(f"cannot bind {address!r}: {exc}") from None
    if not port:
        raise BindError(f"cannot bind {address!r} (port in use, or not an address of this host)")
    host = address.rsplit(":", 1)[0]
    return SpiralServer(server=server, health=health_servicer, service_names=names, address=f"{host}:{port}",
                        tls=credentials is not None)
