"""The training state (:mod:`spiral.agent.training_state`) on the wire, for PBT copies.

It is streamed exactly like parameters (:func:`spiral.rpc.parameters.chunk_parameters`,
``GetTrainingState`` of ``spiral.v1.PolicyLearner`` and ``spiral.v1.DiscriminatorLearner``),
stamped with the server's current parameter version. :func:`fetch_training_state` is the client
side, :func:`training_state_chunks` the server side and :func:`request_discriminator_copy` asks a
discriminator to copy a donor.
"""

from __future__ import annotations

import threading
from typing import Literal, Mapping

import grpc
import numpy as np

from spiral.config import ServicesConfig
from spiral.rpc.client import RetryError, RetryPolicy, RetryStopped, call_with_retry, make_channel
from spiral.rpc.errors import InvalidMessage
from spiral.rpc.parameters import DEFAULT_CHUNK_BYTES, assemble_parameters, chunk_parameters
from spiral.rpc.peers import PeerError, _error_from
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.v1 import discriminator_pb2, discriminator_pb2_grpc, learner_pb2_grpc, parameters_pb2


def training_state_chunks(version: int, tensors: Mapping[str, np.ndarray], member: int,
                          max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[parameters_pb2.ParameterChunk]:
    """The ``GetTrainingState`` answer: ``tensors`` chunked like parameters (never "up to date";
    an empty state still yields one chunk with count 1)."""
    return chunk_parameters(int(version), tensors, max_chunk_bytes=max_chunk_bytes, member=int(member))


def _stub(kind: str, channel: grpc.Channel) -> object:
    if kind == "learner":
        return learner_pb2_grpc.PolicyLearnerStub(channel)
    if kind == "discriminator":
        return discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)
    raise ValueError(f"kind must be 'learner' or 'discriminator', got {kind!r}")


def fetch_training_state(address: str, services_cfg: ServicesConfig, kind: Literal["learner", "discriminator"],
                         member: int, timeout: float = 60.0, *, unavailable_retry_seconds: float = 2.0,
                         server_name: str | None = None, stop: threading.Event | None = None) -> ParameterSnapshot:
    """Fetch a donor's training state over ``GetTrainingState``.

    Args:
        address: ``host:port`` of the donor policy learner or discriminator learner.
        services_cfg: Message limit and TLS files.
        kind: ``"learner"`` or ``"discriminator"``.
        member: The donor's population member (the donor refuses any other).
        timeout: Deadline of the whole stream, seconds.
        unavailable_retry_seconds: For how long (from the start) an UNAVAILABLE donor (starting,
            restarting) is retried with backoff; the whole call never takes longer than ``timeout``.
        server_name: Name to verify in the donor's TLS certificate instead of the host.
        stop: Set to give up at once.

    Returns:
        The training state (``tensors``), the donor's parameter version and member.

    Raises:
        ValueError: Empty address, unknown kind, or a non-positive timeout.
        spiral.rpc.peers.PeerUnavailable: The donor is down or too slow.
        spiral.rpc.peers.PeerRejected: The donor refused (e.g. it does not train ``member``).
        spiral.rpc.peers.PeerError: Any other failure, including a malformed or inconsistent
            stream (``code`` None, the reason in ``details``).
    """
    if not address:
        raise ValueError("donor address is empty")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    method = "GetTrainingState"
    channel = make_channel(address, services_cfg, server_name=server_name)
    try:
        stub = _stub(kind, channel)
        request = parameters_pb2.GetTrainingStateRequest(member=int(member))

        try:
            update = call_with_retry(
                lambda attempt_timeout: assemble_parameters(stub.GetTrainingState(  # type: ignore[attr-defined]
                    request, timeout=attempt_timeout)),
                policy=RetryPolicy(initial_backoff=0.05, max_backoff=0.5, call_timeout=timeout,
                                   retry_codes=frozenset({grpc.StatusCode.UNAVAILABLE})),
                deadline_seconds=timeout, stop=stop, description=f"{method} on {address}",
                retry_window_seconds=max(0.0, unavailable_retry_seconds))
        except RetryStopped:
            raise PeerError(address, method, None, "stopped while waiting for the donor") from None
        except (grpc.RpcError, RetryError) as error:
            raise _error_from(address, method, error) from None
        except InvalidMessage as error:
            raise PeerError(address, method, None, f"malformed training-state stream: {error}") from None
    finally:
        channel.close()
    if update is None:
        raise PeerError(address, method, None, "the donor answered 'up to date' instead of its training state")
    if update.member != int(member):
        raise PeerError(address, method, None, f"asked for member {member}'s training state, got member {update.member}'s")
    return update



def request_discriminator_copy(address: str, services_cfg: ServicesConfig, donor_address: str, donor_member: int,
                               member: int, timeout: float = 60.0, *,
                               server_name: str | None = None) -> discriminator_pb2.LoadFromReply:
    """Tell the discriminator at ``address`` (serving ``member``) to become a copy of the donor
    discriminator at ``donor_address`` (``LoadFrom``); one call, no retries.

    Returns:
        The reply: ``donor_version``, and ``applied``/``version`` if the copy already took effect.

    Raises:
        spiral.rpc.peers.PeerRejected: A bad request (INVALID_ARGUMENT), or the donor refused
            or its state does not fit (FAILED_PRECONDITION).
        spiral.rpc.peers.PeerUnavailable: This discriminator or the donor cannot be reached
            (the details say which), or the call timed out.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    channel = make_channel(address, services_cfg, server_name=server_name)
    try:
        stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)
        request = discriminator_pb2.LoadFromRequest(donor_address=donor_address, donor_member=int(donor_member),
                                                    member=int(member))
        try:
            return stub.LoadFrom(request, timeout=timeout)
        except grpc.RpcError as error:
            raise _error_from(address, "LoadFrom", error) from None
    finally:
        channel.close()
