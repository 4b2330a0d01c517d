"""Held-out evaluation while training: a background thread that measures snapshots of the policy.

Every ``learner.eval_every_updates`` updates the learner hands :class:`HeldoutEvaluator` a copy
of its policy's weights, taken between two updates on the update thread (a snapshot: the live
module is never read again). The evaluator's own thread loads them into its own policy and
measures the domain's held-out figure (:func:`spiral.evaluation.heldout.heldout_measure`) at
low priority (its thread's nice value raised by :data:`EVAL_NICENESS`) with one torch thread,
then publishes the report, tagged with the parameter version the snapshot was taken at:

* TensorBoard scalars ``eval/l2_sampled``, ``eval/l2_greedy``, ``eval/ratio_sampled``, ... ;
* a ``learner.jsonl`` row ``{"event": "eval", "update": VERSION, "updates": N, ...}``;
* the gauge ``spiral_learner_eval{member, measure}``, one label per measure.

The newest report (:attr:`HeldoutEvaluator.latest`) is PBT's reconstruction fitness
(:func:`learner.population.heldout_fitness`). An evaluation still running when the next is due
makes that one skipped (``spiral_learner_eval_skipped_total``): evaluation never queues up behind
itself nor makes an update wait. A domain without a held-out measure (unconditional faces,
Omniglot, scenes) starts no thread: it logs once why, writes one ``eval`` row with the reason,
and sets no gauge.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Callable, Mapping

import torch

from spiral.config import ExperimentConfig
from spiral.evaluation.heldout import HeldoutReport, HeldoutSet, heldout_measure, no_measure_reason
from spiral.nets import build_policy
from spiral.runtime import metrics
from spiral.runtime.recorder import UpdateRecorder, due

log = logging.getLogger(__name__)

EVAL_NICENESS = 10
"""How much the evaluator's thread raises its nice value (Linux: per thread) above the learner's."""
EVAL_TORCH_THREADS = 1
"""Torch intra-op threads of the evaluator's thread (the update thread keeps its own)."""


def prepare_holdout(cfg: ExperimentConfig) -> HeldoutSet:
    """The run's held-out set (:class:`HeldoutSet` of its dataset, ``learner.eval_episodes``)."""
    from spiral.data import for_experiment

    return HeldoutSet(cfg, for_experiment(cfg), cfg.learner.eval_episodes)


def _limit_this_thread(threads: int, niceness: int) -> None:
    """One torch thread and a higher nice value for the calling thread only.

    ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL threads, but also the
    default that threads started later pick up; a short-lived thread puts that default back,
    so the rest of the process keeps its setting.
    """
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="eval-threads-restore")
    restore.start()
    restore.join()
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + niceness)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: evaluate at the same priority
        log.debug("evaluation thread keeps its priority: %s", exc)


class HeldoutEvaluator:
    """Measures policy snapshots on the held-out set on its own thread (see the module docstring).

    Args:
        cfg: The experiment (``learner.eval_every_updates``, ``eval_episodes``, ``eval_seed``).
        recorder: The learner's recorder (TensorBoard and ``learner.jsonl``).
        member: Population member (metric label).
        holdout: Prepares the held-out set, on the evaluator's thread at its first evaluation
            (default :func:`prepare_holdout`; it may load the dataset and train the digit classifier).
        threads: Torch threads of the evaluation.
    """

    def __init__(self, cfg: ExperimentConfig, recorder: UpdateRecorder, member: str = "0",
                 holdout: Callable[[], HeldoutSet] | None = None, threads: int = EVAL_TORCH_THREADS) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.member = str(member)
        self.every = cfg.learner.eval_every_updates
        self.threads = threads
        self._prepare = holdout or (lambda: prepare_holdout(cfg))
        self._holdout: HeldoutSet | None = None
        self._lock = threading.Condition()
        self._pending: tuple[dict[str, torch.Tensor], int, int] | None = None
        self._busy = False
        self._stop = False
        self.latest: HeldoutReport | None = None
        """The newest report (None before the first evaluation finishes)."""
        self.latest_version = -1
        """The parameter version :attr:`latest` measured."""
        self.evaluations = 0
        self.skipped = 0
        self.failures = 0
        self.thread_ids: set[int] = set()
        """``threading.get_ident()`` of the threads evaluations ran on (the evaluator's own)."""
        self.reason = no_measure_reason(cfg)
        """Why this domain has no held-out measure (None: it has one)."""
        self._thread: threading.Thread | None = None
        if self.reason is not None:
            log.info("no held-out measure for this domain: %s", self.reason)
            self.recorder.event("eval", {"measure": None, "reason": self.reason})
        elif self.every > 0:
            self._thread = threading.Thread(target=self._loop, name=f"heldout-eval-{self.member}", daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        """Whether evaluations run (a cadence is set and the domain has a measure)."""
        return self._thread is not None

    def maybe_submit(self, policy: torch.nn.Module, updates: int, version: int) -> bool:
        """On the update thread, between updates: snapshot ``policy`` if an evaluation is due at
        ``updates``; True when one was handed over. Skipped (and counted) while one runs."""
        if not self.active or not due(self.every, updates):
            return False
        with self._lock:
            if self._busy or self._pending is not None:
                self.skipped += 1
                metrics.LEARNER_EVAL_SKIPPED_TOTAL.labels(self.member).inc()
                log.info("held-out evaluation at update %d skipped: the previous one is still running", updates)
                return False
        return self.submit(policy.state_dict(), updates, version)

    def submit(self, weights: Mapping[str, torch.Tensor], updates: int, version: int) -> bool:
        """Hand over a copy of ``weights`` (a policy ``state_dict``) for evaluation; False when busy."""
        snapshot = {name: tensor.detach().to("cpu", copy=True) for name, tensor in weights.items()}
        with self._lock:
            if self._stop or self._busy or self._pending is not None:
                return False
            self._pending = (snapshot, int(updates), int(version))
            self._lock.notify_all()
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no evaluation is pending or running (tests); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._busy or self._pending is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (an evaluation in progress is abandoned after ``timeout``: nothing is published)."""
        with self._lock:
            self._stop = True
            self._pending = None
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the evaluator's thread ----------------------------------------------------------------

    def _loop(self) -> None:
        policy = None
        limited = False
        while True:
            with self._lock:
                while self._pending is None and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                weights, updates, version = self._pending
                self._pending = None
                self._busy = True
            try:
                started = time.monotonic()
                if not limited:  # at the first evaluation, not before: a learner may never evaluate
                    _limit_this_thread(self.threads, EVAL_NICENESS)
                    limited = True
                if self._holdout is None:
                    self._holdout = self._prepare()
                if policy is None:
                    policy = build_policy(self.cfg)
                policy.load_state_dict(weights)
                self.thread_ids.add(threading.get_ident())
                report = heldout_measure(self.cfg, policy, self._holdout, seed=self.cfg.learner.eval_seed)
                self._publish(report, updates, version, time.monotonic() - started)
            except Exception:  # noqa: BLE001 - evaluation must never stop training
                self.failures += 1
                log.exception("held-out evaluation at update %d failed; training goes on", updates)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    def _publish(self, report: HeldoutReport, updates: int, version: int, seconds: float) -> None:
        with self._lock:
            if self._stop:
                return
            self.latest = report
            self.latest_version = version
            self.evaluations += 1
        measures = {name: value for name, value in report.measures.items() if math.isfinite(value)}
        self.recorder.board.scalars({f"eval/{name}": value for name, value in measures.items()}, step=version)
        self.recorder.event("eval", {"update": version, "updates": updates, "eval_seconds": seconds,
                                     "baseline": report.baseline, "episodes": report.episodes, **report.measures})
        for name, value in measures.items():
            metrics.LEARNER_EVAL.labels(self.member, name).set(value)
        metrics.LEARNER_EVAL.labels(self.member, "update").set(version)
        log.info("held-out evaluation of version %d (%.1f s): %s", version, seconds,
                 ", ".join(f"{name} {value:.4g}" for name, value in measures.items()))
