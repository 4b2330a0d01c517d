"""The built container image: every role starts, locked down the way the manifests run it.

Needs Docker and the image ``make image`` builds (``SPIRAL_IMAGE``, default the kind overlay's
``spiral:0.1.0-cpu``); ``make image-test`` runs this file. Without ``SPIRAL_IMAGE_TESTS=1`` the
tests are skipped, so ``make test`` does not depend on a Docker engine.

Every container runs as the image's user 10001 with a read-only root filesystem, a tmpfs
``/tmp``, all capabilities dropped and no-new-privileges, as ``deploy/base`` declares. A server
that started and answers gRPC health (or ``/healthz``) under those settings wrote nothing
outside ``/tmp``: a write anywhere else fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from spiral.commands.layout import free_port
from system_harness import grpc_health, http_get

IMAGE = os.environ.get("SPIRAL_IMAGE", "spiral:0.1.0-cpu")
ROLES = ("actor", "learner", "discriminator", "replaybuffer", "pbt-controller")
LOCKED_DOWN = ["--user", "10001:10001", "--read-only", "--tmpfs", "/tmp:rw,size=2g", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--env", "SPIRAL_CACHE=/tmp/cache"]

pytestmark = pytest.mark.skipif(
    os.environ.get("SPIRAL_IMAGE_TESTS") != "1" or shutil.which("docker") is None,
    reason="image tests run with SPIRAL_IMAGE_TESTS=1 and Docker (make image-test)")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module", autouse=True)
def image() -> str:
    found = docker("image", "inspect", IMAGE, check=False)
    if found.returncode != 0:
        pytest.fail(f"image {IMAGE} is not built: run make image ({found.stderr.strip()})")
    return IMAGE


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    config = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert docker("run", "--rm", *LOCKED_DOWN, IMAGE, "id", "-u").stdout.strip() == "10001"


@pytest.mark.parametrize("role", ROLES)
def test_every_role_answers_help(role: str) -> None:
    result = docker("run", "--rm", *LOCKED_DOWN, IMAGE, "spiral", role, "--help")
    assert result.returncode == 0 and f"spiral {role}" in result.stdout


FAST_PAINT_CHECK = """
import numpy as np
from spiral.config import PaintConfig
from spiral.envs.fast_paint import FastPaintEnv
canvases = []
for compiled in (True, False):
    env = FastPaintEnv(PaintConfig(backend="fast"), num_envs=2, episode_length=3, noise_dim=1, seed=0, compiled=compiled)
    env.reset()
    env.step(np.array([[1, 40, 300, 2, 9], [1, 1000, 5, 0, 4]]))
    canvases.append(env.canvases().astype(int))
assert (canvases[0] < 255).any() and np.abs(canvases[0] - canvases[1]).max() <= 1
print("fast paint compiled ok")
"""


def test_the_fast_renderers_compiled_loop_runs_locked_down() -> None:
    """numba compiles (and caches under /tmp) in a read-only container, and draws what torch draws."""
    result = docker("run", "--rm", *LOCKED_DOWN, IMAGE, "python", "-c", FAST_PAINT_CHECK, check=False)
    assert result.returncode == 0 and "fast paint compiled ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("role,grpc_port", [("replaybuffer", 50053), ("discriminator", 50052),
                                            ("learner", 50051), ("pbt-controller", 50054), ("actor", None)])
def test_every_role_starts_locked_down_and_turns_healthy(role: str, grpc_port: int | None) -> None:
    name = f"spiral-image-test-{role}-{uuid.uuid4().hex[:8]}"
    metrics_port, host_grpc = free_port(), free_port()
    publish = ["--publish", f"127.0.0.1:{metrics_port}:9000"]
    args = ["spiral", role, "--config", "experiments/tiny.yaml", "--run-dir", "/tmp/run",
            "--metrics-port", "9000", "--metrics-address", "0.0.0.0"]
    if grpc_port is not None:
        publish += ["--publish", f"127.0.0.1:{host_grpc}:{grpc_port}"]
        args += ["--listen", f"0.0.0.0:{grpc_port}"]
    docker("run", "--detach", "--name", name, *LOCKED_DOWN, *publish, IMAGE, *args)
    try:
        deadline = time.monotonic() + 180
        healthy = False
        while time.monotonic() < deadline and not healthy:
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            assert state["Running"], f"{role} exited with {state['ExitCode']}:\n{docker('logs', name).stderr[-3000:]}"
            if grpc_port is not None:
                healthy = grpc_health(f"127.0.0.1:{host_grpc}") == "SERVING"
            else:
                try:
                    healthy = http_get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=1.0)[0] == 200
                except OSError:
                    healthy = False
            time.sleep(0.5)
        logs = docker("logs", name)
        assert healthy, f"{role} did not turn healthy:\n{(logs.stdout + logs.stderr)[-3000:]}"
        status, text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "spiral_" in text
    finally:
        docker("rm", "--force", name, check=False)


def test_the_image_records_the_code_it_was_built_from() -> None:
    """The image has no .git: its build baked the commit, the build time and the tag into
    spiral/_build_info.json (deploy/image/build-image.sh passes them), and the tracker is installed."""
    probe = ("import json, wandb; from spiral.runtime.code_version import code_record; "
             "print(json.dumps(code_record()))")
    result = docker("run", "--rm", *LOCKED_DOWN, IMAGE, "python", "-c", probe)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["source"] == "build-info" and record["commit"] not in ("", "unknown"), record
    assert record.get("built_at") and record.get("image"), record
