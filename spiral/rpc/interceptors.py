"""Server interceptors every spiral service installs: call metrics and the message-size policy.

A gRPC server interceptor sees each call's method name before the call runs and may replace
its handler. spiral wraps every handler twice:

* :class:`MetricsInterceptor` times each call until its response (or last streamed
  response) is sent and counts it by final status code:
  ``spiral_grpc_server_handling_seconds{service, method}`` (plus ``code`` when
  :mod:`spiral.runtime.metrics` declares that label) and
  ``spiral_grpc_server_handled_total{service, method, code}``. A call whose caller went away
  mid-call (it cancelled, or its deadline passed, while the handler read its request stream)
  counts as ``CANCELLED``.
* :class:`MessageSizeInterceptor` refuses request messages above the configured
  ``services.max_message_bytes`` with ``INVALID_ARGUMENT`` and a message naming both sizes,
  counted in ``spiral_rejected_messages_total{reason="too_large"}``. gRPC's own receive
  limit is set higher (see :func:`spiral.rpc.server.transport_receive_limit`) so that these
  messages reach the interceptor; only grossly larger ones are cut off by the transport with
  ``RESOURCE_EXHAUSTED``.

A server with an experiment contract (:mod:`spiral.rpc.contract`) also installs
:class:`ContractInterceptor`: a call to a spiral service whose caller sent a contract that
differs from the server's is refused with ``FAILED_PRECONDITION`` naming the differing fields
(``experiment mismatch: env.paint.grid_size is 8 here, 16 at the caller``), counted in
``spiral_rejected_messages_total{reason="experiment_mismatch"}`` and logged once per mismatch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator

import grpc

from spiral.rpc.contract import CONTRACT_METADATA_KEY, Contract, contract_mismatch, decode_contract
from spiral.runtime import metrics

log = logging.getLogger(__name__)

_HISTOGRAM_HAS_CODE = "code" in getattr(metrics.GRPC_HANDLING_SECONDS, "_labelnames", ())
"""Whether the handling-time histogram is labelled by status code too."""
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def split_method(full_method: str) -> tuple[str, str]:
    """``"/spiral.v1.ReplayBuffer/Insert"`` -> ``("spiral.v1.ReplayBuffer", "Insert")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or full_method


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def _rebuild(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any],
             request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind with a new behaviour (and optionally a new deserializer)."""
    return _FACTORIES[_kind(handler)](
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return getattr(handler, _kind(handler))


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()  # set by abort()/set_code(); None when the handler left it alone
    if code is None and failed and not context.is_active():
        # The caller went away mid-call (cancelled, or past its deadline): reading its request
        # stream raised. Not a handler bug, so not UNKNOWN.
        code = grpc.StatusCode.CANCELLED
    if code is None:
        code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
    return code.name


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times and counts every call by service, method and status code."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        behaviour = _behaviour(handler)

        def record(start: float, context: grpc.ServicerContext, failed: bool, code: str | None = None) -> None:
            elapsed = time.perf_counter() - start
            name = code or _code_name(context, failed)
            if _HISTOGRAM_HAS_CODE:
                metrics.GRPC_HANDLING_SECONDS.labels(service, method, name).observe(elapsed)
            else:
                metrics.GRPC_HANDLING_SECONDS.labels(service, method).observe(elapsed)
            metrics.GRPC_HANDLED_TOTAL.labels(service, method, name).inc()

        if handler.response_streaming:
            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                try:
                    yield from behaviour(request, context)
                except GeneratorExit:
                    record(start, context, failed=True, code=grpc.StatusCode.CANCELLED.name)
                    raise
                except BaseException:
                    record(start, context, failed=True)
                    raise
                record(start, context, failed=False)
            return _rebuild(handler, streaming)

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response = behaviour(request, context)
            except BaseException:
                record(start, context, failed=True)
                raise
            record(start, context, failed=False)
            return response
        return _rebuild(handler, unary)


class _Oversize:
    """Stands in for a request message that was too large to deserialize."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class MessageSizeInterceptor(grpc.ServerInterceptor):
    """Refuses request messages larger than ``max_message_bytes`` with INVALID_ARGUMENT.

    Args:
        max_message_bytes: Largest serialized request message accepted.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = int(max_message_bytes)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        limit = self.max_message_bytes
        deserialize = handler.request_deserializer

        def checked_deserializer(raw: bytes) -> Any:
            if len(raw) > limit:
                return _Oversize(len(raw))
            return deserialize(raw) if deserialize is not None else raw

        def refuse(context: grpc.ServicerContext, size: int) -> None:
            metrics.REJECTED_MESSAGES_TOTAL.labels(service, "too_large").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"too_large: a {method} request message of {size} bytes exceeds "
                          f"services.max_message_bytes = {limit}")

        behaviour = _behaviour(handler)
        if handler.request_streaming:
            def checked_stream(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                def requests() -> Iterator[Any]:
                    for request in request_iterator:
                        if isinstance(request, _Oversize):
                            refuse(context, request.size)
                        yield request
                return behaviour(requests(), context)
            return _rebuild(handler, checked_stream, checked_deserializer)

        def checked_unary(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Oversize):
                refuse(context, request.size)
            return behaviour(request, context)
        return _rebuild(handler, checked_unary, checked_deserializer)


class ContractInterceptor(grpc.ServerInterceptor):
    """Refuses calls to spiral services from callers whose experiment contract differs.

    Only the ``spiral.*`` services are checked (health and reflection answer anyone), and only
    calls that carry :data:`~spiral.rpc.contract.CONTRACT_METADATA_KEY`.

    Args:
        contract: This server's contract (:func:`spiral.rpc.contract.experiment_contract`).
    """

    def __init__(self, contract: Contract) -> None:
        self.contract = dict(contract)
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def _refusal(self, metadata: Any) -> tuple[str, grpc.StatusCode] | None:
        """Why a call with this metadata is refused, or None to let it through."""
        sent = next((value for key, value in (metadata or ()) if key == CONTRACT_METADATA_KEY), None)
        if sent is None:
            return None
        try:
            caller = decode_contract(sent)
        except ValueError as exc:
            return f"malformed {CONTRACT_METADATA_KEY} metadata: {exc}", grpc.StatusCode.INVALID_ARGUMENT
        message = contract_mismatch(self.contract, caller)
        return None if message is None else (message, grpc.StatusCode.FAILED_PRECONDITION)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service, method = split_method(handler_call_details.method)
        if handler is None or not service.startswith("spiral."):
            return handler
        refusal = self._refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return handler
        message, code = refusal
        with self._lock:
            first = message not in self._logged
            self._logged.add(message)
        if first:
            log.warning("refusing %s calls from a peer of another experiment: %s", method, message)

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            metrics.REJECTED_MESSAGES_TOTAL.labels(service, "experiment_mismatch").inc()
            context.abort(code, message)

        return _rebuild(handler, refuse)
