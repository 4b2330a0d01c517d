"""Which code a run or an export was made with: spiral's version and the code's commit.

In a checkout the commit is ``git rev-parse HEAD`` of the tree the ``spiral`` package was
imported from. A container image has no ``.git``: its build bakes the commit into
``spiral/_build_info.json`` (``{"commit": "..."}``), read when git cannot answer. Where neither
knows, the commit is ``unknown``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import spiral

BUILD_INFO_PATH = Path(spiral.__file__).resolve().parent / "_build_info.json"
"""The version file an image build writes (``{"commit": "..."}``); absent in a checkout."""
GIT_TIMEOUT_SECONDS = 10.0
"""How long ``git rev-parse`` may take before the commit counts as unknown."""
UNKNOWN = "unknown"


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


def _build_info_commit() -> str | None:
    """The commit baked into :data:`BUILD_INFO_PATH`, or None when the file is absent or unreadable."""
    try:
        info = json.loads(BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return None
    commit = info.get("commit") if isinstance(info, dict) else None
    return commit.strip() if isinstance(commit, str) and commit.strip() else None
