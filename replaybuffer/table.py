"""The replay table: recent final renders, FIFO removal, uniform sampling, rate limiting.

SPIRAL's discriminator learns from renders that recent policies produced (the paper keeps 20
batches). :class:`ReplayTable` is the pure, thread-safe logic of that buffer, modelled on a
Reverb table with a ``Fifo`` remover, a ``Uniform`` sampler and a rate limiter:

* **Capacity / FIFO**: at most ``capacity`` items; inserting into a full table drops the
  oldest item.
* **Uniform sampling**: each item of a sampled batch is drawn independently and uniformly
  from the items held (with replacement, as Reverb's uniform sampler).
* **Rate limiting** (:class:`SampleLimiter`): a sample of ``n`` items is allowed when
  ``size >= min_size`` (*MinSize*) and, if ``samples_per_insert > 0``, when
  ``samples + n <= samples_per_insert * inserts`` (*SampleToInsertRatio*, counted in
  items over the table's lifetime). The ratio bounds how often the discriminator sees each
  render however many actors insert. Inserts are never limited: actors must not stall
  because the discriminator is slow.
* **Waiting**: :meth:`ReplayTable.sample` waits up to ``timeout`` seconds for the limiter to
  allow the sample and then raises :class:`RateLimited` naming the limit that held it; it
  never waits longer, and :meth:`ReplayTable.close` wakes every waiter at once.
* **Checkpoints**: :meth:`ReplayTable.save` writes items and counters to one ``.npz`` file
  atomically; :meth:`ReplayTable.restore` loads them, so a restarted buffer resumes full.

Example::

    table = ReplayTable(capacity=320, min_size=16, samples_per_insert=0.0, seed=0)
    table.insert([ReplayItem(render, target, policy_version=7, actor_id="actor-0")])
    batch = table.sample(16, timeout=5.0)   # raises RateLimited if < 16 items after 5 s
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout written by :meth:`ReplayTable.save`."""


@dataclass(frozen=True)
class ReplayItem:
    """One final render and where it came from.

    Attributes:
        render: ``[H, W, C]`` uint8 final canvas.
        target: ``[H, W, C]`` uint8 target it was painted towards (conditional runs), else None.
        policy_version: Policy parameter version that produced it.
        actor_id: Actor that produced it.
    """

    render: np.ndarray
    target: np.ndarray | None
    policy_version: int
    actor_id: str


@dataclass(frozen=True)
class TableInfo:
    """A consistent snapshot of a table's state and lifetime counters (counted in items)."""

    size: int
    capacity: int
    min_size: int
    samples_per_insert: float
    inserts: int
    samples: int
    newest_policy_version: int
    """Highest policy version among the items held; -1 when empty."""


class RateLimited(TimeoutError):
    """A sample was not allowed within its timeout; ``reason`` says which limit held it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TableClosed(RuntimeError):
    """The table is shutting down and no longer serves samples."""


@dataclass(frozen=True)
class SampleLimiter:
    """MinSize plus SampleToInsertRatio, as one rule.

    Attributes:
        min_size: Items the table must hold before any sample.
        samples_per_insert: Sampled items allowed per inserted item over the table's lifetime
            (0 = no ratio limit).
    """

    min_size: int
    samples_per_insert: float

    def blocked_reason(self, size: int, inserts: int, samples: int, batch_size: int) -> str | None:
        """Why a sample of ``batch_size`` is not allowed now, or None when it is."""
        if size < max(1, self.min_size):
            return f"the table holds {size} items; sampling needs at least min_size {max(1, self.min_size)}"
        if self.samples_per_insert > 0 and samples + batch_size > self.samples_per_insert * inserts:
            return (f"samples_per_insert {self.samples_per_insert:g} reached: {samples} items sampled for "
                    f"{inserts} inserted; {batch_size} more need more inserts")
        return None


class ReplayTable:
    """A FIFO table of :class:`ReplayItem` with uniform sampling and rate limiting (thread-safe).

    Args:
        capacity: Most items held.
        min_size: Items needed before sampling (0 behaves as 1: an empty table cannot be sampled).
        samples_per_insert: Rate limit, see :class:`SampleLimiter` (0 = unlimited).
        seed: Seed of the sampler.
    """

    def __init__(self, capacity: int, min_size: int = 1, samples_per_insert: float = 0.0, seed: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0 <= min_size <= capacity:
            raise ValueError(f"min_size must be in [0, capacity={capacity}], got {min_size}")
        if not (math.isfinite(samples_per_insert) and samples_per_insert >= 0):
            raise ValueError(f"samples_per_insert must be >= 0, got {samples_per_insert}")
        self.capacity = int(capacity)
        self.limiter = SampleLimiter(int(min_size), float(samples_per_insert))
        self._rng = np.random.default_rng(seed)
        self._items: list[ReplayItem] = []
        self._oldest = 0  # index of the oldest item once the ring is full
        self._inserts = 0
        self._samples = 0
        self._closed = False
        self._cond = threading.Condition()

    # -- writing ---------------------------------------------------------------------------

    def insert(self, items: Iterable[ReplayItem]) -> int:
        """Add items (oldest first), dropping the oldest held ones beyond capacity.

        Inserting is allowed while closing, so calls in flight at shutdown still land in the
        final checkpoint.

        Returns:
            The number of items held afterwards.
        """
        with self._cond:
            for item in items:
                if len(self._items) < self.capacity:
                    self._items.append(item)
                else:
                    self._items[self._oldest] = item
                    self._oldest = (self._oldest + 1) % self.capacity
                self._inserts += 1
            self._cond.notify_all()
            return len(self._items)

    # -- reading ---------------------------------------------------------------------------

    def sample(self, batch_size: int, timeout: float = 0.0) -> list[ReplayItem]:
        """Draw ``batch_size`` items uniformly (with replacement) once the limiter allows it.

        Args:
            batch_size: Items wanted (>= 1).
            timeout: Most seconds to wait for the limiter (0: decide at once).

        Raises:
            RateLimited: Still not allowed after ``timeout``; the message names the limit.
            TableClosed: The table was closed before or while waiting.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (math.isfinite(timeout) and timeout >= 0):
            raise ValueError(f"timeout must be a finite number >= 0, got {timeout}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise TableClosed("the replay table is shutting down")
                reason = self.limiter.blocked_reason(len(self._items), self._inserts, self._samples, batch_size)
                if reason is None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RateLimited(reason)
                self._cond.wait(remaining)
            indices = self._rng.integers(0, len(self._items), size=batch_size)
            self._samples += batch_size
            return [self._items[i] for i in indices]

    def info(self) -> TableInfo:
        """A snapshot of size, limits and counters."""
        with self._cond:
            newest = max((item.policy_version for item in self._items), default=-1)
            return TableInfo(size=len(self._items), capacity=self.capacity, min_size=self.limiter.min_size,
                             samples_per_insert=self.limiter.samples_per_insert, inserts=self._inserts,
                             samples=self._samples, newest_policy_version=newest)

    def items(self) -> list[ReplayItem]:
        """The items held, oldest first."""
        with self._cond:
            return self._items[self._oldest:] + self._items[:self._oldest]

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        """Stop serving samples and wake every waiting sampler (it raises :class:`TableClosed`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- checkpoints -----------------------------------------------------------------------

    def save(self, path: Path) -> int:
        """Write items and counters to ``path`` (``.npz``) atomically; returns the items written.

        Raises:
            ValueError: Items disagree in shape or in having a target (the service prevents it).
        """
        with self._cond:
            items = self._items[self._oldest:] + self._items[:self._oldest]
            inserts, samples = self._inserts, self._samples
        arrays: dict[str, np.ndarray] = {
            "format": np.asarray(CHECKPOINT_FORMAT, np.int64),
            "counters": np.asarray([inserts, samples], np.int64),
            "policy_versions": np.asarray([item.policy_version for item in items], np.int64),
            "actor_ids": np.asarray([item.actor_id for item in items], dtype=np.str_),
        }
        if items:
            if len({item.render.shape for item in items}) != 1:
                raise ValueError("cannot checkpoint renders of different shapes")
            with_target = [item.target is not None for item in items]
            if any(with_target) and not all(with_target):
                raise ValueError("cannot checkpoint a mix of items with and without targets")
            arrays["renders"] = np.stack([item.render for item in items]).astype(np.uint8, copy=False)
            if all(with_target):
                arrays["targets"] = np.stack([item.target for item in items]).astype(np.uint8, copy=False)  # type: ignore[misc]
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _atomic_write_bytes(Path(path), buffer.getvalue())
        return len(items)

    def restore(self, path: Path) -> int:
        """Replace contents and counters with a checkpoint's (the newest ``capacity`` items are kept).

        Returns:
            The number of items held afterwards.

        Raises:
            ValueError: The file is not a replay checkpoint or its arrays disagree.
            OSError: The file cannot be read.
        """
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (ValueError, EOFError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not a readable replay checkpoint ({exc})") from None
        if int(arrays.get("format", -1)) != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unknown replay checkpoint format {arrays.get('format')}")
        missing = {"counters", "policy_versions", "actor_ids"} - set(arrays)
        if missing:
            raise ValueError(f"{path}: replay checkpoint lacks {sorted(missing)}")
        versions, actor_ids = arrays["policy_versions"], arrays["actor_ids"]
        renders = arrays.get("renders")
        targets = arrays.get("targets")
        count = len(versions)
        if len(actor_ids) != count or (renders is None and count) or (renders is not None and len(renders) != count) \
                or (targets is not None and len(targets) != count):
            raise ValueError(f"{path}: arrays of the replay checkpoint disagree in length")
        items = [ReplayItem(render=renders[i], target=None if targets is None else targets[i],  # type: ignore[index]
                            policy_version=int(versions[i]), actor_id=str(actor_ids[i]))
                 for i in range(max(0, count - self.capacity), count)]
        inserts, samples = (int(x) for x in arrays["counters"])
        with self._cond:
            self._items = items
            self._oldest = 0
            self._inserts = max(inserts, len(items))
            self._samples = samples
            self._cond.notify_all()
            return len(self._items)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync and rename, so readers never see a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class LocalRenders:
    """A table as its in-process peers see it: a :class:`spiral.core.RenderSink` for actors
    and a render sampler (``sample(batch_size) -> (renders, targets) | None``) for the
    discriminator, as the replay service offers them over gRPC (``spiral local``)."""

    def __init__(self, table: ReplayTable) -> None:
        self.table = table

    def insert(self, renders: np.ndarray, targets: np.ndarray | None, policy_version: int, actor_id: str) -> int:
        """Store ``[B, H, W, C]`` renders (and targets); returns the items held."""
        rows: Iterable[np.ndarray | None] = targets if targets is not None else [None] * len(renders)
        return self.table.insert(ReplayItem(np.asarray(render), None if target is None else np.asarray(target),
                                            int(policy_version), actor_id) for render, target in zip(renders, rows))

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A uniformly sampled batch, or None while the table's rate limiter holds it back."""
        try:
            items = self.table.sample(batch_size)
        except RateLimited:
            return None
        targets = None if items[0].target is None else np.stack([item.target for item in items])
        return np.stack([item.render for item in items]), targets
