"""Domain objects <-> protobuf messages: unrolls and replay items, validated on arrival.

The learner and the replay buffer receive arrays from many actors; a single malformed or
inconsistent message must be refused with a precise reason, never crash the service or
corrupt a batch. The decoders here check every tensor (dtype, shape, byte count, finite
values, see :mod:`spiral.rpc.tensors`) and then the meaning of the message against what the
receiving experiment expects: the action heads and their ranges (:class:`ActionSpec`), the
image shape, the episode length, the noise size, and whether targets belong in it.

Example::

    msg = encode_unroll(unroll, spec.names, run_id=run_id, member=0)          # actor
    received = decode_unroll(msg, UnrollExpectation.for_experiment(cfg))       # learner
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from spiral.config import ExperimentConfig
from spiral.envs.spec import ActionSpec
from spiral.rpc.errors import InvalidMessage
from spiral.rpc.tensors import decode_tensor, encode_tensor
from spiral.agent.trajectory import Unroll
from spiral.v1 import learner_pb2, replay_pb2

_LOG_PROB_TOLERANCE = 1e-4
"""Rounding slack above 0 accepted in summed log-probabilities."""

ImageShape = tuple[int, int, int]
"""``(height, width, channels)`` of a canvas, render or target."""


def experiment_image_shape(cfg: ExperimentConfig) -> ImageShape:
    """``(H, W, C)`` of the images an experiment's environment renders."""
    size = cfg.env.image_size
    return (size, size, cfg.image_channels)


# ---------------------------------------------------------------------------------------------
# Unrolls (actor -> policy learner)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnrollExpectation:
    """What a receiver accepts in an Unroll.

    Attributes:
        spec: The action space; ``head_names`` must equal ``spec.names``.
        image_shape: ``(H, W, C)`` of canvases and targets.
        conditional: Whether targets must be present (True) or absent (False).
        num_steps: Actions per episode T (``episode_length - 1``), or None for any.
        noise_dim: Size of the noise sample, or None for any.
        max_bytes: Largest tensor accepted, in bytes (None: only the gRPC limit applies).
    """

    spec: ActionSpec
    image_shape: ImageShape
    conditional: bool
    num_steps: int | None = None
    noise_dim: int | None = None
    max_bytes: int | None = None

    @staticmethod
    def for_experiment(cfg: ExperimentConfig, spec: ActionSpec) -> "UnrollExpectation":
        """Expectations derived from an experiment and its action space."""
        return UnrollExpectation(spec=spec, image_shape=experiment_image_shape(cfg), conditional=cfg.env.conditional,
                                 num_steps=cfg.env.episode_length - 1, noise_dim=cfg.env.noise_dim,
                                 max_bytes=cfg.services.max_message_bytes)


@dataclass(frozen=True)
class ReceivedUnroll:
    """A validated unroll and the routing fields that :class:`Unroll` does not hold.

    Attributes:
        unroll: The episodes (``actor_id`` and ``policy_version`` set).
        run_id: The sending actor's process incarnation.
        member: Population member the actor works for.
    """

    unroll: Unroll
    run_id: str
    member: int


def encode_unroll(unroll: Unroll, head_names: Sequence[str], run_id: str = "", member: int = 0) -> learner_pb2.Unroll:
    """Encode ``unroll`` (actions as int64, masks/log-probs/noise as float32)."""
    msg = learner_pb2.Unroll(
        actor_id=unroll.actor_id,
        run_id=run_id,
        member=member,
        policy_version=unroll.policy_version,
        head_names=list(head_names),
        canvases=encode_tensor(np.asarray(unroll.canvases, np.uint8)),
        actions=encode_tensor(np.asarray(unroll.actions, np.int64)),
        masks=encode_tensor(np.asarray(unroll.masks, np.float32)),
        behaviour_log_probs=encode_tensor(np.asarray(unroll.behaviour_log_probs, np.float32)),
        noise=encode_tensor(np.asarray(unroll.noise, np.float32)),
        prior=unroll.prior,
    )
    if unroll.targets is not None:
        msg.targets.CopyFrom(encode_tensor(np.asarray(unroll.targets, np.uint8)))
    return msg


def _check_heads(head_names: Sequence[str], spec: ActionSpec) -> None:
    names = list(head_names)
    unknown = [n for n in names if n not in spec.names]
    if unknown:
        raise InvalidMessage("unknown_head", f"head_names: unknown action head(s) {unknown}; "
                                             f"this experiment's heads are {list(spec.names)}")
    if names != list(spec.names):
        raise InvalidMessage("heads", f"head_names: {names} must be exactly {list(spec.names)} in this order")


def decode_unroll(msg: learner_pb2.Unroll, expect: UnrollExpectation) -> ReceivedUnroll:
    """Decode and validate an Unroll message.

    Raises:
        InvalidMessage: Naming the field and the problem (reasons: ``missing_field``,
            ``unknown_head``, ``heads``, ``dtype``, ``shape``, ``byte_count``, ``too_large``,
            ``nonfinite``, ``action_range``, ``mask``, ``version``, ``inconsistent``,
            ``unexpected_field``).
    """
    if not msg.actor_id:
        raise InvalidMessage("missing_field", "actor_id is empty")
    if msg.policy_version < 0:
        raise InvalidMessage("version", f"policy_version must be >= 0, got {msg.policy_version}")
    _check_heads(msg.head_names, expect.spec)
    for name in ("canvases", "actions", "masks", "behaviour_log_probs", "noise"):
        if not msg.HasField(name):
            raise InvalidMessage("missing_field", f"{name} is missing")
    has_targets = msg.HasField("targets")
    if expect.conditional and not has_targets:
        raise InvalidMessage("missing_field", "targets are required in a conditional run")
    if not expect.conditional and has_targets:
        raise InvalidMessage("unexpected_field", "targets were sent, but this run is unconditional")

    k = expect.spec.num_heads
    t = expect.num_steps
    h, w, c = expect.image_shape
    limit = expect.max_bytes
    actions = decode_tensor(msg.actions, "actions", dtypes=("int64", "int32"), shape=(t, None, k), max_bytes=limit)
    t, b = int(actions.shape[0]), int(actions.shape[1])
    if t < 1 or b < 1:
        raise InvalidMessage("shape", f"actions: shape {list(actions.shape)} holds no steps or no episodes")
    canvases = decode_tensor(msg.canvases, "canvases", dtypes=("uint8",), shape=(t + 1, b, h, w, c), max_bytes=limit)
    masks = decode_tensor(msg.masks, "masks", dtypes=("float32",), shape=(t, b, k), max_bytes=limit)
    log_probs = decode_tensor(msg.behaviour_log_probs, "behaviour_log_probs", dtypes=("float32",), shape=(t, b),
                              max_bytes=limit)
    noise = decode_tensor(msg.noise, "noise", dtypes=("float32",), shape=(b, expect.noise_dim), max_bytes=limit)
    targets = (decode_tensor(msg.targets, "targets", dtypes=("uint8",), shape=(b, h, w, c), max_bytes=limit)
               if has_targets else None)

    try:
        expect.spec.validate_actions(actions)
    except ValueError as exc:
        raise InvalidMessage("action_range", f"actions: {exc}") from None
    if not np.array_equal(masks, expect.spec.masks_for(actions[..., 0])):
        raise InvalidMessage("mask", "masks: do not match the masks the flag head's values imply")
    if np.any(log_probs > _LOG_PROB_TOLERANCE):
        raise InvalidMessage("inconsistent", f"behaviour_log_probs: log-probabilities must be <= 0, "
                                             f"got up to {float(log_probs.max()):.3g}")
    unroll = Unroll(canvases=canvases, actions=actions.astype(np.int64, copy=False), masks=masks,
                    behaviour_log_probs=log_probs, noise=noise, targets=targets,
                    policy_version=int(msg.policy_version), actor_id=msg.actor_id, prior=bool(msg.prior))
    if unroll.prior and not expect.conditional:
        raise InvalidMessage("unexpected_field", "prior: prior programs are examples for program recovery, "
                                                 "which needs a conditional run")
    if unroll.prior and unroll.targets is not None and not np.array_equal(unroll.targets, unroll.final_canvases):
        raise InvalidMessage("inconsistent", "targets: a prior program's targets must be its own final canvases")
    try:
        unroll.validate()
    except ValueError as exc:
        raise InvalidMessage("inconsistent", str(exc)) from None
    return ReceivedUnroll(unroll=unroll, run_id=msg.run_id, member=int(msg.member))


# ---------------------------------------------------------------------------------------------
# Replay items (actor or learner -> replay buffer -> discriminator learner)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderBatch:
    """Final renders of one batch of episodes, as inserted into or sampled from the replay buffer.

    Attributes:
        renders: ``[N, H, W, C]`` uint8 final canvases.
        targets: ``[N, H, W, C]`` uint8 targets (conditional runs), else None.
        policy_versions: ``[N]`` int64 policy version that produced each render.
        actor_ids: Actor that produced each render.
    """

    renders: np.ndarray
    targets: np.ndarray | None
    policy_versions: np.ndarray
    actor_ids: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.renders.shape[0])


def encode_insert_request(renders: np.ndarray, targets: np.ndarray | None, policy_version: int, actor_id: str,
                          member: int = 0) -> replay_pb2.InsertRequest:
    """One actor batch of final renders (and targets) for ``ReplayBuffer.Insert``."""
    msg = replay_pb2.InsertRequest(renders=encode_tensor(np.asarray(renders, np.uint8)), policy_version=policy_version,
                                   actor_id=actor_id, member=member)
    if targets is not None:
        msg.targets.CopyFrom(encode_tensor(np.asarray(targets, np.uint8)))
    return msg


def decode_insert_request(msg: replay_pb2.InsertRequest, image_shape: ImageShape, conditional: bool,
                          max_items: int | None = None) -> RenderBatch:
    """Validate an InsertRequest against the experiment's image shape and mode.

    Raises:
        InvalidMessage: Missing or unexpected field, wrong dtype/shape/byte count, an empty
            batch, more than ``max_items`` renders, or a negative policy version.
    """
    if not msg.actor_id:
        raise InvalidMessage("missing_field", "actor_id is empty")
    if msg.policy_version < 0:
        raise InvalidMessage("version", f"policy_version must be >= 0, got {msg.policy_version}")
    if not msg.HasField("renders"):
        raise InvalidMessage("missing_field", "renders are missing")
    has_targets = msg.HasField("targets")
    if conditional and not has_targets:
        raise InvalidMessage("missing_field", "targets are required in a conditional run (one per render)")
    if not conditional and has_targets:
        raise InvalidMessage("unexpected_field", "targets were sent, but this run is unconditional")
    renders = decode_tensor(msg.renders, "renders", dtypes=("uint8",), shape=(None, *image_shape))
    n = int(renders.shape[0])
    if n == 0:
        raise InvalidMessage("shape", "renders: the batch is empty")
    if max_items is not None and n > max_items:
        raise InvalidMessage("too_large", f"renders: {n} items in one request, at most {max_items}")
    targets = (decode_tensor(msg.targets, "targets", dtypes=("uint8",), shape=(n, *image_shape))
               if has_targets else None)
    return RenderBatch(renders=renders, targets=targets,
                       policy_versions=np.full(n, int(msg.policy_version), np.int64),
                       actor_ids=(msg.actor_id,) * n)


def encode_sample_response(batch: RenderBatch) -> replay_pb2.SampleResponse:
    """A sampled batch for ``ReplayBuffer.Sample``."""
    msg = replay_pb2.SampleResponse(renders=encode_tensor(batch.renders),
                                    policy_versions=[int(v) for v in batch.policy_versions],
                                    actor_ids=list(batch.actor_ids))
    if batch.targets is not None:
        msg.targets.CopyFrom(encode_tensor(batch.targets))
    return msg


def decode_sample_response(msg: replay_pb2.SampleResponse, image_shape: ImageShape | None = None) -> RenderBatch:
    """Decode a sampled batch (validated like anything received).

    Raises:
        InvalidMessage: The tensors or per-item lists disagree.
    """
    shape = (None, *image_shape) if image_shape is not None else (None, None, None, None)
    renders = decode_tensor(msg.renders, "renders", dtypes=("uint8",), shape=shape)
    n = int(renders.shape[0])
    targets = (decode_tensor(msg.targets, "targets", dtypes=("uint8",), shape=renders.shape)
               if msg.HasField("targets") else None)
    if len(msg.policy_versions) != n or len(msg.actor_ids) != n:
        raise InvalidMessage("inconsistent", f"{n} renders but {len(msg.policy_versions)} policy_versions and "
                                             f"{len(msg.actor_ids)} actor_ids")
    return RenderBatch(renders=renders, targets=targets, policy_versions=np.asarray(msg.policy_versions, np.int64),
                       actor_ids=tuple(msg.actor_ids))
