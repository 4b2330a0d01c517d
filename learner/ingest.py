"""The learner's ingest queue: bounded, with backpressure, handing out fixed-size batches; and the pool of prior programs.

Actors submit unrolls of N episodes each (N = their number of environments); the learner
updates on batches of exactly ``batch_size`` episodes. The queue holds at most ``capacity``
episodes: a submitter that finds it full waits (so gRPC flow control slows the actor down
instead of the learner running out of memory) up to a timeout, after which it is told to retry.
:meth:`IngestQueue.take_batch` joins (and if needed splits) queued unrolls into one batch.

Episodes of prior programs (``Unroll.prior``, for program recovery) do not queue: they are not
trained on with the reward, so nothing waits for them. :class:`PriorPool` keeps the newest of
them, and each update reads what is there.
"""

from __future__ import annotations

import collections
import threading
import time

from spiral.core import Unavailable
from spiral.agent.trajectory import Unroll


class QueueFull(Unavailable):
    """The queue stayed full for the whole timeout; the submitter should retry later."""


def split_unroll(unroll: Unroll, first: int) -> tuple[Unroll, Unroll]:
    """Split along the batch axis into the first ``first`` episodes and the rest."""

    def part(sl: slice) -> Unroll:
        return Unroll(
            canvases=unroll.canvases[:, sl], actions=unroll.actions[:, sl], masks=unroll.masks[:, sl],
            behaviour_log_probs=unroll.behaviour_log_probs[:, sl], noise=unroll.noise[sl],
            targets=None if unroll.targets is None else unroll.targets[sl],
            policy_version=unroll.policy_version, actor_id=unroll.actor_id, prior=unroll.prior)

    return part(slice(0, first)), part(slice(first, None))


class IngestQueue:
    """Thread-safe FIFO of unrolls bounded by the number of episodes it holds."""

    def __init__(self, capacity_episodes: int) -> None:
        if capacity_episodes < 1:
            raise ValueError("capacity_episodes must be >= 1")
        self.capacity = capacity_episodes
        self._items: collections.deque[Unroll] = collections.deque()
        self._episodes = 0
        self._cond = threading.Condition()
        self._closed = False
        self._waiting_submitters = 0

    @property
    def depth(self) -> int:
        """Episodes waiting."""
        with self._cond:
            return self._episodes

    @property
    def waiting_submitters(self) -> int:
        """Submitters blocked in :meth:`put` for room right now (pushed back)."""
        with self._cond:
            return self._waiting_submitters

    def put(self, unroll: Unroll, timeout: float) -> None:
        """Queue ``unroll``, waiting up to ``timeout`` seconds for room.

        Raises:
            QueueFull: No room appeared in time.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            # An unroll larger than the whole queue is admitted into an empty queue.
            while self._episodes > 0 and self._episodes + unroll.batch_size > self.capacity and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueFull(f"ingest queue full ({self._episodes}/{self.capacity} episodes)")
                self._waiting_submitters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting_submitters -= 1
            self._items.append(unroll)
            self._episodes += unroll.batch_size
            self._cond.notify_all()

    def take_batch(self, batch_size: int, timeout: float) -> Unroll | None:
        """Exactly ``batch_size`` episodes as one unroll, or None if they did not arrive in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._episodes < batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(remaining)
            parts: list[Unroll] = []
            needed = batch_size
            while needed > 0:
                head = self._items.popleft()
                if head.batch_size > needed:
                    head, rest = split_unroll(head, needed)
                    self._items.appendleft(rest)
                parts.append(head)
                needed -= head.batch_size
            self._episodes -= batch_size
            self._cond.notify_all()
        return parts[0] if len(parts) == 1 else Unroll.concatenate(parts)

    def close(self) -> None:
        """Wake every waiter; later take_batch calls return None once the queue runs short."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class PriorPool:
    """The newest episodes of prior programs, at most ``capacity`` of them (older ones fall out).

    Thread-safe: actors add from the gRPC threads, the update loop reads.
    """

    def __init__(self, capacity_episodes: int) -> None:
        if capacity_episodes < 0:
            raise ValueError("capacity_episodes must be >= 0")
        self.capacity = capacity_episodes
        self._items: collections.deque[Unroll] = collections.deque()
        self._episodes = 0
        self._lock = threading.Lock()

    @property
    def episodes(self) -> int:
        with self._lock:
            return self._episodes

    def add(self, unroll: Unroll) -> None:
        """Keep ``unroll`` (a prior unroll), dropping the oldest episodes beyond the capacity."""
        if not unroll.prior:
            raise ValueError("the prior pool holds episodes of prior programs only")
        with self._lock:
            if self.capacity == 0:
                return
            if unroll.batch_size > self.capacity:
                unroll = split_unroll(unroll, unroll.batch_size - self.capacity)[1]
            self._items.append(unroll)
            self._episodes += unroll.batch_size
            while self._episodes - self._items[0].batch_size >= self.capacity:
                self._episodes -= self._items.popleft().batch_size
            if self._episodes > self.capacity:  # trim the oldest unroll to fit exactly
                oldest = self._items.popleft()
                kept = split_unroll(oldest, self._episodes - self.capacity)[1]
                self._items.appendleft(kept)
                self._episodes = self.capacity

    def newest(self) -> Unroll | None:
        """Every episode held, newest last, as one unroll (None when empty)."""
        with self._lock:
            items = list(self._items)
        if not items:
            return None
        return items[0] if len(items) == 1 else Unroll.concatenate(items)
