"""The interfaces between spiral's parts, in the spirit of ``acme/core.py``.

Where parameters, unrolls and renders go, and what a learner does. An actor cannot tell whether
its parameters come from a learner in the same process or over gRPC, and a learner cannot
tell whether its discriminator's do. The in-process implementations (the learners themselves,
:class:`PublishedParameters`, :class:`replaybuffer.table.LocalRenders`) wire the system in one
process (``spiral local``); :mod:`spiral.rpc.peers` implements the same interfaces over the
network (``spiral up``, Kubernetes).

The loops that use them::

    # the actor (actor.actor.Actor.run)
    while not stop.is_set():
        snapshot = parameters.fetch(runner.policy_version)   # ParameterSource
        if snapshot is not None:
            runner.load_parameters(snapshot)
        unroll = runner.run_episode()
        unrolls.submit(unroll)                                 # UnrollSink: Refused / Unavailable
        renders.insert(unroll.final_canvases, unroll.targets, unroll.policy_version, actor_id)

    # a learner (learner.learner.PolicyLearner.run, discriminator.learner.DiscriminatorLearner.run)
    learner.restore()                                          # the newest checkpoint, if any
    while not stop.is_set():
        beat()
        learner.step()                                         # one update, or None without data
    learner.checkpoint()

    # the discriminator's step draws its fake examples from a RenderSampler
    renders, targets = sampler.sample(batch_size) or (None, None)

Failures a peer reports are :class:`PeerFailure`: :class:`Refused` (``stale``: refetch
parameters first) or :class:`Unavailable` (down or busy: retry later, or drop).
"""
from __future__ import annotations

import threading
from typing import Callable, Protocol

import numpy as np

from spiral.runtime.snapshot import ParameterSnapshot
from spiral.agent.trajectory import Unroll


class PeerFailure(RuntimeError):
    """A call to a peer (local or remote) failed. Loops drop the item or back off and go on.

    :class:`spiral.rpc.peers.PeerError` is the remote kind, with the gRPC status.
    """


class Refused(PeerFailure):
    """The peer refused what was sent; sending it again will not help.

    ``stale`` is True when it was well formed but out of date (an unroll acted by a policy too
    many versions old): the sender refetches parameters before sending more.
    """

    def __init__(self, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self._stale = stale

    @property
    def stale(self) -> bool:
        return self._stale


class Unavailable(PeerFailure):
    """The peer is down, busy (a full queue) or too slow right now: try again later."""


class ParameterSource(Protocol):
    """Something that publishes versioned parameters."""

    def fetch(self, have_version: int) -> ParameterSnapshot | None:
        """The latest parameters if newer than ``have_version``, else None."""


class UnrollSink(Protocol):
    """Something that consumes finished episodes (the policy learner)."""

    def submit(self, unroll: Unroll) -> int | None:
        """Hand over one unroll; returns the learner's parameter version when the sink knows it.

        Raises:
            Refused: The unroll was refused (``stale``: its policy is too old).
            Unavailable: The learner is down or its queue stayed full (the unroll is dropped).
        """


class RenderSink(Protocol):
    """Something that stores final renders for the discriminator (the replay buffer)."""

    def insert(self, renders: np.ndarray, targets: np.ndarray | None, policy_version: int, actor_id: str) -> object:
        """Store ``[B, H, W, C]`` uint8 renders (and their targets in conditional mode).

        Raises:
            PeerFailure: They were refused, or the buffer could not take them now.
        """


class RenderSampler(Protocol):
    """Where the discriminator's fake examples come from (the replay buffer)."""

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``(renders, targets)`` uint8 ``[B, H, W, C]`` (targets None when unconditional), or None
        when the buffer cannot serve a batch yet."""


class Learner(Protocol):
    """A service's learner: the policy learner or the discriminator learner."""

    version: int
    """The version of the parameters it publishes; rises with every update and PBT copy."""

    def step(self) -> dict[str, float] | None:
        """One update if the data for it is there (else None, after a bounded wait)."""

    def run(self, stop: threading.Event, beat: Callable[[], None]) -> None:
        """Update until ``stop`` is set, calling ``beat`` once per iteration."""

    def checkpoint(self) -> object:
        """Save an atomic checkpoint of weights, optimiser state and version."""

    def restore(self) -> int | None:
        """Load the newest checkpoint; its version (None when there is none)."""


class PublishedParameters:
    """The latest snapshot a learner publishes; thread-safe, readable as a ParameterSource."""

    def __init__(self, snapshot: ParameterSnapshot) -> None:
        self._snapshot = snapshot
        self._lock = threading.Lock()

    def publish(self, snapshot: ParameterSnapshot) -> None:
        with self._lock:
            if snapshot.version < self._snapshot.version:
                raise ValueError(f"versions only rise: {snapshot.version} < {self._snapshot.version}")
            self._snapshot = snapshot

    @property
    def version(self) -> int:
        with self._lock:
            return self._snapshot.version

    def latest(self) -> ParameterSnapshot:
        with self._lock:
            return self._snapshot

    def fetch(self, have_version: int) -> ParameterSnapshot | None:
        snapshot = self.latest()
        return snapshot if snapshot.version > have_version else None
