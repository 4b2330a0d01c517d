"""TensorBoard event files for the learners: training curves and sample grids.

A :class:`TrainingBoard` is what a learner writes its per-update statistics through, next to
its JSON-lines log. It owns one ``torch.utils.tensorboard.SummaryWriter`` whose event files go
to ``RUN_DIR/tensorboard/ROLE`` for member 0 and ``RUN_DIR/tensorboard/ROLE-MEMBER`` for any
other population member, so ``tensorboard --logdir RUN_DIR/tensorboard`` shows the policy
learner and the discriminator of a run side by side (and ``--logdir runs/NAME`` every member of
a population, each under its own ``member-N/`` directory).

Every finite number of a stats record becomes the scalar ``GROUP/KEY`` (see
:func:`scalar_tag`): ``loss/`` for losses, ``reward/`` for the reward and its parts,
``critic/`` for what the discriminator says, ``policy/`` for the behaviour of the policy,
``optim/`` for the optimizer, ``throughput/`` for timings and counts, and ``stats/`` for any
key no rule knows, so a field added to a stats record later shows up without a change here.
Images (uint8 ``[H, W, C]`` or ``[H, W]``) are written with ``add_image``; an already encoded
picture (an animated GIF of the painting, :meth:`TrainingBoard.encoded_image`) goes into an
image summary as it is, which TensorBoard's image dashboard shows animated.

A board may have a mirror (:class:`spiral.runtime.tracking.BoardMirror`, an experiment
tracker): every scalar, by its tag, and every picture it is given are handed on at the same
step, whether or not the event file could be written.

The writer is opened on the first write (``torch.utils.tensorboard`` is imported only then, so
commands that never train do not import it) and flushed by its background thread every
``flush_seconds``. TensorBoard is an observer and must never stop training: if opening or
writing fails (a full or read-only disk, a missing package) the board logs one warning and
turns itself off for the rest of the process.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from spiral.runtime.tracking import BoardMirror

log = logging.getLogger(__name__)

FALLBACK_GROUP = "stats"
"""The group of keys no rule below knows."""

SKIPPED_KEYS = frozenset({"update"})
"""Record keys not written as scalars: ``update`` is the step every scalar is written at."""

EXACT_GROUPS: Mapping[str, str] = {
    "loss": "loss",
    "gp": "loss",
    "mean_reward": "reward",
    "reconstruction_l2": "reward",
    "wasserstein": "critic",
    "mean_entropy": "policy",
    "mean_rho": "policy",
    "clip_fraction": "policy",
    "blank_fraction": "policy",
    "paint_fraction": "policy",
    "policy_lag": "policy",
    "grad_norm": "optim",
    "learning_rate": "optim",
    "entropy_cost": "optim",
    "seconds": "throughput",
    "frames": "throughput",
}
"""Groups of the keys the learners' records have today."""

PREFIX_GROUPS: tuple[tuple[str, str], ...] = (
    ("critic_", "critic"),
    ("discriminator_", "critic"),
    ("d_", "critic"),
    ("reward_", "reward"),
    ("policy_", "policy"),
)
"""Groups by key prefix, tried in order after the exact names and the suffixes below."""

SUFFIX_GROUPS: tuple[tuple[str, str], ...] = (
    ("_loss", "loss"),
    ("_reward", "reward"),
    ("_per_second", "throughput"),
    ("_seconds", "throughput"),
)
"""Groups by key suffix, tried in order after the exact names."""


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a stats key, ``GROUP/KEY``.

    Exact names (:data:`EXACT_GROUPS`) win, then suffixes (:data:`SUFFIX_GROUPS`), then
    prefixes (:data:`PREFIX_GROUPS`); anything else falls back to :data:`FALLBACK_GROUP`.

    Args:
        key: A stats record key, e.g. ``pg_loss`` or ``d_real``.

    Returns:
        The tag, e.g. ``loss/pg_loss`` or ``critic/d_real``; a key that already names its group
        (``eval/l2_sampled``) is its own tag.
    """
    if "/" in key:
        return key
    group = EXACT_GROUPS.get(key)
    if group is None:
        group = next((g for suffix, g in SUFFIX_GROUPS if key.endswith(suffix)), None)
    if group is None:
        group = next((g for prefix, g in PREFIX_GROUPS if key.startswith(prefix)), FALLBACK_GROUP)
    return f"{group}/{key}"


def board_dir(run_dir: Path, role: str, member: int | str = 0) -> Path:
    """Where a learner's event files go: ``RUN_DIR/tensorboard/ROLE[-MEMBER]``.

    Args:
        run_dir: The service's ``--run-dir``.
        role: ``learner`` or ``discriminator``.
        member: Population member index; member 0 gets no suffix.
    """
    name = role if str(member) == "0" else f"{role}-{member}"
    return Path(run_dir) / "tensorboard" / name


def _finite_number(value: object) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class TrainingBoard:
    """One learner's TensorBoard event files; never raises into training.

    Args:
        run_dir: The service's ``--run-dir``; event files go under :func:`board_dir`.
        role: ``learner`` or ``discriminator``.
        member: Population member index (member 0 gets no directory suffix).
        flush_seconds: How often the writer's background thread flushes to disk.
        mirror: Where every write is also handed (an experiment tracker), or None.
    """

    def __init__(self, run_dir: Path, role: str, member: int | str = 0, flush_seconds: float = 30.0,
                 mirror: BoardMirror | None = None) -> None:
        self.log_dir = board_dir(run_dir, role, member)
        self.flush_seconds = flush_seconds
        self.mirror = mirror
        self._writer: SummaryWriter | None = None
        self._disabled = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """False once a failure turned the board off."""
        return not self._disabled

    def scalars(self, record: Mapping[str, object], step: int) -> int:
        """Write every finite number of ``record`` as the scalar :func:`scalar_tag` at ``step``.

        Args:
            record: A stats record (non-numbers, NaN, infinities and :data:`SKIPPED_KEYS` are left out).
            step: The global step, the learner's parameter version.

        Returns:
            How many scalars were written (0 when the board is off).
        """
        values = {key: number for key, value in record.items()
                  if key not in SKIPPED_KEYS and (number := _finite_number(value)) is not None}
        if self.mirror is not None and values:
            self.mirror.scalars({scalar_tag(key): number for key, number in values.items()}, step)
        with self._lock:
            writer = self._open()
            if writer is None:
                return 0
            try:
                for key, number in values.items():
                    writer.add_scalar(scalar_tag(key), number, global_step=step)
            except Exception as exc:  # noqa: BLE001 - TensorBoard must never stop training
                self._fail("write scalars", exc)
                return 0
        return len(values)

    def image(self, tag: str, image: np.ndarray, step: int) -> bool:
        """Write a uint8 ``[H, W, C]`` (C = 1 or 3) or ``[H, W]`` image at ``step``.

        Args:
            tag: The image's tag, e.g. ``samples/grid``.
            image: The picture; other dtypes are read as floats in [0, 1].
            step: The global step.

        Returns:
            Whether it was written.
        """
        array = np.asarray(image)
        if array.ndim not in (2, 3):
            log.warning("not writing TensorBoard image %s: expected [H, W] or [H, W, C], got shape %s",
                        tag, array.shape)
            return False
        if self.mirror is not None:
            self.mirror.image(tag, array, step)
        with self._lock:
            writer = self._open()
            if writer is None:
                return False
            try:
                writer.add_image(tag, array, global_step=step, dataformats="HWC" if array.ndim == 3 else "HW")
            except Exception as exc:  # noqa: BLE001 - TensorBoard must never stop training
                self._fail("write an image", exc)
                return False
        return True

    def encoded_image(self, tag: str, encoded: bytes, height: int, width: int, channels: int, step: int) -> bool:
        """Write an already encoded image (a PNG, or an animated GIF) of ``height`` x ``width`` at ``step``.

        Args:
            tag: The image's tag, e.g. ``samples/animation``.
            encoded: The file's bytes; TensorBoard serves them as they are, with their own MIME type.
            height, width: The picture's size in pixels.
            channels: 1 (gray) or 3 (RGB).
            step: The global step.

        Returns:
            Whether it was written.
        """
        if self.mirror is not None:
            self.mirror.encoded_image(tag, encoded, step)
        with self._lock:
            writer = self._open()
            if writer is None:
                return False
            try:
                from tensorboard.compat.proto.summary_pb2 import Summary

                image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=encoded)
                writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
            except Exception as exc:  # noqa: BLE001 - TensorBoard must never stop training
                self._fail("write an encoded image", exc)
                return False
        return True

    def flush(self) -> None:
        """Write everything pending to disk now."""
        with self._lock:
            if self._writer is None:
                return
            try:
                self._writer.flush()
            except Exception as exc:  # noqa: BLE001
                self._fail("flush", exc)

    def close(self) -> None:
        """Flush and close the event file (a later write opens a new one) and finish the mirror's run."""
        if self.mirror is not None:
            self.mirror.close()
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is None:
                return
            try:
                writer.close()
            except Exception as exc:  # noqa: BLE001
                self._fail("close", exc)

    def _open(self) -> SummaryWriter | None:
        """The writer, opened on first use; None when the board is off. Call with the lock held."""
        if self._disabled:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=max(1, round(self.flush_seconds)))
            except Exception as exc:  # noqa: BLE001 - ImportError, OSError, ...
                self._fail(f"open {self.log_dir}", exc)
        return self._writer

    def _fail(self, what: str, exc: BaseException) -> None:
        """Log once and turn the board off. Call with the lock held."""
        self._disabled = True
        writer, self._writer = self._writer, None
        log.warning("TensorBoard: could not %s (%s: %s); TensorBoard logging is off for this process, "
                    "training goes on", what, type(exc).__name__, exc)
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already failing; the warning above says why
                pass
