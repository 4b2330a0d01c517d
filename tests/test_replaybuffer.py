"""The replay buffer: the table's logic, its gRPC service on a real server, and the real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from replaybuffer.service import ReplayBufferServicer
from replaybuffer.table import RateLimited, ReplayItem, ReplayTable, TableClosed
from spiral.config import ServicesConfig
from spiral.rpc.client import make_channel
from spiral.rpc.peers import PeerRejected, PeerUnavailable, RemoteRenderSampler, RemoteRenderSink
from spiral.rpc.server import build_server
from spiral.rpc.tensors import encode_tensor
from spiral.v1 import replay_pb2, replay_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SERVICE = "spiral.v1.ReplayBuffer"
SHAPE = (8, 8, 1)
CFG = ServicesConfig(max_message_bytes=1 << 20)


def item(i: int, with_target: bool = False) -> ReplayItem:
    render = np.full(SHAPE, i % 256, np.uint8)
    return ReplayItem(render=render, target=render.copy() if with_target else None, policy_version=i,
                      actor_id=f"a{i % 3}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -------------------------------------------------------------------------------------------
# The table
# -------------------------------------------------------------------------------------------


def test_fifo_eviction_keeps_the_newest_items() -> None:
    table = ReplayTable(capacity=3, min_size=1)
    for i in range(5):
        assert table.insert([item(i)]) == min(i + 1, 3)
    assert [it.policy_version for it in table.items()] == [2, 3, 4]
    table.insert([item(5), item(6)])
    assert [it.policy_version for it in table.items()] == [4, 5, 6]
    info = table.info()
    assert (info.size, info.capacity, info.inserts, info.samples, info.newest_policy_version) == (3, 3, 7, 0, 6)


def test_sampling_is_uniform() -> None:
    table = ReplayTable(capacity=10, min_size=10, seed=1)
    table.insert(item(i) for i in range(10))
    draws = 20_000
    counts = np.bincount([it.policy_version for it in table.sample(draws)], minlength=10)
    expected = draws / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, counts  # 9 degrees of freedom, p = 0.001
    assert table.info().samples == draws
    # After eviction only the held items are drawn.
    table.insert(item(i) for i in range(10, 15))
    assert {it.policy_version for it in table.sample(2000)} == set(range(5, 15))


def test_min_size_holds_samples_back_until_enough_items() -> None:
    table = ReplayTable(capacity=10, min_size=4)
    table.insert([item(0), item(1)])
    with pytest.raises(RateLimited, match="min_size 4"):
        table.sample(1)
    with pytest.raises(RateLimited):
        table.sample(1, timeout=0.05)
    # A waiting sampler is woken by the insert that makes the table big enough.
    threading.Timer(0.2, lambda: table.insert([item(2), item(3)])).start()
    assert len(table.sample(3, timeout=10.0)) == 3


def test_samples_per_insert_limits_the_sample_rate() -> None:
    table = ReplayTable(capacity=100, min_size=1, samples_per_insert=2.0)
    table.insert(item(i) for i in range(4))
    assert len(table.sample(5)) == 5
    assert len(table.sample(3)) == 3  # 8 = 2 * 4 samples allowed
    with pytest.raises(RateLimited, match="samples_per_insert 2 reached: 8 items sampled for 4 inserted"):
        table.sample(1)
    table.insert([item(4)])  # two more samples allowed
    assert len(table.sample(2)) == 2
    with pytest.raises(RateLimited):
        table.sample(1)
    # Inserts are never limited.
    assert table.insert(item(i) for i in range(10)) == 15


def test_close_wakes_waiting_samplers() -> None:
    table = ReplayTable(capacity=4, min_size=2)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            table.sample(1, timeout=30.0)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    table.close()
    waiter.join(5.0)
    assert not waiter.is_alive() and isinstance(errors[0], TableClosed)


def test_table_is_thread_safe_under_concurrent_inserts_and_samples() -> None:
    table = ReplayTable(capacity=50, min_size=1)
    table.insert([item(0)])
    stop = threading.Event()
    sampled: list[int] = []

    def sampler() -> None:
        while not stop.is_set():
            sampled.extend(it.policy_version for it in table.sample(4, timeout=1.0))

    threads = [threading.Thread(target=sampler) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(1, 501):
        table.insert([item(i)])
    stop.set()
    for t in threads:
        t.join(5)
    info = table.info()
    assert info.size == 50 and info.inserts == 501 and info.samples == len(sampled)
    assert [it.policy_version for it in table.items()] == list(range(451, 501))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    table = ReplayTable(capacity=4, min_size=1)
    table.insert(item(i, with_target=True) for i in range(6))
    table.sample(3)
    assert table.save(tmp_path / "replay.npz") == 4
    restored = ReplayTable(capacity=3, min_size=1)
    assert restored.restore(tmp_path / "replay.npz") == 3  # the newest capacity items
    assert [it.policy_version for it in restored.items()] == [3, 4, 5]
    assert restored.items()[0].target is not None and restored.info().inserts == 6
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable replay checkpoint"):
        restored.restore(tmp_path / "junk.npz")


# -------------------------------------------------------------------------------------------
# The service on a real gRPC server
# -------------------------------------------------------------------------------------------


@pytest.fixture()
def replay_server() -> Iterator[tuple[str, ReplayTable]]:
    table = ReplayTable(capacity=40, min_size=8, seed=0)
    servicer = ReplayBufferServicer(table, SHAPE, conditional=True, member=0, max_wait_seconds=2.0)
    server = build_server([servicer.binding()], "127.0.0.1:0", CFG)
    server.start()
    yield server.address, table
    server.stop(grace=0.5, on_stopping=table.close)


def renders(n: int, value: int = 1) -> np.ndarray:
    return np.full((n, *SHAPE), value, np.uint8)


def test_insert_sample_info_round_trip(replay_server: tuple[str, ReplayTable]) -> None:
    address, _ = replay_server
    sink = RemoteRenderSink(address, CFG)
    sampler = RemoteRenderSampler(address, CFG, wait_seconds=0.1, image_shape=SHAPE)
    try:
        assert sink.insert(renders(4, 10), renders(4, 20), policy_version=3, actor_id="actor-a") == 4
        started = time.monotonic()
        assert sampler.sample(4) is None  # below min_size 8: "not yet", not an error
        assert time.monotonic() - started < 10
        inserts_before = metric("spiral_replay_inserts_total", member="0")
        assert sink.insert(renders(6, 11), renders(6, 21), policy_version=4, actor_id="actor-b") == 10
        assert metric("spiral_replay_inserts_total", member="0") == inserts_before + 6
        assert metric("spiral_replay_size_items", member="0") == 10
        batch = sampler.sample(32)
        assert batch is not None
        got, targets = batch
        assert got.shape == (32, *SHAPE) and got.dtype == np.uint8 and targets is not None
        # Each render came with its own target: 10 -> 20, 11 -> 21.
        np.testing.assert_array_equal(targets.astype(int) - got.astype(int), np.full(got.shape, 10))
        assert set(np.unique(got)) == {10, 11}
        info = sink.info()
        assert (info.size, info.capacity, info.inserts, info.samples, info.min_size) == (10, 40, 10, 32, 8)
        assert list(info.item_shape) == list(SHAPE) and info.conditional and info.newest_policy_version == 4
    finally:
        sink.close()
        sampler.close()


def test_bad_inserts_are_refused_counted_and_good_clients_keep_working(
        replay_server: tuple[str, ReplayTable]) -> None:
    address, table = replay_server
    good_errors: list[BaseException] = []
    good_done = [0]
    stop = threading.Event()

    def good_client() -> None:
        sink = RemoteRenderSink(address, CFG)
        try:
            while not stop.is_set():
                sink.insert(renders(2), renders(2), policy_version=1, actor_id="good")
                good_done[0] += 1
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            good_errors.append(exc)
        finally:
            sink.close()

    worker = threading.Thread(target=good_client)
    worker.start()

    def raw(**fields: object) -> replay_pb2.InsertRequest:
        base: dict[str, object] = dict(renders=encode_tensor(renders(2)), targets=encode_tensor(renders(2)),
                                       policy_version=1, actor_id="bad", member=0)
        base.update(fields)
        return replay_pb2.InsertRequest(**{k: v for k, v in base.items() if v is not None})

    floats = np.full((2, *SHAPE), np.nan, np.float32)
    cases = [
        (raw(renders=encode_tensor(renders(2)[:, :4])), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (raw(renders=encode_tensor(floats)), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        (raw(renders=replay_pb2.InsertRequest().renders.__class__(dtype="uint8", shape=[2, 8, 8, 1], data=b"\0" * 7)),
         grpc.StatusCode.INVALID_ARGUMENT, "byte_count"),
        (raw(targets=None), grpc.StatusCode.INVALID_ARGUMENT, "missing_field"),
        (raw(targets=encode_tensor(renders(3))), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (raw(actor_id=""), grpc.StatusCode.INVALID_ARGUMENT, "missing_field"),
        (raw(member=3), grpc.StatusCode.FAILED_PRECONDITION, "wrong_member"),
    ]
    try:
        with make_channel(address, CFG) as channel:
            stub = replay_pb2_grpc.ReplayBufferStub(channel)
            for request, code, reason in cases:
                before = metric("spiral_rejected_messages_total", service=SERVICE, reason=reason)
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Insert(iter([request]), timeout=5)
                assert caught.value.code() == code, (reason, caught.value.details())
                assert caught.value.details().startswith(reason)
                assert metric("spiral_rejected_messages_total", service=SERVICE, reason=reason) == before + 1
            with pytest.raises(grpc.RpcError) as caught:
                stub.Sample(replay_pb2.SampleRequest(batch_size=0), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch_size" in caught.value.details()
        # The peer classes surface refusals as PeerRejected.
        sink = RemoteRenderSink(address, CFG)
        with pytest.raises(PeerRejected) as refused:
            sink.insert(renders(2), None, policy_version=1, actor_id="bad")
        assert "targets are required" in refused.value.details
        # Larger than the message limit: refused before it is sent, not worth retrying.
        with pytest.raises(PeerRejected) as refused:
            sink.insert(renders(12_000), renders(12_000), policy_version=1, actor_id="bad")
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        sink.close()
        time.sleep(0.2)
    finally:
        stop.set()
        worker.join(10)
    assert not good_errors and good_done[0] >= 1
    assert table.info().inserts == 2 * good_done[0]
    assert all(it.actor_id == "good" for it in table.items())


def test_sampler_reports_a_down_buffer() -> None:
    sampler = RemoteRenderSampler(f"127.0.0.1:{free_port()}", CFG, wait_seconds=0.0, call_timeout=1.0,
                                  unavailable_retry_seconds=0.2)
    with pytest.raises(PeerUnavailable):
        sampler.sample(4)
    sampler.close()


# -------------------------------------------------------------------------------------------
# The real process
# -------------------------------------------------------------------------------------------


def _wait_serving(address: str, process: subprocess.Popen[bytes], deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            assert process.poll() is None, "the replay buffer exited during start-up"
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"replay buffer at {address} not SERVING within {deadline} s")


def _start(run_dir: Path, port: int, metrics_port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "spiral.commands.cli", "replaybuffer", "--config", "experiments/tiny.yaml",
                                 "--listen", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port),
                                 "--run-dir", str(run_dir)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes], log: Path) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("the replay buffer did not exit after SIGTERM:\n" + log.read_text())


def test_replaybuffer_process_serves_health_metrics_and_exits_cleanly(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "replaybuffer.log"
    process = _start(tmp_path, port, metrics_port, log)
    try:
        _wait_serving(address, process)
        tiny = (64, 64, 1)
        sink = RemoteRenderSink(address, ServicesConfig())
        batch = np.zeros((16, *tiny), np.uint8)
        assert sink.insert(batch, batch, policy_version=2, actor_id="actor-0") == 16
        with pytest.raises(PeerRejected):
            sink.insert(np.zeros((2, 32, 32, 1), np.uint8), np.zeros((2, 32, 32, 1), np.uint8), 2, "actor-0")
        sink.close()
        sampler = RemoteRenderSampler(address, ServicesConfig(), wait_seconds=0.5, image_shape=tiny)
        got = sampler.sample(8)
        assert got is not None and got[0].shape == (8, *tiny)
        sampler.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'spiral_replay_size_items{member="0"} 16.0' in text
        assert 'spiral_replay_capacity_items{member="0"} 320.0' in text
        assert 'spiral_replay_samples_total{member="0"} 8.0' in text
        assert 'spiral_rejected_messages_total{reason="shape",service="spiral.v1.ReplayBuffer"} 1.0' in text
        assert 'spiral_grpc_server_handled_total{code="OK",method="Insert",service="spiral.v1.ReplayBuffer"}' in text
    except BaseException:
        process.kill()
        process.wait()
        print(log.read_text())
        raise
    assert _stop(process, log) == 0, log.read_text()
    assert (tmp_path / "replaybuffer" / "member-0.npz").exists()

    # A restarted buffer reloads what it held.
    process = _start(tmp_path, port, metrics_port, log)
    try:
        _wait_serving(address, process)
        sampler = RemoteRenderSampler(address, ServicesConfig())
        info = sampler.info()
        assert (info.size, info.inserts, info.capacity) == (16, 16, 320)
        sampler.close()
    finally:
        code = _stop(process, log)
    assert code == 0, log.read_text()
