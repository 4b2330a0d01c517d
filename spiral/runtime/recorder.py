"""What a learner records after each update, in one place for the policy and the discriminator learner.

Like Acme's loggers, a learner hands each update's statistics to one object and goes on
training; :class:`UpdateRecorder` writes them everywhere they are read:

1. **the record**: the stats' numbers (the trainer's stats dataclass, field by field), then
   ``update`` (the parameter version the update published) and the learner's own fields
   (the policy learner's ``frames``, ``seconds``, ``policy_lag``; the discriminator's ``seconds``);
2. **Prometheus**: the updates counter and one loss gauge per loss term, each learner its own
   metrics (:data:`ROLE_METRICS`); the parameter-version gauge follows every version the learner
   publishes, an update's or a PBT copy's (:meth:`UpdateRecorder.version_published`);
3. **the JSON-lines log** ``RUN_DIR/ROLE.jsonl``: ``{"time": ..., **record}``, NaN and
   infinities written as ``null`` (:func:`json_safe`); events between updates (the
   discriminator's PBT copies) go there too (:meth:`UpdateRecorder.event`);
4. **TensorBoard** (:class:`spiral.runtime.tensorboard.TrainingBoard`,
   ``RUN_DIR/tensorboard/ROLE[-MEMBER]``): every finite number of the record at step
   ``update`` and, for a learner that counts frames, ``frames_per_second`` since the previous
   update; sample grids when the learner passes them (:meth:`UpdateRecorder.image`), and
   their stroke animations (:meth:`UpdateRecorder.animation`); with ``tracking.backend`` set,
   the board hands all of it on to the experiment tracker (:mod:`spiral.runtime.tracking`).

It also decides the checkpoint cadence (:meth:`UpdateRecorder.checkpoint_due`,
``checkpoint_every_updates`` and ``checkpoint_every_seconds``). What differs between the learners stays in each: the policy
learner's reward, frame and discriminator-version metrics and its sample grids, the
discriminator's scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from prometheus_client import Counter, Gauge

from spiral.runtime import metrics
from spiral.runtime.tensorboard import TrainingBoard
from spiral.runtime.tracking import BoardMirror


@dataclass(frozen=True)
class LearnerMetrics:
    """The Prometheus metrics a learner updates after every update (each labelled by ``member``).

    Attributes:
        updates_total: Counts updates.
        parameter_version: The version of the published parameters.
        loss: The last update's loss terms (labels ``member`` and ``term``).
    """

    updates_total: Counter
    parameter_version: Gauge
    loss: Gauge


ROLE_METRICS: Mapping[str, LearnerMetrics] = {
    "learner": LearnerMetrics(metrics.LEARNER_UPDATES_TOTAL, metrics.LEARNER_PARAMETER_VERSION,
                              metrics.LEARNER_LOSS),
    "discriminator": LearnerMetrics(metrics.DISCRIMINATOR_UPDATES_TOTAL, metrics.DISCRIMINATOR_PARAMETER_VERSION,
                                    metrics.DISCRIMINATOR_LOSS),
}
"""Each learner role's metrics: ``learner`` (the policy learner) and ``discriminator``."""


def json_safe(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with NaN and infinities as None, so a JSON-lines log stays standard JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def due(every: int, update: int) -> bool:
    """Whether a cadence of ``every`` updates (0: never) falls on ``update``."""
    return bool(every) and update % every == 0


def numeric_fields(stats: Any) -> dict[str, float]:
    """A stats dataclass instance's int and float fields as floats, in field order."""
    return {k: float(v) for k, v in dataclasses.asdict(stats).items() if isinstance(v, (int, float))}


class UpdateRecorder:
    """Records one learner's updates: the JSON-lines log, TensorBoard, Prometheus, the checkpoint cadence.

    Args:
        run_dir: The service's run directory: ``ROLE.jsonl`` and ``tensorboard/`` go there.
        role: ``learner`` or ``discriminator`` (the log's and the board's name, :data:`ROLE_METRICS`).
        member: Population member (metric label; the board of a member other than 0 is ``ROLE-MEMBER``).
        loss_terms: The record keys exported as the loss gauge's terms.
        checkpoint_every: ``checkpoint_every_updates`` (0: no periodic checkpoints).
        checkpoint_every_seconds: ``checkpoint_every_seconds``: a checkpoint is also due after
            an update this long after the last one written (0: off).
        clock: Monotonic seconds (tests inject one).
        mirror: The experiment tracker the board hands its writes on to
            (:func:`spiral.runtime.tracking.open_mirror`), or None.
    """

    def __init__(self, run_dir: Path, role: str, member: int | str, loss_terms: tuple[str, ...],
                 checkpoint_every: int, checkpoint_every_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, mirror: BoardMirror | None = None) -> None:
        if role not in ROLE_METRICS:
            raise ValueError(f"role must be one of {sorted(ROLE_METRICS)}, got {role!r}")
        self.member = str(member)
        self.metrics = ROLE_METRICS[role]
        self.loss_terms = loss_terms
        self.checkpoint_every = checkpoint_every
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self._clock = clock
        self._last_checkpoint = clock()
        """``clock()`` when the last checkpoint was written (or the recorder made)."""
        self.log_path = Path(run_dir) / f"{role}.jsonl"
        """The JSON-lines log: one line per update, and one per event."""
        self.board = TrainingBoard(run_dir, role, member, mirror=mirror)
        self._last_record_wall: float | None = None
        """``time.monotonic()`` at the previous record (frames/s between updates)."""

    def record(self, stats: Any, update: int, fields: Mapping[str, float] | None = None,
               frames_consumed: int | None = None) -> dict[str, float]:
        """Record one update everywhere (see the module docstring) and return its record.

        Args:
            stats: The trainer's stats dataclass; its numbers start the record.
            update: The parameter version the update published.
            fields: The learner's own entries, appended in order after ``update``.
            frames_consumed: Environment steps the update trained on: TensorBoard then also
                gets ``frames_per_second`` since the previous update (None: not a frame counter).
        """
        record = numeric_fields(stats)
        record.update(update=update, **(fields or {}))
        m = self.member
        self.metrics.updates_total.labels(m).inc()
        for term in self.loss_terms:
            if term in record:
                self.metrics.loss.labels(m, term).set(record[term])
        self._append({"time": time.time(), **record})
        scalars = dict(record)
        now = time.monotonic()
        if frames_consumed is not None and self._last_record_wall is not None and now > self._last_record_wall:
            scalars["frames_per_second"] = frames_consumed / (now - self._last_record_wall)
        self._last_record_wall = now
        self.board.scalars(scalars, step=update)
        return record

    def event(self, name: str, fields: Mapping[str, Any]) -> None:
        """One JSON-lines row ``{"time": ..., "event": name, **fields}`` for something between updates."""
        self._append({"time": time.time(), "event": name, **fields})

    def version_published(self, version: int) -> None:
        """Set the parameter-version gauge: call it for every version the learner publishes (at
        start, after each update and after each PBT copy)."""
        self.metrics.parameter_version.labels(self.member).set(version)

    def image(self, tag: str, image: np.ndarray, update: int) -> bool:
        """A sample grid (uint8 ``[H, W, C]`` or ``[H, W]``) on TensorBoard at ``update``; False if the board is off."""
        return self.board.image(tag, image, step=update)

    def animation(self, tag: str, gif: bytes, shape: tuple[int, ...], update: int) -> bool:
        """An animated sample grid (GIF bytes of frames ``[H, W, C]``) on TensorBoard at ``update``; False if the board is off."""
        height, width, channels = shape
        return self.board.encoded_image(tag, gif, height, width, channels, step=update)

    def checkpoint_due(self, update: int) -> bool:
        """Whether the learner should checkpoint after ``update``: every ``checkpoint_every``
        updates, and once ``checkpoint_every_seconds`` passed since :meth:`checkpoint_written`."""
        if due(self.checkpoint_every, update):
            return True
        return (self.checkpoint_every_seconds > 0
                and self._clock() - self._last_checkpoint >= self.checkpoint_every_seconds)

    def checkpoint_written(self) -> None:
        """Note that a checkpoint was just written (the time-based cadence counts from here)."""
        self._last_checkpoint = self._clock()

    def close(self) -> None:
        """Flush and close the TensorBoard event file (and finish the tracker run)."""
        self.board.close()

    def _append(self, row: Mapping[str, Any]) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(json_safe(row)) + "\n")
