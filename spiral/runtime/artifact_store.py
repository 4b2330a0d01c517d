"""A run's artifacts in an object store (S3, GCS) or a directory, through fsspec.

:class:`ArtifactStore` is a thin wrapper over one fsspec filesystem rooted at
``run.artifact_uri/RUN`` (:func:`open_run_store`); paths given to it are relative to that
root and laid out as the run directory is (``learner/ckpt-<version>.pt``,
``member-1/discriminator/...``, ``pbt/state.json``, ``tensorboard/learner/...``), so a copy
of the bucket is a run directory that ``spiral sample`` and ``spiral export`` read.

Writes are atomic where the backend allows it: an object store's PUT makes the whole object
visible at once; on ``file://`` a file is written beside its name and renamed over it. Reads of
a remote file land atomically too (:func:`spiral.runtime.atomic.atomic_write_bytes`), so a
restore that is cut off leaves no torn checkpoint behind. fsspec is imported only here, and
only when a store is opened (the ``artifacts`` extra).
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
from pathlib import Path
from typing import Any, Mapping

from spiral.runtime.atomic import atomic_write_bytes

_CHECKPOINT = re.compile(r"^ckpt-(\d{12})\.pt$")


def member_prefix(member: int, population_size: int) -> str:
    """The run-relative folder of a member's services: ``member-K`` in a population, else ``""``
    (what ``spiral up`` makes locally, see :func:`spiral.commands.layout.plan_layout`)."""
    return f"member-{member}" if population_size > 1 else ""


def is_remote_uri(reference: str | os.PathLike[str]) -> bool:
    """Whether ``reference`` names a store (``s3://``, ``gs://``, ``file://``...) rather than a local path."""
    return "://" in str(reference)


class ArtifactStore:
    """Files under one root of an fsspec filesystem, addressed by run-relative POSIX paths.

    Args:
        uri: The root, e.g. ``s3://bucket/runs/my-run`` (created on the first write).
        options: Keyword arguments of the filesystem (``endpoint_url``, ``client_kwargs``...).
    """

    def __init__(self, uri: str, options: Mapping[str, Any] | None = None) -> None:
        import fsspec  # the artifacts extra: imported only by runs that send artifacts

        self.uri = uri.rstrip("/")
        # Each store gets its own filesystem object: listings are never served from another's cache.
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, skip_instance_cache=True, **dict(options or {}))
        self.root = self.root.rstrip("/")
        self._local = "file" in _protocols(self.fs)
        self._lock = threading.Lock()

    def _path(self, relative: str) -> str:
        relative = relative.strip("/")
        return f"{self.root}/{relative}" if relative else self.root

    def url(self, relative: str = "") -> str:
        """The full URI of ``relative``, for messages."""
        relative = relative.strip("/")
        return f"{self.uri}/{relative}" if relative else self.uri

    def put(self, local: Path, relative: str) -> None:
        """Send the local file ``local`` to ``relative`` (replacing what is there), atomically.

        Raises:
            FileNotFoundError: ``local`` is gone (a checkpoint pruned before it was sent).
            OSError and the backend's errors: the store cannot be written.
        """
        target = self._path(relative)
        if self._local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            staging = posixpath.join(posixpath.dirname(target),
                                     f".{posixpath.basename(target)}.tmp-{os.getpid()}-{threading.get_ident()}")
            self.fs.put_file(str(local), staging)
            self.fs.mv(staging, target)
        else:
            with open(local, "rb") as handle:  # one read: a file rewritten meanwhile is sent whole, old or new
                data = handle.read()
            self.fs.pipe_file(target, data)

    def delete(self, relative: str) -> None:
        """Remove one file; a file already gone is not an error."""
        try:
            self.fs.rm_file(self._path(relative))
        except FileNotFoundError:
            pass

    def list(self, relative: str = "") -> list[str]:
        """Run-relative paths of every file under ``relative`` (recursively), sorted; [] if none."""
        self.fs.invalidate_cache()
        base = self._path(relative)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        start = len(self.root) + 1
        return sorted(path[start:] for path in found
                      if not posixpath.basename(path).startswith("."))

    def checkpoints(self, directory: str) -> list[str]:
        """Run-relative paths of the checkpoints (``ckpt-<version>.pt``) in ``directory``, oldest first."""
        return [p for p in self.list(directory)
                if posixpath.dirname(p) == directory.strip("/") and _CHECKPOINT.match(posixpath.basename(p))]

    def newest_checkpoint(self, directory: str) -> str | None:
        """The run-relative path of the highest-version checkpoint in ``directory``, or None."""
        found = self.checkpoints(directory)
        return found[-1] if found else None

    def get(self, relative: str, local: Path) -> Path:
        """Fetch ``relative`` into the local file ``local`` (written atomically); returns ``local``."""
        atomic_write_bytes(Path(local), self.fs.cat_file(self._path(relative)))
        return Path(local)

    def get_tree(self, relative: str, local_dir: Path) -> list[Path]:
        """Fetch every file under ``relative`` into ``local_dir``, keeping the layout below it."""
        prefix = relative.strip("/")
        fetched = []
        for path in self.list(prefix):
            below = path[len(prefix):].lstrip("/") if prefix else path
            fetched.append(self.get(path, Path(local_dir) / below))
        return fetched


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def open_run_store(artifact_uri: str, run_name: str, options: Mapping[str, Any] | None = None) -> ArtifactStore:
    """The store of run ``run_name`` under ``artifact_uri`` (``run.artifact_uri``): ``URI/RUN``."""
    if not run_name or "/" in run_name:
        raise ValueError(f"run name {run_name!r}: must be one non-empty path segment")
    return ArtifactStore(f"{artifact_uri.rstrip('/')}/{run_name}", options)
