"""End-to-end on a local kind cluster: ``make kind-up`` then ``make kind-test`` (deploy/kind/).

kind-test.sh waits for every rollout, asserts that the learner's update counter rises and that
scaling the actor Deployment from 2 to 4 raises the environment-step rate, and dumps the
cluster's state and logs when anything fails. It needs Docker (with a reachable daemon) and
kind; where either is missing the test is skipped with that reason. A cluster this test
creates is deleted afterwards; one that existed before is left as it was found.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIND = ROOT / "deploy" / "kind"
CLUSTER = "spiral"

pytestmark = [pytest.mark.kind, pytest.mark.slow, pytest.mark.timeout(3600)]


def _missing_requirement() -> str | None:
    """Why the kind test cannot run here, or None when it can."""
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (the kind tests need Docker, kind and kubectl)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return "Docker is installed but its daemon is not reachable ('docker info' failed)"
    return None


def _cluster_exists() -> bool:
    clusters = subprocess.run(["kind", "get", "clusters"], capture_output=True, text=True, timeout=60)
    return CLUSTER in clusters.stdout.split()


def test_kind_deploy_trains_and_scales_actors() -> None:
    reason = _missing_requirement()
    if reason:
        pytest.skip(reason)
    created = not _cluster_exists()
    try:
        up = subprocess.run(["bash", str(KIND / "kind-up.sh")], capture_output=True, text=True, timeout=1800)
        assert up.returncode == 0, f"kind-up.sh failed:\n{up.stderr[-8000:]}"
        test = subprocess.run(["bash", str(KIND / "kind-test.sh")], capture_output=True, text=True, timeout=1800)
        assert test.returncode == 0, f"kind-test.sh failed:\n{test.stderr[-8000:]}"
        assert "PASS:" in test.stderr
    finally:
        if created:
            subprocess.run(["bash", str(KIND / "kind-down.sh")], capture_output=True, text=True, timeout=600)
