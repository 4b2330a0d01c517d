"""The run's budget (``learner.max_frames``): when a member is done, and how a process says so.

A member is done once its policy learner has consumed ``learner.max_frames`` environment
steps. The learner then writes a final checkpoint and sample grid and stops updating; its
discriminator stops when every learner it scores for is done, and its actors stop acting. None
of them exits: on Kubernetes a Deployment would restart a process that exits, into a loop. Each
says it is done in three places, through one :class:`RunDone`:

* the Prometheus gauge ``spiral_run_done{member}`` (:data:`spiral.runtime.metrics.RUN_DONE`):
  0 while training, 1 when done (what ``spiral up`` and an autoscaler read);
* the ``/healthz`` detail (:meth:`RunDone.health`), which stays healthy: a done process is not
  broken, and a liveness probe must not restart it;
* the log, once.
"""

from __future__ import annotations

import logging
import threading

from spiral.runtime import metrics

log = logging.getLogger(__name__)


def budget_reached(frames: int, max_frames: int) -> bool:
    """Whether ``frames`` consumed reach the budget ``max_frames`` (0: no budget, never)."""
    return max_frames > 0 and frames >= max_frames


class RunDone:
    """Whether this process's member is done: the ``spiral_run_done`` gauge and the health detail.

    Args:
        member: The population member (the gauge's label; an actor that changes member sets
            :attr:`member`).
        what: What this process is, for the log ("policy learner", ...).
    """

    def __init__(self, member: int | str, what: str) -> None:
        self.member = str(member)
        self.what = what
        self.reason = ""
        """Why it is done (empty while it is not)."""
        self._event = threading.Event()
        metrics.RUN_DONE.labels(self.member)  # the series exists (at 0) from the start

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, reason: str) -> bool:
        """Mark the member done (gauge 1) for ``reason``; True the first time."""
        metrics.RUN_DONE.labels(self.member).set(1)
        if self._event.is_set():
            return False
        self.reason = reason
        self._event.set()
        log.info("%s done: %s", self.what, reason)
        return True

    def clear(self) -> None:
        """Not done (gauge 0): an actor moved to a member that still trains."""
        self._event.clear()
        self.reason = ""
        metrics.RUN_DONE.labels(self.member).set(0)

    def health(self, check: metrics.HealthCheck) -> metrics.HealthCheck:
        """``check`` with ``done: REASON`` in front of its detail once the member is done."""
        def checked() -> tuple[bool, str]:
            healthy, detail = check()
            return healthy, (f"done: {self.reason}; {detail}" if self.is_set else detail)
        return checked
