"""Sending a service's checkpoints and records to ``run.artifact_uri``, on a thread of its own.

:class:`ArtifactUploader` never blocks training: the checkpoint writer only hands it a path
(:func:`spiral.runtime.checkpoint.add_checkpoint_listener`), and every network call happens on
the uploader's thread. What it guarantees, and what it may drop:

* **Each role's newest checkpoint arrives.** Checkpoints wait in one slot per checkpoint
  directory; a newer one replaces a pending older one (the older is *skipped*, and counted),
  so however long the store is unreachable, the newest is what is sent once it is back.
  After a checkpoint is sent, remote checkpoints beyond the newest ``keep`` are deleted.
* **A finished run's final artifacts arrive** when :meth:`ArtifactUploader.close` is given the
  time: it looks once more for changed files and sends what is pending, the final checkpoint
  first, until ``run.artifact_flush_seconds`` pass.
* **Other files are mirrored every** ``run.artifact_sync_seconds``: TensorBoard event files,
  samples, JSON-lines records, PBT state, exports, each sent again when its size or
  modification time changed. At most ``run.artifact_queue`` of them wait; the rest are skipped
  (counted) and picked up by a later sync.

A failed upload (the store unreachable) is retried with a backoff from 0.5 to 30 seconds; the
file stays pending meanwhile. Prometheus: ``spiral_artifact_uploads_total{result}``,
``spiral_artifact_skipped_total``, ``spiral_artifact_pending_files``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from spiral.runtime import metrics
from spiral.runtime.artifact_store import ArtifactStore
from spiral.runtime.checkpoint import add_checkpoint_listener, list_checkpoints, remove_checkpoint_listener

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


@dataclass(frozen=True)
class UploadPlan:
    """What one service sends, as paths relative to its run directory.

    Attributes:
        checkpoint_dirs: Directories whose ``ckpt-*.pt`` the service writes (``learner``).
        mirrored: Files and directories mirrored every sync (``samples``, ``learner.jsonl``).
        remote_prefix: Where the run directory sits in the run's store: ``member-K`` in a
            population, ``""`` otherwise (:func:`spiral.runtime.artifact_store.member_prefix`).
        keep: Remote checkpoints kept per directory (the newest).
        documents: ``(path, bytes)`` written once at start, relative to the store's root (not
            ``remote_prefix``): the learner's ``config.yaml``, which ``spiral sample`` reads.
    """

    checkpoint_dirs: tuple[str, ...] = ()
    mirrored: tuple[str, ...] = ()
    remote_prefix: str = ""
    keep: int = 3
    documents: tuple[tuple[str, bytes], ...] = ()


class ArtifactUploader:
    """A bounded background uploader of one service's run directory (see the module docstring).

    Args:
        store: Where files go (the run's store, ``URI/RUN``).
        run_dir: The service's run directory (``--run-dir``).
        plan: Which files, and where under the store.
        queue_size: Mirrored files pending at most (``run.artifact_queue``).
        sync_seconds: Seconds between looks for changed mirrored files (``run.artifact_sync_seconds``).
        role, member: Labels of the Prometheus metrics.
    """

    def __init__(self, store: ArtifactStore, run_dir: Path, plan: UploadPlan, queue_size: int = 64,
                 sync_seconds: float = 30.0, role: str = "", member: int = 0) -> None:
        self.store = store
        self.run_dir = Path(run_dir)
        self.plan = plan
        self.queue_size = int(queue_size)
        self.sync_seconds = float(sync_seconds)
        self._labels = {"role": role, "member": str(member)}
        self._cond = threading.Condition()
        self._newest: dict[str, Path] = {}
        """Checkpoint directory -> its newest checkpoint not yet sent."""
        self._documents: dict[str, bytes] = dict(plan.documents)
        """Documents of the plan not yet written."""
        self._queue: collections.OrderedDict[Path, None] = collections.OrderedDict()
        """Mirrored files waiting to be sent, oldest first (each once)."""
        self._sent: dict[Path, tuple[int, int]] = {}
        """Mirrored file -> (size, mtime_ns) when it was last sent."""
        self._closing = False
        self._deadline = float("inf")
        self._in_flight = 0
        self.uploaded = 0
        self.failed = 0
        self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="artifact-uploader", daemon=True)
        self._listening = False

    # -- what the service's threads call -----------------------------------------------------

    def start(self) -> "ArtifactUploader":
        """Start the thread, listen for checkpoints, and queue the newest local one of each directory
        (a previous process may have stopped before sending it)."""
        for directory in self.plan.checkpoint_dirs:
            found = list_checkpoints(self.run_dir / directory)
            if found:
                self.checkpoint_written(found[-1])
        add_checkpoint_listener(self.checkpoint_written)
        self._listening = True
        self._thread.start()
        return self

    def checkpoint_written(self, path: Path) -> None:
        """Take ``path`` as its directory's newest checkpoint (a listener: returns at once)."""
        path = Path(path)
        try:
            directory = path.parent.resolve().relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            return  # another service's checkpoint (several services in one test process)
        if directory not in self.plan.checkpoint_dirs:
            return
        with self._cond:
            if directory in self._newest and self._newest[directory] != path:
                self._skip(f"checkpoint {self._newest[directory].name} replaced by {path.name} before it was sent")
            self._newest[directory] = path
            self._update_pending()
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Files waiting (newest checkpoints and queued mirrored files), one being sent included."""
        with self._cond:
            return len(self._newest) + len(self._documents) + len(self._queue) + self._in_flight

    def sync_now(self) -> None:
        """Queue the mirrored files that changed, now rather than at the next sync."""
        self._scan()

    def close(self, timeout: float = 30.0) -> bool:
        """Look once more for changed files, send what is pending for at most ``timeout`` seconds,
        and stop. True when everything was sent."""
        if self._listening:
            remove_checkpoint_listener(self.checkpoint_written)
            self._listening = False
        if not self._thread.is_alive():
            return self.pending == 0
        self._scan()
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._cond.notify_all()
        self._thread.join(timeout=max(0.0, timeout) + 5.0)
        left = self.pending
        if left:
            log.warning("artifact uploader stopped with %d file(s) not sent to %s", left, self.store.url())
        return left == 0

    # -- the uploader's thread ---------------------------------------------------------------

    def _remote(self, local: Path) -> str:
        relative = local.resolve().relative_to(self.run_dir.resolve()).as_posix()
        return f"{self.plan.remote_prefix}/{relative}" if self.plan.remote_prefix else relative

    def _skip(self, why: str) -> None:
        self.skipped += 1
        metrics.ARTIFACT_SKIPPED_TOTAL.labels(**self._labels).inc()
        log.debug("artifact skipped: %s", why)

    def _update_pending(self) -> None:
        metrics.ARTIFACT_PENDING.labels(**self._labels).set(
            len(self._newest) + len(self._documents) + len(self._queue) + self._in_flight)

    def _scan(self) -> None:
        """Queue each mirrored file that is new or changed since it was sent; skip (count) those
        beyond the queue's bound, which a later scan finds again."""
        for entry in self.plan.mirrored:
            root = self.run_dir / entry
            files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) \
                if root.is_dir() else []
            for path in files:
                if path.name.startswith("."):
                    continue  # a temporary file of an atomic write
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if self._sent.get(path) == (stat.st_size, stat.st_mtime_ns):
                    continue
                with self._cond:
                    if path in self._queue:
                        continue
                    if len(self._queue) >= self.queue_size:
                        self._skip(f"{path} (queue full)")
                        continue
                    self._queue[path] = None
                    self._update_pending()
                    self._cond.notify_all()

    def _next(self) -> tuple[str, Path] | None:
        """The next file to send, newest checkpoints first; taken out of its slot or queue."""
        with self._cond:
            if self._documents:
                item = ("document", Path(next(iter(self._documents))))
            elif self._newest:
                directory = next(iter(self._newest))
                item = ("checkpoint", self._newest.pop(directory))
            elif self._queue:
                item = ("mirror", self._queue.popitem(last=False)[0])
            else:
                return None
            self._in_flight = 1
            return item

    def _give_back(self, kind: str, path: Path) -> None:
        """Put a file whose upload failed back where it was (unless a newer checkpoint took its slot)."""
        with self._cond:
            if kind == "document":
                pass  # it stays in _documents until it is written
            elif kind == "checkpoint":
                directory = path.parent.resolve().relative_to(self.run_dir.resolve()).as_posix()
                if directory in self._newest:
                    self._skip(f"checkpoint {path.name} replaced by a newer one while it was being sent")
                else:
                    self._newest[directory] = path
            else:
                self._queue[path] = None
                self._queue.move_to_end(path, last=False)

    def _send(self, kind: str, path: Path) -> None:
        if kind == "document":
            name = path.as_posix()
            self.store.put_bytes(self._documents[name], name)
            with self._cond:
                del self._documents[name]
        elif kind == "checkpoint":
            self.store.put(path, self._remote(path))
            directory = self._remote(path.parent)
            for old in self.store.checkpoints(directory)[:-self.plan.keep]:
                self.store.delete(old)
        else:
            stat = path.stat()
            self.store.put(path, self._remote(path))
            self._sent[path] = (stat.st_size, stat.st_mtime_ns)

    def _run(self) -> None:
        next_sync = time.monotonic() + self.sync_seconds
        backoff = RETRY_FIRST_SECONDS
        while True:
            now = time.monotonic()
            if self._closing and (now >= self._deadline):
                break
            if now >= next_sync and not self._closing:
                self._scan()
                next_sync = now + self.sync_seconds
            item = self._next()
            if item is None:
                with self._cond:
                    if self._newest or self._documents or self._queue:
                        continue  # queued since _next() looked
                    if self._closing:
                        break  # close() looked for changed files before it set _closing: all is sent
                    self._cond.wait(timeout=max(0.0, next_sync - time.monotonic()))
                continue
            kind, path = item
            try:
                self._send(kind, path)
            except FileNotFoundError as exc:
                if kind != "document" and not path.exists():
                    self._skip(f"{path} is gone before it was sent")
                else:
                    self._fail(kind, path, exc)
                    backoff = self._wait_retry(backoff)
                    continue
            except Exception as exc:  # noqa: BLE001 - any store error: keep the file and retry later
                self._fail(kind, path, exc)
                backoff = self._wait_retry(backoff)
                continue
            else:
                self.uploaded += 1
                metrics.ARTIFACT_UPLOADS_TOTAL.labels(result="ok", **self._labels).inc()
                backoff = RETRY_FIRST_SECONDS
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._update_pending()

    def _fail(self, kind: str, path: Path, exc: BaseException) -> None:
        self.failed += 1
        metrics.ARTIFACT_UPLOADS_TOTAL.labels(result="failed", **self._labels).inc()
        log.warning("could not send %s to %s (retrying): %s", path, self.store.url(self._remote(path)), exc)
        self._give_back(kind, path)

    def _wait_retry(self, backoff: float) -> float:
        """Sleep ``backoff`` seconds (less at close, and woken by it); the next backoff."""
        with self._cond:
            wait = min(backoff, max(0.0, self._deadline - time.monotonic())) if self._closing else backoff
            self._cond.wait(timeout=wait)
        return min(backoff * 2, RETRY_MAX_SECONDS)

