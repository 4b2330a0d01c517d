"""Artifacts off the cluster (``run.artifact_uri``): a real S3 server (moto's, in this process)
through the real s3fs client.

Covers: a checkpoint and the mirrored records arrive; a learner and a discriminator whose run
directory is empty resume from the bucket alone; a store that vanishes mid-run leaves training
going, counts what it skipped, and receives the newest checkpoint once it is back; ``spiral
sample`` and ``spiral export`` read a run from a URI; the config refuses bad settings by field.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs", reason="the artifacts extra: pip install 'spiral[artifacts]'")
moto_server = pytest.importorskip("moto.server", reason="the test extra: moto[server]")

from discriminator.learner import DiscriminatorLearner  # noqa: E402
from learner.learner import PolicyLearner  # noqa: E402
from spiral.config import ConfigError, ExperimentConfig, experiment_path, load_experiment  # noqa: E402
from spiral.runtime import metrics  # noqa: E402
from spiral.runtime.artifact_store import ArtifactStore, fetch_run, open_run_store  # noqa: E402
from spiral.runtime.artifact_uploader import ArtifactUploader, UploadPlan  # noqa: E402
from spiral.runtime.checkpoint import checkpoint_version, list_checkpoints, save_checkpoint  # noqa: E402
from spiral.runtime.service_artifacts import restore_missing, role_plan, start_service_artifacts  # noqa: E402
from spiral.runtime.service_options import add_service_arguments, resolve_service_options  # noqa: E402

BUCKET = "spiral-artifacts"
# Fail fast while the server is down (no botocore retries): the uploader retries on its own.
FAST_FAILING = {"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """moto's S3 server on a fixed port, which can be stopped and started again (its buckets
    live in this process, so they survive a restart, as a real store's would)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "config_kwargs": FAST_FAILING}


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    server = S3Server()
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)  # what spiral sample / export read
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def tiny(**run: object) -> ExperimentConfig:
    return load_experiment(experiment_path("tiny"), overrides={
        "env": {"paint": {"backend": "fast"}}, "learner": {"compile": False}, "run": dict(run)})


def service_options(role: str, run_dir: Path, items: list[str], name: str = "exp") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_service_arguments(parser)
    return resolve_service_options(role, parser.parse_args(
        ["--config", "tiny", "--run-dir", str(run_dir), "--run-name", name, "--metrics-port", "0",
         "--set", "env.paint.backend=fast", "--set", "learner.compile=false", *(f"--set={i}" for i in items)]))


def artifact_items(server: S3Server, **extra: object) -> list[str]:
    items = [f"run.artifact_uri=s3://{BUCKET}/runs",
             "run.artifact_options={endpoint_url: %s, config_kwargs: {connect_timeout: 1, read_timeout: 5, "
             "retries: {max_attempts: 1}}}" % server.endpoint]
    return items + [f"run.{k}={v}" for k, v in extra.items()]


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (a hang, not a timing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


class FixedRenders:
    """A replay buffer stand-in (pure logic): the same renders and targets every time."""

    def __init__(self, size: int) -> None:
        self.renders = np.full((4, size, size, 1), 128, np.uint8)
        self.targets = np.full((4, size, size, 1), 255, np.uint8)

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return self.renders[:batch_size], self.targets[:batch_size]


def test_a_checkpoint_and_the_mirrored_records_arrive(s3: S3Server, tmp_path: Path) -> None:
    store = open_run_store(f"s3://{BUCKET}/runs", "first", s3.options)
    run_dir = tmp_path / "run"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples" / "latest.png").write_bytes(b"png")
    (run_dir / "learner.jsonl").write_text('{"loss": 1}\n')
    (run_dir / "tensorboard" / "learner").mkdir(parents=True)
    (run_dir / "tensorboard" / "learner" / "events.out").write_bytes(b"event")
    plan = UploadPlan(checkpoint_dirs=("learner",), mirrored=("samples", "learner.jsonl", "tensorboard/learner"),
                      remote_prefix="member-1", keep=2, documents=(("config.yaml", b"name: first\n"),))
    uploader = ArtifactUploader(store, run_dir, plan, sync_seconds=3600, role="learner", member=1).start()
    for version in (1, 2, 3):
        save_checkpoint(run_dir / "learner", version, {"w": torch.full((2,), float(version))})
    (run_dir / "learner.jsonl").write_text('{"loss": 1}\n{"loss": 0.5}\n')  # changed: sent again at close
    assert uploader.close(timeout=30)
    found = store.list()
    assert "config.yaml" in found
    assert {"member-1/samples/latest.png", "member-1/learner.jsonl", "member-1/tensorboard/learner/events.out"} \
        <= set(found)
    remote = store.checkpoints("member-1/learner")
    assert remote[-1] == "member-1/learner/ckpt-000000000003.pt" and len(remote) <= 2
    local = tmp_path / "back.jsonl"
    store.get("member-1/learner.jsonl", local)
    assert local.read_text().count("\n") == 2
    ok = metrics.REGISTRY.get_sample_value("spiral_artifact_uploads_total",
                                           {"role": "learner", "member": "1", "result": "ok"})
    assert ok is not None and ok >= 5


def test_a_learner_and_a_discriminator_restore_from_the_bucket_alone(s3: S3Server, tmp_path: Path) -> None:
    items = artifact_items(s3, artifact_sync_seconds=3600)
    first = service_options("learner", tmp_path / "first", items)
    first.run_dir.mkdir(parents=True)
    learner_uploader = start_service_artifacts(first)
    learner = PolicyLearner(first.config, first.run_dir)
    with torch.no_grad():
        for p in learner.policy.parameters():
            p.add_(0.25)
    learner.version, learner.updates = 7, 7
    learner.checkpoint()
    discriminator_opts = service_options("discriminator", tmp_path / "first", items)
    discriminator_uploader = start_service_artifacts(discriminator_opts)
    size = first.config.env.image_size
    discriminator = DiscriminatorLearner(first.config, first.run_dir, np.zeros((4, size, size, 1), np.uint8),
                                         FixedRenders(size))
    while discriminator.version < 2:
        discriminator.step()
    discriminator.checkpoint()
    assert learner_uploader is not None and learner_uploader.close(timeout=30)
    assert discriminator_uploader is not None and discriminator_uploader.close(timeout=30)

    fresh = service_options("learner", tmp_path / "fresh", items)  # a new pod on an empty volume
    fresh.run_dir.mkdir(parents=True)
    uploader = start_service_artifacts(fresh)
    restored = PolicyLearner(fresh.config, fresh.run_dir)
    assert restored.version == 7 and restored.updates == 7
    for a, b in zip(learner.policy.parameters(), restored.policy.parameters()):
        torch.testing.assert_close(a, b)
    assert uploader is not None
    uploader.close(timeout=30)
    start_service_artifacts(service_options("discriminator", tmp_path / "fresh", items)).close(timeout=30)
    restored_discriminator = DiscriminatorLearner(fresh.config, fresh.run_dir,
                                                  np.zeros((4, size, size, 1), np.uint8), FixedRenders(size))
    assert restored_discriminator.version == discriminator.version
    for a, b in zip(discriminator.discriminator.parameters(),
                    restored_discriminator.discriminator.parameters()):
        torch.testing.assert_close(a, b)


def test_training_goes_on_while_the_store_is_gone_and_the_newest_checkpoint_arrives(s3: S3Server,
                                                                                    tmp_path: Path) -> None:
    cfg = tiny()
    size = cfg.env.image_size
    run_dir = tmp_path / "run"
    store = open_run_store(f"s3://{BUCKET}/runs", "outage", s3.options)
    plan, _ = role_plan("discriminator", 0, cfg)
    uploader = ArtifactUploader(store, run_dir, plan, sync_seconds=3600, role="discriminator", member=0).start()
    discriminator = DiscriminatorLearner(cfg, run_dir, np.zeros((4, size, size, 1), np.uint8), FixedRenders(size))
    discriminator.step()
    discriminator.checkpoint()
    wait_until(lambda: uploader.pending == 0)
    s3.stop()
    try:
        for _ in range(4):  # every checkpoint returns, and updates go on, with no store to send to
            discriminator.step()
            discriminator.checkpoint()
            wait_until(lambda: uploader.failed >= 1)  # the uploader has tried, and keeps the file
        assert discriminator.version >= 5
        newest = checkpoint_version(list_checkpoints(run_dir / "discriminator")[-1])
        assert uploader.skipped >= 1  # checkpoints replaced by newer ones before they could be sent
        assert uploader.pending >= 1
    finally:
        s3.start()  # the store comes back on the same address
    assert uploader.close(timeout=60)
    remote = store.newest_checkpoint("discriminator")
    assert remote is not None and checkpoint_version(Path(remote)) == newest
    skipped = metrics.REGISTRY.get_sample_value("spiral_artifact_skipped_total",
                                                {"role": "discriminator", "member": "0"})
    assert skipped is not None and skipped >= 1


def test_spiral_sample_and_export_read_a_run_from_a_uri(s3: S3Server, tmp_path: Path) -> None:
    from spiral.commands import export as export_command
    from spiral.commands import sample as sample_command

    opts = service_options("learner", tmp_path / "run", artifact_items(s3, artifact_sync_seconds=3600),
                           name="painted")
    opts.run_dir.mkdir(parents=True)
    uploader = start_service_artifacts(opts)
    PolicyLearner(opts.config, opts.run_dir).checkpoint()
    assert uploader is not None and uploader.close(timeout=30)

    uri = f"s3://{BUCKET}/runs/painted"
    parser = argparse.ArgumentParser()
    export_command.register(parser)
    assert export_command.run(parser.parse_args([uri, "--out", str(tmp_path / "export")])) == 0
    assert (tmp_path / "export" / "export.json").is_file()
    parser = argparse.ArgumentParser()
    sample_command.register(parser)
    out = tmp_path / "samples"
    assert sample_command.run(parser.parse_args([uri + "/learner/ckpt-000000000000.pt", "--num", "2",
                                                 "--out", str(out)])) == 0
    assert (out / "canvases.npz").is_file()
    with pytest.raises(FileNotFoundError, match="no learner/ckpt"):
        fetch_run(f"s3://{BUCKET}/runs/nothing-here", tmp_path / "none")


def test_the_pbt_state_is_restored_into_an_empty_directory(tmp_path: Path) -> None:
    store = ArtifactStore((tmp_path / "bucket").as_uri() + "/run")  # file://: the same code, a directory
    source = tmp_path / "source"
    (source / "pbt").mkdir(parents=True)
    (source / "pbt" / "state.json").write_text('{"members": []}')
    (source / "pbt" / "reports.jsonl").write_text("{}\n")
    plan, restored = role_plan("pbt-controller", 0, tiny())
    uploader = ArtifactUploader(store, source, plan, sync_seconds=3600).start()
    assert uploader.close(timeout=10)
    target = tmp_path / "target"
    fetched = restore_missing(store, target, plan, restored, timeout=10)
    assert sorted(p.name for p in fetched) == ["reports.jsonl", "state.json"]
    assert (target / "pbt" / "state.json").read_text() == '{"members": []}'
    assert restore_missing(store, target, plan, restored, timeout=10) == []  # a kept volume wins


def test_spiral_up_names_the_run_for_every_service(tmp_path: Path) -> None:
    from spiral.commands.layout import plan_layout

    layout = plan_layout(tiny(), tmp_path / "config.yaml", tmp_path / "my-run", num_actors=1, population=1)
    for process in layout.processes:
        assert process.args[process.args.index("--run-name") + 1] == "my-run"


@pytest.mark.parametrize("run, field, message", [
    ({"artifact_uri": "ftp://host/x"}, "run.artifact_uri", "must start with one of"),
    ({"artifact_uri": "s3://"}, "run.artifact_uri", "names no bucket"),
    ({"artifact_options": {"endpoint_url": "http://x"}}, "run.artifact_options", "only used with"),
    ({"artifact_uri": "s3://b/p", "artifact_queue": 0}, "run.artifact_queue", ">= 1"),
    ({"artifact_uri": "s3://b/p", "artifact_sync_seconds": 0}, "run.artifact_sync_seconds", "> 0"),
])
def test_bad_artifact_settings_name_the_field(run: dict, field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: .*{message}"):
        tiny(**run)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_a_scheme_whose_package_is_missing_names_it() -> None:
    with pytest.raises(ConfigError, match=r"run.artifact_uri: gs:// needs the Python package 'gcsfs'"):
        tiny(artifact_uri="gs://bucket/runs")


def test_an_unreachable_store_stops_a_service_with_an_empty_run_directory(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    down = S3Server()  # never started: nothing listens on its port
    opts = service_options("learner", tmp_path / "run", artifact_items(down, artifact_restore_seconds=20))
    with pytest.raises(SystemExit, match="run.artifact_uri"):
        start_service_artifacts(opts)
