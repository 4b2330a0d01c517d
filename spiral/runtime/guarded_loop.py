"""Guarded loops: a service's work loop that cannot die or stall without anyone noticing.

Every service with a loop of its own (the policy learner's updates, the discriminator's
updates, the actor's episodes) runs it on a thread under a :class:`GuardedLoop`. The loop calls
``beat()`` once per iteration; every wait inside one iteration is bounded, so a loop that waits
on a peer that is down still beats. The guard notices two failures:

* **the loop raised** (or returned while nobody asked it to stop);
* **the loop stalled**: no beat for ``stall_seconds``, seen by a monitor thread.

On either it logs the failure (with the traceback), turns the process unhealthy at once
(:meth:`GuardedLoop.check`, the ``/healthz`` answer, fails and the failure hooks run: the gRPC
server's health goes NOT_SERVING), and ``linger_seconds`` later sets
:attr:`GuardedLoop.exit_requested`, on which the process's main thread shuts down and exits
with :attr:`GuardedLoop.exit_code` 1. A Kubernetes liveness probe or ``spiral up`` then
restarts the process, which resumes from its last atomic checkpoint; the state of a failed
loop is never checkpointed.

The process's main thread waits like this::

    guard = GuardedLoop("learner", "policy learner updates", cfg.learner.stall_seconds,
                        linger_seconds=cfg.services.failure_linger_seconds)
    guard.on_failure(lambda reason: server.mark_not_serving())
    guard.start(lambda stop, beat: learner.run(stop, beat))
    server.serve_until_signal(stop_event=guard.exit_requested, on_stopping=guard.stop,
                              on_stopped=guard.unless_failed(learner.checkpoint))
    return guard.exit_code

**Fault injection.** ``SPIRAL_INJECT_FAULT=ROLE:KIND@N`` makes the loop of role ``ROLE``
(``learner``, ``discriminator``, ``actor``) fail at its ``N``-th beat, where ``KIND`` is
``raise`` (the iteration raises :class:`InjectedFault`) or ``stall`` (the iteration blocks for
ever). Tests use it to kill a real service's loop; loops of other roles ignore it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Literal

log = logging.getLogger(__name__)

FAULT_ENV = "SPIRAL_INJECT_FAULT"

Beat = Callable[[], None]
Loop = Callable[[threading.Event, Beat], None]
"""A service's loop: runs until the event is set, calling the beat once per iteration."""


class Watchdog:
    """A loop's heartbeat: healthy while the loop beat within ``stall_seconds`` of ``clock()``."""

    def __init__(self, what: str, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not stall_seconds > 0:
            raise ValueError(f"stall_seconds must be > 0, got {stall_seconds}")
        self.what = what
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    @property
    def age(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    def check(self) -> tuple[bool, str]:
        age = self.age
        healthy = age <= self.stall_seconds
        return healthy, (f"{self.what}: last progress {age:.1f} s ago "
                         f"({'within' if healthy else 'over'} the {self.stall_seconds:g} s limit)")


class InjectedFault(RuntimeError):
    """Raised by a loop's beat under ``SPIRAL_INJECT_FAULT`` (tests of the failure path)."""


@dataclass(frozen=True)
class FaultSpec:
    """A fault to inject: ``kind`` at the ``at_beat``-th beat of ``role``'s loop."""

    role: str
    kind: Literal["raise", "stall"]
    at_beat: int

    @classmethod
    def parse(cls, text: str) -> "FaultSpec":
        """Parse ``ROLE:KIND@N``; a malformed value is an error that names the variable."""
        try:
            role, rest = text.split(":", 1)
            kind, at = rest.split("@", 1)
            at_beat = int(at)
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected ROLE:KIND@N, e.g. learner:raise@5") from None
        if kind not in ("raise", "stall"):
            raise ValueError(f"{FAULT_ENV}={text!r}: KIND must be raise or stall, got {kind!r}")
        if at_beat < 1:
            raise ValueError(f"{FAULT_ENV}={text!r}: N must be >= 1")
        return cls(role, kind, at_beat)  # type: ignore[arg-type]

    @classmethod
    def from_environment(cls, role: str) -> "FaultSpec | None":
        """The fault ``SPIRAL_INJECT_FAULT`` asks of ``role``'s loop, if any."""
        text = os.environ.get(FAULT_ENV, "")
        if not text:
            return None
        spec = cls.parse(text)
        return spec if spec.role == role else None


class GuardedLoop:
    """Runs one service loop on a thread and turns its death or stall into an unhealthy exit.

    Args:
        role: The service role (``learner``, ...): log prefix and fault-injection key.
        what: What the loop does, for messages ("policy learner updates").
        stall_seconds: A loop that has not beaten for this long has stalled.
        linger_seconds: After a failure the process stays up, unhealthy, this long before
            :attr:`exit_requested` is set (so probes and the last scrape see why).
        clock: Monotonic seconds (tests inject one and call :meth:`check_stall`).
        monitor_seconds: How often the monitor thread checks for a stall (None: a tenth of
            ``stall_seconds``, at most 1 s; 0: no monitor thread, for tests).
        fault: A fault to inject (default: from ``SPIRAL_INJECT_FAULT``).
    """

    def __init__(self, role: str, what: str, stall_seconds: float, *, linger_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, monitor_seconds: float | None = None,
                 fault: FaultSpec | None | Literal["environment"] = "environment") -> None:
        if linger_seconds < 0:
            raise ValueError(f"linger_seconds must be >= 0, got {linger_seconds}")
        self.role = role
        self.what = what
        self.watchdog = Watchdog(what, stall_seconds, clock)
        self.linger_seconds = linger_seconds
        self.monitor_seconds = min(1.0, stall_seconds / 10) if monitor_seconds is None else monitor_seconds
        self.fault = FaultSpec.from_environment(role) if fault == "environment" else fault
        self.stop_event = threading.Event()
        """Set to ask the loop to finish its iteration and return."""
        self.exit_requested = threading.Event()
        """Set by a signal handler (a requested stop) or ``linger_seconds`` after a failure."""
        self.failure: str | None = None
        """Why the loop failed (None while it has not)."""
        self._hooks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._beats = 0
        self._thread: threading.Thread | None = None
        self._monitor: threading.Thread | None = None

    # -- wiring ------------------------------------------------------------------------------

    def on_failure(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(reason)`` once when the loop fails (e.g. the gRPC health turns NOT_SERVING)."""
        self._hooks.append(hook)

    def start(self, loop: Loop) -> None:
        """Run ``loop(stop_event, beat)`` on a daemon thread (a stalled one must not block exit)."""
        if self._thread is not None:
            raise RuntimeError("a GuardedLoop runs one loop")
        self.watchdog.beat()
        self._thread = threading.Thread(target=self._run, args=(loop,), name=f"{self.role}-loop", daemon=True)
        self._thread.start()
        if self.monitor_seconds > 0:
            self._monitor = threading.Thread(target=self._watch, name=f"{self.role}-watchdog", daemon=True)
            self._monitor.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the loop to return and wait up to ``timeout`` for it (not at all for a stalled one)."""
        self.stop_event.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        thread.join(timeout=0.0 if self.failure is not None else timeout)
        if thread.is_alive():
            log.error("%s did not return within %.0f s of the stop", self.what, timeout)

    def unless_failed(self, action: Callable[[], object]) -> Callable[[], None]:
        """``action`` if the loop has not failed: a failed loop's state is not checkpointed."""
        def guarded() -> None:
            if self.failure is None:
                action()
            else:
                log.warning("not checkpointing after the failure of %s: restart resumes from the last "
                            "checkpoint", self.what)
        return guarded

    # -- state -------------------------------------------------------------------------------

    @property
    def exit_code(self) -> int:
        """The process's exit status: 0 after a requested stop, 1 after a failure."""
        return 0 if self.failure is None else 1

    def check(self) -> tuple[bool, str]:
        """The ``/healthz`` answer: unhealthy once the loop failed or while it is stalled."""
        if self.failure is not None:
            return False, f"{self.what} failed: {self.failure}"
        return self.watchdog.check()

    def beat(self) -> None:
        """The loop's heartbeat (what :meth:`start` hands the loop)."""
        self.watchdog.beat()
        self._beats += 1
        fault = self.fault
        if fault is not None and self._beats == fault.at_beat:
            log.warning("injecting a %s fault into %s at beat %d (%s)", fault.kind, self.what, self._beats, FAULT_ENV)
            if fault.kind == "raise":
                raise InjectedFault(f"injected fault at beat {self._beats} of {self.what}")
            threading.Event().wait()  # a stall: this iteration never ends

    def check_stall(self) -> bool:
        """Fail the loop if it has not beaten for ``stall_seconds``; True if it has failed."""
        if self.failure is None and not self.stop_event.is_set():
            healthy, detail = self.watchdog.check()
            if not healthy:
                self.fail(f"stalled: {detail}")
        return self.failure is not None

    def fail(self, reason: str) -> None:
        """Record the first failure, turn unhealthy, run the hooks and schedule the exit."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.error("%s failed (%s): the process turns unhealthy and exits in %.1f s", self.what, reason,
                  self.linger_seconds)
        for hook in self._hooks:
            try:
                hook(reason)
            except Exception:  # noqa: BLE001 - one broken hook must not keep the process alive
                log.exception("failure hook of %s raised", self.what)
        if self.linger_seconds == 0:
            self.exit_requested.set()
        else:
            timer = threading.Timer(self.linger_seconds, self.exit_requested.set)
            timer.daemon = True
            timer.start()

    # -- threads -----------------------------------------------------------------------------

    def _run(self, loop: Loop) -> None:
        try:
            loop(self.stop_event, self.beat)
        except BaseException as exc:  # noqa: BLE001 - whatever ends the loop ends the process
            log.error("%s raised:\n%s", self.what, "".join(traceback.format_exception(exc)).rstrip())
            self.fail(f"{type(exc).__name__}: {exc}")
            return
        if not self.stop_event.is_set():
            self.fail("the loop returned without being asked to stop")

    def _watch(self) -> None:
        while not self.stop_event.wait(self.monitor_seconds):
            if self.check_stall():
                return
