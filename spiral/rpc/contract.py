"""The experiment contract: what the services of one run must agree on, checked on every call.

Each service loads the experiment itself (a file, its bases, and ``--set`` / ``SPIRAL_SET``
overrides), so two pods of one run could be started with different settings. Most settings
are a service's own business (its batch size, its learning rate), but some shape what peers
send each other or load from each other:

* the action space (``env.kind``, the paint grid, brush sizes, pressure, colour and gray heads, or
  the MuJoCo grid, sizes and colour bins), which fixes the unrolls' action heads;
* the image size and channels (``env.paint.canvas_size`` / ``env.mujoco.image_size``,
  ``env.paint.use_color``), which fix renders, targets and the networks' inputs, and the scene
  camera (``env.mujoco.camera_pitch_degrees``, ``frame_grid``), which fixes what a scene looks like;
* the episode length, the conditional mode and the noise size, which fix an unroll's shape;
* the policy's architecture (every ``policy`` field but ``fp32_heads``, which changes
  arithmetic, not parameters), whose parameters the actors load from the learner;
* the discriminator's architecture (``discriminator.*`` and ``discriminator_learner.objective``,
  which decides spectral normalisation), whose parameters the learner loads.

:func:`experiment_contract` takes those fields from an experiment as ``{dotted field: value}``.
Every spiral client sends its process's contract as the gRPC metadata
:data:`CONTRACT_METADATA_KEY` (:func:`with_contract` wraps a channel), and every spiral server
compares it with its own (:class:`spiral.rpc.interceptors.ContractInterceptor`), answering a
caller that differs with ``FAILED_PRECONDITION``::

    experiment mismatch: env.paint.grid_size is 8 here, 16 at the caller

A call without the metadata (a health probe, ``grpcurl``, a test's bare stub) is not checked.
A service process states its contract once, at start (:func:`declare_process_contract`); its
channels and its server then use it unless one is passed explicitly.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable, Mapping

import grpc

from spiral.config import ExperimentConfig, to_dict

CONTRACT_METADATA_KEY = "spiral-experiment-contract"
"""The gRPC metadata key that carries a caller's contract (JSON of ``{dotted field: value}``)."""

Contract = Mapping[str, Any]
"""``{dotted field: plain value}``, e.g. ``{"env.paint.grid_size": 8, ...}``."""

_PAINT_FIELDS = ("canvas_size", "grid_size", "brush_sizes", "use_color", "gray_levels", "use_pressure")
_SCENE_FIELDS = ("image_size", "grid_size", "num_sizes", "color_bins", "camera_pitch_degrees", "frame_grid")
_POLICY_ARITHMETIC_ONLY = frozenset({"fp32_heads"})


def experiment_contract(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that the services of one run must share (see the module doc)."""
    plain = to_dict(cfg)
    env = plain["env"]
    contract: dict[str, Any] = {f"env.{name}": env[name]
                                for name in ("kind", "episode_length", "conditional", "noise_dim")}
    if cfg.env.kind == "paint":
        contract.update({f"env.paint.{name}": env["paint"][name] for name in _PAINT_FIELDS})
    else:
        contract.update({f"env.mujoco.{name}": env["mujoco"][name] for name in _SCENE_FIELDS})
    contract.update({f"policy.{name}": value for name, value in plain["policy"].items()
                     if name not in _POLICY_ARITHMETIC_ONLY})
    contract.update({f"discriminator.{name}": value for name, value in plain["discriminator"].items()})
    contract["discriminator_learner.objective"] = cfg.discriminator_learner.objective
    return contract


def encode_contract(contract: Contract) -> str:
    """The metadata value of a contract: compact JSON with sorted keys (ASCII)."""
    return json.dumps(dict(contract), sort_keys=True, separators=(",", ":"))


def decode_contract(text: str) -> dict[str, Any]:
    """A contract from its metadata value.

    Raises:
        ValueError: the value is not a JSON object.
    """
    decoded = json.loads(text)
    if not isinstance(decoded, dict):
        raise ValueError(f"expected a JSON object, got {type(decoded).__name__}")
    return decoded


_MISSING = object()


def contract_mismatch(here: Contract, caller: Contract) -> str | None:
    """The refusal message when ``caller``'s contract differs from ``here``, else None.

    Example: ``experiment mismatch: env.paint.grid_size is 8 here, 16 at the caller``; every
    differing field is named, ``;``-separated, in sorted order.
    """
    differing = []
    for name in sorted(set(here) | set(caller)):
        mine, theirs = here.get(name, _MISSING), caller.get(name, _MISSING)
        if mine != theirs:
            differing.append(f"{name} is {'not set' if mine is _MISSING else json.dumps(mine)} here, "
                             f"{'not set' if theirs is _MISSING else json.dumps(theirs)} at the caller")
    if not differing:
        return None
    return "experiment mismatch: " + "; ".join(differing) + (
        " (every service of a run needs the same experiment and --set / SPIRAL_SET overrides)")


# -- this process's contract ----------------------------------------------------------------------

_declared: dict[str, Any] | None = None


def declare_process_contract(cfg: ExperimentConfig | None) -> dict[str, Any] | None:
    """State the contract of this service process (None: none), which its channels
    (:func:`spiral.rpc.client.make_channel`) send and its servers
    (:func:`spiral.rpc.server.build_server`) check unless given another.

    Returns:
        The contract declared.
    """
    global _declared
    _declared = None if cfg is None else experiment_contract(cfg)
    return _declared


def process_contract() -> dict[str, Any] | None:
    """The contract :func:`declare_process_contract` stated, or None."""
    return _declared


# -- the client side -------------------------------------------------------------------------------

class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    """A call's details with other metadata (gRPC's own class cannot be built by hand)."""


class _ContractClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the contract's metadata to every call on a channel."""

    def __init__(self, contract: Contract) -> None:
        self._entry = (CONTRACT_METADATA_KEY, encode_contract(contract))

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        fields = {name: getattr(details, name, None) for name in _CallDetails._fields}
        fields["metadata"] = [*(fields["metadata"] or ()), self._entry]
        return _CallDetails(**fields)

    def intercept_unary_unary(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: grpc.ClientCallDetails,
                               request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable, details: grpc.ClientCallDetails,
                                request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def with_contract(channel: grpc.Channel, contract: Contract | None) -> grpc.Channel:
    """``channel`` sending ``contract`` with every call (``channel`` itself when it is None)."""
    if contract is None:
        return channel
    return grpc.intercept_channel(channel, _ContractClientInterceptor(contract))
