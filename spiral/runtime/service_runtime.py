"""What every service process does around its own work: logging, metrics, torch threads, memory, shutdown.

Each ``spiral ROLE`` entry point calls :func:`start_process` first (log format, Prometheus
endpoint, thread limits, for the learner :func:`spiral.runtime.allocator.retain_freed_memory`, the
code it runs in ``RUN_DIR/ROLE/code_version.json``) and then
runs its own loop (under :class:`spiral.runtime.guarded_loop.GuardedLoop`, whose health check is the
``/healthz`` answer of a liveness probe); :class:`ProgressLog` prints a periodic one-line
progress report (a rate and totals) so a long run is never silent.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from spiral.runtime import metrics
from spiral.runtime.allocator import retain_freed_memory
from spiral.runtime.code_version import write_code_record
from spiral.runtime.service_options import ServiceOptions

log = logging.getLogger(__name__)


def start_process(opts: ServiceOptions, torch_threads: int | None = None, member_in_log: bool = True,
                  health: metrics.HealthCheck | None = None, retain_memory: bool = False) -> None:
    """Configure logging (and torch threads) and start the metrics endpoint of a service process.

    ``health`` is what the endpoint's ``/healthz`` reports (:meth:`GuardedLoop.check`);
    ``retain_memory`` calls :func:`spiral.runtime.allocator.retain_freed_memory` (the policy learner,
    whose CPU updates allocate activations far above glibc's mmap threshold).
    """
    logging.basicConfig(level=os.environ.get("SPIRAL_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {opts.role}{f'[{opts.member}]' if member_in_log else ''} "
                               "%(levelname)s %(name)s: %(message)s")
    log.info("experiment %s (%s)%s", opts.config.name, opts.config_path,
             f" with overrides {' '.join(opts.overrides)}" if opts.overrides else "")
    if torch_threads is not None:
        import torch  # only the services that run networks pay for importing torch

        torch.set_num_threads(max(1, torch_threads))
    if retain_memory:
        retain_freed_memory()  # CPU updates reuse their activations' memory instead of page-faulting it
    if opts.metrics_port:
        metrics.serve_metrics(opts.metrics_port, opts.metrics_address, health=health)
        log.info("metrics on http://%s:%d/metrics", opts.metrics_address, opts.metrics_port)
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    try:  # every role records the code it runs (actors of one member share the file: same code)
        path = write_code_record(opts.run_dir / opts.role)
        log.info("code version in %s", path)
    except OSError as exc:
        log.warning("could not write the code version into %s (%s); the service goes on", opts.run_dir, exc)


class ProgressLog:
    """Logs ``what``'s rate every ``every`` seconds: ``count/s`` since the last line and totals."""

    def __init__(self, what: str, every: float = 10.0) -> None:
        self.what = what
        self.every = every
        self._last_time = time.monotonic()
        self._last_count = 0.0

    def maybe_log(self, count: float, **extra: object) -> None:
        now = time.monotonic()
        if now - self._last_time < self.every:
            return
        rate = (count - self._last_count) / (now - self._last_time)
        details = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        log.info("%s: %.1f/s (total %d) %s", self.what, rate, count, details)
        self._last_time, self._last_count = now, count
