"""A trainer's full training state as flat named tensors (what a PBT copy moves), free of networking.

Population-based training's *exploit* step makes a member a copy of a donor: the policy
learner takes the donor learner's policy weights **and** Adam state, and the member's
discriminator takes the donor discriminator's weights and Adam state. Both travel as one flat
``{name: numpy array}`` mapping, the *training state*:

* ``"<module>/<state_dict name>"``: the network's weights and persistent buffers
  (``module`` is ``policy``, or :data:`DISCRIMINATOR_STATE_NAME` for the discriminator);
* ``"optimizer/<param_index>/<key>"``: the optimiser's per-parameter state, indexed like
  ``torch.optim.Optimizer.state_dict()["state"]`` (the position of the parameter in the
  flattened parameter groups), e.g. ``optimizer/3/step``, ``optimizer/3/exp_avg``,
  ``optimizer/3/exp_avg_sq`` for Adam. Parameters without state (never stepped) are absent.

Hyperparameters (learning rate, betas, ...) are *not* part of it: PBT sets them separately
(explore), and the receiver keeps its own parameter groups. :mod:`spiral.rpc.training_state`
moves it over the network.

Consistency. A learner's update runs on its own thread while ``GetTrainingState`` runs on a
gRPC thread, and torch releases the GIL inside ``optimizer.step()``, so an export taken during
an update would see half of it. Both learners therefore follow one lock discipline: their
``state_lock`` is held across every change of weights, optimiser state and version together
(an update, a PBT copy), and their ``export_training_state()`` and ``checkpoint()`` read under it.

Applying a copy. Both learners take a copy the same way (:class:`CopyRequest`): the donor's
state is validated when the request arrives, held (:class:`CopySlot`, one at a time: a newer
request replaces an older one) and applied at the start of the next update, never during one;
the learner's version then rises by one and the copy is published like an update.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

DISCRIMINATOR_STATE_NAME = "critic"
"""The discriminator's name in its training state (``critic/<name>``) and in its checkpoints'
trainer state: the name it had when those formats were fixed, kept so that old checkpoints
load and members of either age copy each other."""
OPTIMIZER_PREFIX = "optimizer"
"""Name prefix of optimiser-state tensors in a training state."""
SCALAR_STATE_KEYS = frozenset({"step"})
"""Optimiser state keys that are scalars; every other key must have its parameter's shape."""
_OPTIMIZER_NAME = re.compile(r"^optimizer/(?P<index>\d+)/(?P<key>[A-Za-z_][A-Za-z0-9_]*)$")

TrainingState = dict[str, np.ndarray]

log = logging.getLogger(__name__)


class TrainingStateError(ValueError):
    """A training state does not fit the receiving trainer (names, shapes, dtypes, values)."""


# -- the flat format ------------------------------------------------------------------------------


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU, C-contiguous numpy copy that shares no memory with ``tensor``."""
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format).numpy()


def _flat_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def export_training_state(module_prefix: str, module: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> TrainingState:
    """``module``'s state dict under ``"<module_prefix>/<name>"`` and ``optimizer``'s per-parameter
    state under ``"optimizer/<index>/<key>"``, as CPU, contiguous numpy copies."""
    if not module_prefix or "/" in module_prefix or module_prefix == OPTIMIZER_PREFIX:
        raise ValueError(f"module_prefix must be a non-empty name without '/', not {OPTIMIZER_PREFIX!r}; "
                         f"got {module_prefix!r}")
    tensors: TrainingState = {f"{module_prefix}/{name}": _to_numpy(t) for name, t in module.state_dict().items()}
    state = optimizer.state_dict()["state"]
    for index in sorted(state):
        for key, value in state[index].items():
            name = f"{OPTIMIZER_PREFIX}/{index}/{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = _to_numpy(value)
            elif isinstance(value, (int, float)):
                tensors[name] = np.asarray(value, dtype=np.float32)
            else:
                raise ValueError(f"optimizer state {name} is a {type(value).__name__}; only tensors and numbers "
                                 "can be exported")
    return tensors


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def check_training_state(tensors: Mapping[str, np.ndarray], module_prefix: str, module: torch.nn.Module,
                         optimizer: torch.optim.Optimizer) -> list[str]:
    """Every way ``tensors`` does not fit ``module`` and ``optimizer`` (empty when it fits).

    Checks: the module's entries are exactly its state dict's names, each with the same shape
    and dtype; optimiser entries name an existing parameter index, scalar keys (``step``)
    are scalars, other keys have their parameter's shape and a floating dtype, and every
    stepped parameter has the same set of keys; all floating values are finite; no other names.
    """
    problems: list[str] = []
    own = module.state_dict()
    prefix = f"{module_prefix}/"
    seen: set[str] = set()
    params = _flat_parameters(optimizer)
    keys_by_index: dict[int, set[str]] = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            problems.append(f"{name}: dtype {array.dtype} is not numeric")
            continue
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            problems.append(f"{name}: has NaN or infinite values")
        if name.startswith(prefix):
            key = name[len(prefix):]
            if key not in own:
                problems.append(f"{name}: {module_prefix} has no tensor {key!r}")
                continue
            seen.add(key)
            expected = own[key]
            if tuple(array.shape) != tuple(expected.shape):
                problems.append(f"{name}: shape {list(array.shape)}, expected {list(expected.shape)}")
            elif array.dtype != _numpy_dtype(expected.dtype):
                problems.append(f"{name}: dtype {array.dtype}, expected {_numpy_dtype(expected.dtype)}")
            continue
        match = _OPTIMIZER_NAME.match(name)
        if match is None:
            problems.append(f"{name}: not '{module_prefix}/<name>' or '{OPTIMIZER_PREFIX}/<param_index>/<key>'")
            continue
        index, key = int(match["index"]), match["key"]
        if index >= len(params):
            problems.append(f"{name}: parameter index {index} out of range (the optimizer has {len(params)})")
            continue
        keys_by_index.setdefault(index, set()).add(key)
        if key in SCALAR_STATE_KEYS:
            if array.size != 1:
                problems.append(f"{name}: must be a scalar, got shape {list(array.shape)}")
        elif tuple(array.shape) != tuple(params[index].shape):
            problems.append(f"{name}: shape {list(array.shape)}, expected the parameter's {list(params[index].shape)}")
        elif array.dtype.kind != "f":
            problems.append(f"{name}: dtype {array.dtype}, expected a floating type")
    missing = [key for key in own if key not in seen]
    if missing:
        shown = ", ".join(f"{prefix}{key}" for key in missing[:5])
        problems.append(f"missing {len(missing)} {module_prefix} tensor(s): {shown}{', ...' if len(missing) > 5 else ''}")
    key_sets = {frozenset(keys) for keys in keys_by_index.values()}
    if len(key_sets) > 1:
        problems.append(f"optimizer: parameters carry different state keys: {sorted(sorted(k) for k in key_sets)}")
    return problems


def import_training_state(tensors: Mapping[str, np.ndarray], module_prefix: str, module: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> None:
    """Load a training state into ``module`` and ``optimizer``, all or nothing.

    Everything is validated (:func:`check_training_state`) and converted before anything is
    changed. The module's weights are copied in place (the optimiser keeps its parameter
    references); the optimiser's per-parameter state is replaced (parameters the donor had no
    state for start fresh); its parameter groups (learning rate, betas, ...) stay as they are.

    Raises:
        TrainingStateError: Naming every bad entry; nothing was changed.
    """
    problems = check_training_state(tensors, module_prefix, module, optimizer)
    if problems:
        raise TrainingStateError(f"training state does not fit this {module_prefix} trainer: " + "; ".join(problems))
    prefix = f"{module_prefix}/"
    module_state: dict[str, torch.Tensor] = {}
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        tensor = torch.from_numpy(np.array(value, copy=True))
        if name.startswith(prefix):
            module_state[name[len(prefix):]] = tensor
        else:
            match = _OPTIMIZER_NAME.match(name)
            assert match is not None  # checked above
            key = match["key"]
            if key in SCALAR_STATE_KEYS:
                tensor = tensor.reshape(()).to(torch.float32)
            optimizer_state.setdefault(int(match["index"]), {})[key] = tensor
    groups = optimizer.state_dict()["param_groups"]
    module.load_state_dict(module_state, strict=True)
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})


# -- a PBT copy, applied by a live learner between two updates --------------------------------------


@dataclass
class CopyRequest:
    """A PBT exploit's instruction to a learner: become a copy of a donor before the next update.

    Attributes:
        tensors: The donor's training state (validated by the learner on arrival), or None to
            change the hyperparameters only.
        donor_version: The donor's parameter version the state was taken at (-1: not known).
        hyperparameters: Hyperparameters to set with it (the policy learner's ``learning_rate``
            and ``entropy_cost``: PBT's explore); empty: keep them.
        done: Set once the request was applied, or replaced by a newer one before that.
        applied: Whether it was applied (False if superseded or if applying it failed).
        version: The learner's version right after applying it (-1 before).
    """

    tensors: TrainingState | None
    donor_version: int = -1
    hyperparameters: dict[str, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    applied: bool = False
    version: int = -1

    def finish(self, version: int | None) -> None:
        """Mark the request done: applied, the learner now at ``version``; or (None) not applied."""
        if version is not None:
            self.version, self.applied = int(version), True
        self.done.set()


class CopySlot:
    """The one copy a learner holds until its next update.

    A newer request replaces one not yet applied, whose ``done`` is then set with ``applied``
    False. Thread-safe: requests arrive on gRPC threads, the update loop takes them.
    """

    def __init__(self) -> None:
        self._request: CopyRequest | None = None
        self._lock = threading.Lock()

    @property
    def request(self) -> CopyRequest | None:
        """The request waiting to be applied, if any."""
        with self._lock:
            return self._request

    def put(self, request: CopyRequest) -> CopyRequest:
        """Hold ``request`` (replacing a waiting one) and return it."""
        with self._lock:
            previous, self._request = self._request, request
        if previous is not None:
            previous.finish(None)
        return request

    def take(self) -> CopyRequest | None:
        """The waiting request, now the caller's to apply (None if there is none)."""
        with self._lock:
            request, self._request = self._request, None
        return request

    def apply_waiting(self, apply: Callable[[CopyRequest], int]) -> CopyRequest | None:
        """Apply the waiting request, if any, and mark it done; return it once applied.

        Args:
            apply: Applies a request to the learner (under its ``state_lock``) and returns the
                learner's version after it. A ``ValueError`` it raises is logged and leaves the
                request done but not applied (None is returned).
        """
        request = self.take()
        if request is None:
            return None
        try:
            version = apply(request)
        except ValueError:
            log.exception("could not apply the PBT copy of donor version %d", request.donor_version)
            request.finish(None)
            return None
        request.finish(version)
        return request
