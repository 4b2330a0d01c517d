"""Which code a run or an export was made with: spiral's version and the code's commit.

In a checkout the commit is ``git rev-parse HEAD`` of the tree the ``spiral`` package was
imported from. A container image has no ``.git``: its build bakes the commit into
``spiral/_build_info.json`` (``{"commit": "...", "built_at": "...", "image": "..."}``, the
Dockerfile's build arguments ``SPIRAL_COMMIT``, ``SPIRAL_BUILT_AT`` and ``SPIRAL_IMAGE``, which
``deploy/image/build-image.sh`` passes), read when git cannot answer. Where neither knows, the
commit is ``unknown``.

Every service records the code it runs at start: :func:`write_code_record` writes
``RUN_DIR/ROLE/code_version.json`` (:func:`code_record`: the code version, when the image was
built and which image it is, where known).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import spiral

BUILD_INFO_PATH = Path(spiral.__file__).resolve().parent / "_build_info.json"
"""The version file an image build writes (``{"commit": "..."}``); absent in a checkout."""
GIT_TIMEOUT_SECONDS = 10.0
"""How long ``git rev-parse`` may take before the commit counts as unknown."""
UNKNOWN = "unknown"
CODE_RECORD_FILE = "code_version.json"
"""What a service writes into ``RUN_DIR/ROLE/`` at start (:func:`write_code_record`)."""


def code_version() -> dict[str, str]:
    """``{"commit": ..., "source": "git" | "build-info" | "unknown", "version": spiral.__version__}``.

    ``source`` says where the commit came from: the checkout's git, the image's
    :data:`BUILD_INFO_PATH`, or nowhere (then ``commit`` is ``unknown``).
    """
    for source, lookup in (("git", _git_commit), ("build-info", _build_info_commit)):
        commit = lookup()
        if commit:
            return {"commit": commit, "source": source, "version": spiral.__version__}
    return {"commit": UNKNOWN, "source": UNKNOWN, "version": spiral.__version__}


def _git_commit() -> str | None:
    """``HEAD`` of the checkout holding the imported ``spiral`` package, or None outside one."""
    root = BUILD_INFO_PATH.parent.parent
    if not (root / ".git").exists():  # a directory in a clone, a file in a worktree
        return None
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):  # no git binary, or a hung filesystem
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def build_info() -> dict[str, str]:
    """The non-empty string fields of :data:`BUILD_INFO_PATH` (``{}`` when it is absent or unreadable)."""
    try:
        info = json.loads(BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict):
        return {}
    return {str(k): v.strip() for k, v in info.items() if isinstance(v, str) and v.strip()}


def _build_info_commit() -> str | None:
    """The commit baked into :data:`BUILD_INFO_PATH`, or None when the file is absent or unreadable."""
    return build_info().get("commit")


def code_record() -> dict[str, str]:
    """:func:`code_version` plus, where known, ``built_at`` and ``image`` (the build's record;
    ``SPIRAL_IMAGE`` in the environment names the image instead)."""
    info = build_info()
    record = code_version()
    if info.get("built_at"):
        record["built_at"] = info["built_at"]
    image = os.environ.get("SPIRAL_IMAGE", "").strip() or info.get("image")
    if image:
        record["image"] = image
    return record


def write_code_record(directory: Path) -> Path:
    """Write :func:`code_record` to ``DIRECTORY/code_version.json`` (atomically) and return its path."""
    from spiral.runtime.atomic import atomic_write_bytes  # here: the rest of the module needs only the stdlib

    path = Path(directory) / CODE_RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(code_record(), indent=2) + "\n").encode())
    return path
