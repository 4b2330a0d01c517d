"""spiral's gRPC layer: wire codecs, the shared server and client set-up, and refusals.

* :mod:`spiral.rpc.errors`: :class:`InvalidMessage` / :class:`PreconditionFailed`, mapped to
  INVALID_ARGUMENT / FAILED_PRECONDITION and counted.
* :mod:`spiral.rpc.tensors`: numpy <-> ``spiral.v1.Tensor`` with strict validation.
* :mod:`spiral.rpc.messages`: unrolls and replay items <-> messages, checked against the
  experiment (action heads, image shape, conditional targets).
* :mod:`spiral.rpc.parameters`: versioned state dicts streamed in chunks.
* :mod:`spiral.rpc.server`: :func:`build_server` (limits, keepalive, health, reflection,
  metrics, TLS, graceful shutdown).
* :mod:`spiral.rpc.client`: :func:`make_channel` and :func:`call_with_retry`.
* :mod:`spiral.rpc.contract`: the experiment fields the services of one run must share, sent
  with every call and checked by every server (``experiment mismatch: ...``).
* :mod:`spiral.rpc.publish`: the shared ``GetParameters`` body of both learners.
* :mod:`spiral.rpc.peers`: :mod:`spiral.core`' interfaces over the network
  (``RemoteParameterSource``, ``RemoteUnrollSink``, ``RemoteRenderSink``,
  ``RemoteRenderSampler``) and their errors (``PeerRejected``, ``PeerUnavailable``).
"""

from spiral.rpc.errors import (RATE_LIMITED_PREFIX, InvalidMessage, PreconditionFailed, RejectedMessage,
                               check_member, reject, rejects_bad_messages)

__all__ = ["RATE_LIMITED_PREFIX", "InvalidMessage", "PreconditionFailed", "RejectedMessage", "check_member", "reject",
           "rejects_bad_messages"]
