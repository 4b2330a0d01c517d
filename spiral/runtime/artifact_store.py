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

    def _path(self, relative: str) -> str:
        relative = relative.strip("/")
        return f"{self.root}/{relative}" if relative else self.root

    def url(self, relative: str = "") -> str:
        """The full URI of ``relative``, for messages."""
        relative = relative.strip("/")
        return f"{self.uri}/{relative}" if relative else self.uri

    def put(self, local: Path, relative: str) -> None:
        """Send the local file ``local`` to ``relative`` (replacing what is there), atomically.

        The file is read once: one rewritten meanwhile is sent whole, old or new.

        Raises:
            FileNotFoundError: ``local`` is gone (a checkpoint pruned before it was sent).
            OSError and the backend's errors: the store cannot be written.
        """
        self.put_bytes(Path(local).read_bytes(), relative)

    def put_bytes(self, data: bytes, relative: str) -> None:
        """Write ``data`` to ``relative`` atomically (an object PUT; on ``file://`` a rename)."""
        target = self._path(relative)
        if self._local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            staging = posixpath.join(posixpath.dirname(target),
                                     f".{posixpath.basename(target)}.tmp-{os.getpid()}-{threading.get_ident()}")
            self.fs.pipe_file(staging, data)
            self.fs.mv(staging, target)
        else:
            self.fs.pipe_file(target, data)

    def exists(self, relative: str) -> bool:
        """Whether ``relative`` is a file of the store."""
        self.fs.invalidate_cache()
        return bool(self.fs.isfile(self._path(relative)))

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


CONFIG_FILE = "config.yaml"
"""The experiment a run's learner sent (:mod:`spiral.runtime.service_artifacts`), at the run's root."""
_EXPORT_MANIFEST = "export.json"  # spiral.evaluation.export.MANIFEST_NAME


def fetch_run(uri: str, local_dir: Path) -> Path:
    """Copy what ``spiral sample`` / ``spiral export`` read from a run in a store into ``local_dir``.

    ``uri`` names a run (``s3://bucket/runs/NAME``, or a member of one, ``.../NAME/member-1``):
    its newest ``learner/ckpt-*.pt`` and its ``config.yaml`` are fetched; or one checkpoint
    (``.../learner/ckpt-<version>.pt``) and the config two levels up; or a ``spiral export``
    directory (it holds ``export.json``), fetched whole. Credentials and endpoints come from
    the environment (``AWS_*``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``).

    Returns:
        The local path to read: ``local_dir`` or the fetched checkpoint file.

    Raises:
        FileNotFoundError: ``uri`` holds no run, checkpoint or export.
        ImportError: the ``artifacts`` extra is not installed.
    """
    local_dir = Path(local_dir)
    uri = uri.rstrip("/")
    head, _, name = uri.rpartition("/")
    if _CHECKPOINT.match(name):
        run_root = head.rpartition("/")[0]
        checkpoint = ArtifactStore(head).get(name, local_dir / "learner" / name)
        root_store = ArtifactStore(run_root)
        if root_store.exists(CONFIG_FILE):
            root_store.get(CONFIG_FILE, local_dir / CONFIG_FILE)
        return checkpoint
    store = ArtifactStore(uri)
    if store.exists(_EXPORT_MANIFEST):
        store.get_tree("", local_dir)
        return local_dir
    newest = store.newest_checkpoint("learner")
    if newest is None:
        raise FileNotFoundError(f"{uri}: no learner/ckpt-*.pt, and not a spiral export (no {_EXPORT_MANIFEST})")
    store.get(newest, local_dir / newest)
    if store.exists(CONFIG_FILE):
        store.get(CONFIG_FILE, local_dir / CONFIG_FILE)
    else:  # a population member: the run's config is one level up
        parent = ArtifactStore(head)
        if parent.exists(CONFIG_FILE):
            parent.get(CONFIG_FILE, local_dir / CONFIG_FILE)
    return local_dir
