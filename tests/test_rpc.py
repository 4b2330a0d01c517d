"""spiral.rpc against real gRPC servers on free loopback ports: codecs, limits, TLS, retries, metrics, peers."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from spiral.config import ExperimentConfig, ServicesConfig, experiment_path, load_experiment, resolve_experiment
from spiral.envs import action_spec_for
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.rpc.client import RetryDeadlineExceeded, RetryPolicy, RetryStopped, call_with_retry, make_channel
from spiral.rpc.contract import contract_mismatch, declare_process_contract, experiment_contract
from spiral.rpc.errors import InvalidMessage, PreconditionFailed, rejects_bad_messages
from spiral.rpc.messages import UnrollExpectation, decode_unroll
from spiral.rpc.parameters import assemble_parameters, chunk_parameters, fetch_parameters, up_to_date_chunk
from spiral.rpc.peers import PeerRejected, PeerUnavailable, RemoteParameterSource, RemoteUnrollSink
from spiral.rpc.publish import ParameterPublisher
from spiral.rpc.server import BindError, ServiceBinding, build_server
from spiral.rpc.tensors import ALLOWED_DTYPES, decode_tensor, encode_tensor
from spiral.rpc.tls import TLSConfigError
from spiral.core import PublishedParameters
from spiral.agent.trajectory import Unroll
from spiral.v1 import (discriminator_pb2, discriminator_pb2_grpc, learner_pb2, learner_pb2_grpc, parameters_pb2,
                       tensor_pb2)

DISC = "spiral.v1.DiscriminatorLearner"
LEARNER = "spiral.v1.PolicyLearner"
CFG = ServicesConfig(max_message_bytes=256 * 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample(name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -------------------------------------------------------------------------------------------
# Tensor codec
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_tensor_round_trip_every_dtype(dtype: str) -> None:
    rng = np.random.default_rng(0)
    if dtype == "bool":
        array = rng.integers(0, 2, size=(3, 4, 5)).astype(bool)
    elif dtype.startswith("float"):
        array = rng.normal(size=(3, 4, 5)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=(3, 4, 5), dtype=dtype, endpoint=True)
    msg = encode_tensor(array)
    wire = tensor_pb2.Tensor.FromString(msg.SerializeToString())
    decoded = decode_tensor(wire, "x")
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_tensor_round_trip_big_endian_noncontiguous_scalar_and_empty() -> None:
    big = np.arange(12, dtype=">i4").reshape(3, 4)
    decoded = decode_tensor(encode_tensor(big), "big")
    np.testing.assert_array_equal(decoded, big)
    assert decoded.dtype.isnative
    strided = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2].T
    np.testing.assert_array_equal(decode_tensor(encode_tensor(strided), "strided"), strided)
    scalar = decode_tensor(encode_tensor(np.float64(2.5)), "scalar")
    assert scalar.shape == () and float(scalar) == 2.5
    empty = decode_tensor(encode_tensor(np.zeros((0, 3), np.uint8)), "empty")
    assert empty.shape == (0, 3)


def test_encode_refuses_unsupported_dtypes() -> None:
    with pytest.raises(ValueError, match="complex"):
        encode_tensor(np.zeros(2, np.complex64))
    with pytest.raises(ValueError):
        encode_tensor(np.array(["a"], dtype=object))


@pytest.mark.parametrize("msg, reason, words", [
    (tensor_pb2.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), "byte_count", "needs 24 bytes, got 20"),
    (tensor_pb2.Tensor(dtype="uint8", shape=[2, -3], data=b""), "shape", "negative"),
    (tensor_pb2.Tensor(dtype="object", shape=[1], data=b"\0" * 8), "dtype", "'object'"),
    (tensor_pb2.Tensor(dtype="", shape=[1], data=b"\0"), "dtype", "(empty)"),
    (tensor_pb2.Tensor(dtype="uint8", shape=[1] * 9, data=b"\0"), "shape", "axes"),
])
def test_malformed_tensors_are_invalid(msg: tensor_pb2.Tensor, reason: str, words: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode_tensor(msg, "renders")
    assert caught.value.reason == reason
    assert words in caught.value.detail and "renders" in caught.value.detail


def test_wrong_dtype_and_shape_expectations_are_invalid() -> None:
    msg = encode_tensor(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(InvalidMessage) as caught:
        decode_tensor(msg, "renders", dtypes=("uint8",))
    assert caught.value.reason == "dtype" and "uint8" in caught.value.detail
    with pytest.raises(InvalidMessage) as caught:
        decode_tensor(msg, "renders", shape=(None, 64, 64, 1))
    assert caught.value.reason == "shape" and "[*, 64, 64, 1]" in caught.value.detail
    with pytest.raises(InvalidMessage) as caught:
        decode_tensor(msg, "renders", max_bytes=100)
    assert caught.value.reason == "too_large"
    assert decode_tensor(msg, "renders", dtypes=("float32",), shape=(2, None, None, 1)).shape == (2, 8, 8, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_nonfinite_values_are_invalid(bad: float, dtype: str) -> None:
    array = np.zeros((4, 4), dtype)
    array[2, 1] = bad
    with pytest.raises(InvalidMessage) as caught:
        decode_tensor(encode_tensor(array), "noise")
    assert caught.value.reason == "nonfinite" and "1 of 16" in caught.value.detail
    assert np.isnan(decode_tensor(encode_tensor(array), "noise", allow_nonfinite=True)[2, 1]) == np.isnan(bad)


# -------------------------------------------------------------------------------------------
# Parameter chunking
# -------------------------------------------------------------------------------------------


def big_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.normal(size=(1500, 1000)).astype(np.float32),  # 6 MB: split along axis 0
        "encoder.bias": rng.normal(size=(1000,)).astype(np.float32),
        "steps": np.asarray(7, np.int64),  # 0-d
        "head.weight": rng.normal(size=(300, 1000)).astype(np.float32),  # 1.2 MB
        "empty": np.zeros((0, 4), np.float32),
    }


def test_chunking_round_trip_of_a_state_above_4mb() -> None:
    state = big_state()
    total = sum(a.nbytes for a in state.values())
    assert total > 4 * 1024 * 1024
    chunks = chunk_parameters(12, state, max_chunk_bytes=1 << 20, member=2)
    assert len(chunks) >= 7
    for chunk in chunks:
        assert sum(len(t.tensor.data) for t in chunk.tensors) <= 1 << 20
        assert chunk.count == len(chunks) and chunk.version == 12 and chunk.total_bytes == total
    wire = [parameters_pb2.ParameterChunk.FromString(c.SerializeToString()) for c in chunks]
    update = assemble_parameters(wire, have_version=3)
    assert update is not None and update.version == 12 and update.member == 2
    assert list(update.tensors) == list(state)
    for name, array in state.items():
        np.testing.assert_array_equal(update.tensors[name], array)
        assert update.tensors[name].dtype == array.dtype


def test_assemble_refuses_incomplete_or_inconsistent_streams() -> None:
    chunks = chunk_parameters(5, big_state(), max_chunk_bytes=1 << 20)
    with pytest.raises(InvalidMessage, match="ended after"):
        assemble_parameters(chunks[:-1])
    with pytest.raises(InvalidMessage, match="expected chunk 1"):
        assemble_parameters([chunks[0], chunks[2], *chunks[3:]])
    other = chunk_parameters(6, big_state(), max_chunk_bytes=1 << 20)
    with pytest.raises(InvalidMessage, match="disagrees"):
        assemble_parameters([chunks[0], other[1], *chunks[2:]])
    with pytest.raises(InvalidMessage, match="without a chunk"):
        assemble_parameters([])
    poisoned = chunk_parameters(5, {"w": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(InvalidMessage) as caught:
        assemble_parameters(poisoned)
    assert caught.value.reason == "nonfinite"
    with pytest.raises(InvalidMessage, match="names version 4"):
        assemble_parameters([up_to_date_chunk(4)], have_version=5)
    assert assemble_parameters([up_to_date_chunk(5)], have_version=5) is None


# -------------------------------------------------------------------------------------------
# A real server: a discriminator-like parameter service and a learner-like unroll service
# -------------------------------------------------------------------------------------------


class ParamService(discriminator_pb2_grpc.DiscriminatorLearnerServicer):
    """Serves published parameters; Status can be made slow to test graceful shutdown."""

    def __init__(self, published: PublishedParameters, member: int = 0) -> None:
        self.published = published
        self.publisher = ParameterPublisher(published.latest, member, max_chunk_bytes=64 * 1024)
        self.status_delay = 0.0
        self.completed = 0

    @rejects_bad_messages(DISC)
    def GetParameters(self, request: parameters_pb2.GetParametersRequest,
                      context: grpc.ServicerContext) -> Iterator[parameters_pb2.ParameterChunk]:
        yield from self.publisher.stream(request)

    def Status(self, request: discriminator_pb2.DiscriminatorStatusRequest,
               context: grpc.ServicerContext) -> discriminator_pb2.DiscriminatorStatus:
        time.sleep(self.status_delay)
        self.completed += 1
        return discriminator_pb2.DiscriminatorStatus(version=self.published.version)

    def binding(self) -> ServiceBinding:
        return ServiceBinding(discriminator_pb2.DESCRIPTOR.services_by_name["DiscriminatorLearner"], self,
                              discriminator_pb2_grpc.add_DiscriminatorLearnerServicer_to_server)


class UnrollService(learner_pb2_grpc.PolicyLearnerServicer):
    """Decodes unrolls like the policy learner and refuses stale ones."""

    def __init__(self, expect: UnrollExpectation, latest_version: int, max_lag: int) -> None:
        self.expect = expect
        self.latest_version = latest_version
        self.max_lag = max_lag
        self.received: list[Unroll] = []

    @rejects_bad_messages(LEARNER)
    def SubmitUnrolls(self, request_iterator: Iterable[learner_pb2.Unroll],
                      context: grpc.ServicerContext) -> learner_pb2.SubmitSummary:
        accepted = 0
        for msg in request_iterator:
            unroll = decode_unroll(msg, self.expect).unroll
            lag = self.latest_version - unroll.policy_version
            if lag > self.max_lag:
                raise PreconditionFailed("stale_version", f"policy_version {unroll.policy_version} is {lag} behind")
            self.received.append(unroll)
            accepted += 1
        return learner_pb2.SubmitSummary(accepted=accepted, latest_version=self.latest_version)

    def binding(self) -> ServiceBinding:
        return ServiceBinding(learner_pb2.DESCRIPTOR.services_by_name["PolicyLearner"], self,
                              learner_pb2_grpc.add_PolicyLearnerServicer_to_server)


def small_state(version: int) -> ParameterSnapshot:
    rng = np.random.default_rng(version)
    return ParameterSnapshot(version, {"w": rng.normal(size=(300, 100)).astype(np.float32),
                                       "b": np.full(3, version, np.float32)})


@pytest.fixture()
def param_server() -> Iterator[tuple[str, ParamService]]:
    service = ParamService(PublishedParameters(small_state(3)))
    server = build_server([service.binding()], "127.0.0.1:0", CFG)
    server.start()
    yield server.address, service
    server.stop(grace=0.5)


def test_health_serving_and_reflection_lists_services(param_server: tuple[str, ParamService]) -> None:
    address, _ = param_server
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", DISC):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="spiral.v1.Nope"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {DISC, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="spiral.v1.ParameterChunk")]), timeout=5))
        assert answers[0].file_descriptor_response.file_descriptor_proto


def test_up_to_date_fetch_sends_one_empty_chunk(param_server: tuple[str, ParamService]) -> None:
    address, _ = param_server
    with make_channel(address, CFG) as channel:
        stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)
        chunks = list(stub.GetParameters(parameters_pb2.GetParametersRequest(have_version=3), timeout=5))
        assert len(chunks) == 1 and chunks[0].count == 0 and not chunks[0].tensors
        assert chunks[0].ByteSize() < 16
        assert fetch_parameters(stub, have_version=3, timeout=5) is None
        full = list(stub.GetParameters(parameters_pb2.GetParametersRequest(have_version=-1), timeout=5))
        assert len(full) >= 2  # 120 kB of weights in 64 kB chunks
        update = fetch_parameters(stub, have_version=-1, timeout=5)
        assert update is not None and update.version == 3


def test_remote_parameter_source_follows_versions(param_server: tuple[str, ParamService]) -> None:
    address, service = param_server
    source = RemoteParameterSource(address, CFG, "discriminator")
    try:
        got = source.fetch(-1)
        assert isinstance(got, ParameterSnapshot) and got.version == 3
        np.testing.assert_array_equal(got.tensors["w"], small_state(3).tensors["w"])
        assert source.fetch(3) is None
        service.published.publish(small_state(4))
        assert source.fetch(3).version == 4  # type: ignore[union-attr]
        # A caller ahead of the server (the server restarted from an older checkpoint) is resynced.
        assert source.fetch(9).version == 4  # type: ignore[union-attr]
        wrong = RemoteParameterSource(address, CFG, "discriminator", member=5)
        with pytest.raises(PeerRejected) as caught:
            wrong.fetch(-1)
        assert caught.value.stale and "member" in caught.value.details
        wrong.close()
        unimplemented = RemoteParameterSource(address, CFG, "learner")  # this server is no PolicyLearner
        with pytest.raises(Exception) as caught_other:
            unimplemented.fetch(-1)
        assert getattr(caught_other.value, "code", None) == grpc.StatusCode.UNIMPLEMENTED
        unimplemented.close()
    finally:
        source.close()


def test_remote_parameter_source_down_peer_fails_fast() -> None:
    source = RemoteParameterSource(f"127.0.0.1:{free_port()}", CFG, "learner", unavailable_retry_seconds=0.5,
                                   call_timeout=2.0)
    with pytest.raises(PeerUnavailable) as caught:
        source.fetch(-1)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    # Bounded by its own deadline (call_timeout + unavailable_retry_seconds), not by a caller's
    # patience: the retry loop says it gave up, after more than one attempt.
    assert "gave up after" in caught.value.details and "attempt(s)" in caught.value.details
    source.close()


def make_unroll(policy_version: int, batch: int = 2) -> Unroll:
    cfg = load_experiment("experiments/tiny.yaml")
    spec = action_spec_for(cfg)
    rng = np.random.default_rng(policy_version)
    t = cfg.env.episode_length - 1
    size = cfg.env.image_size
    actions = np.stack([rng.integers(0, n, size=(t, batch)) for n in spec.sizes], axis=-1).astype(np.int64)
    return Unroll(canvases=rng.integers(0, 256, size=(t + 1, batch, size, size, 1), dtype=np.uint8),
                  actions=actions, masks=spec.masks_for(actions[..., 0]).astype(np.float32),
                  behaviour_log_probs=-rng.random((t, batch)).astype(np.float32),
                  noise=rng.normal(size=(batch, cfg.env.noise_dim)).astype(np.float32),
                  targets=rng.integers(0, 256, size=(batch, size, size, 1), dtype=np.uint8),
                  policy_version=policy_version, actor_id="actor-test")


def test_remote_unroll_sink_submits_and_reports_refusals() -> None:
    cfg = load_experiment("experiments/tiny.yaml")
    spec = action_spec_for(cfg)
    services = dataclasses.replace(cfg.services, max_message_bytes=8 << 20)
    service = UnrollService(UnrollExpectation.for_experiment(cfg, spec), latest_version=10, max_lag=3)
    server = build_server([service.binding()], "127.0.0.1:0", services)
    server.start()
    sink = RemoteUnrollSink(server.address, services, spec.names)
    try:
        assert sink.submit(make_unroll(9)) == 10
        summary = sink.last_summary
        assert summary is not None and summary.accepted == 1 and summary.latest_version == 10
        np.testing.assert_array_equal(service.received[0].actions, make_unroll(9).actions)
        with pytest.raises(PeerRejected) as caught:
            sink.submit(make_unroll(2))
        assert caught.value.stale and caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale_version" in str(caught.value)
        bad_heads = RemoteUnrollSink(server.address, services, [*spec.names[:-1], "wobble"])
        with pytest.raises(PeerRejected) as caught:
            bad_heads.submit(make_unroll(9))
        assert not caught.value.stale and "unknown_head" in caught.value.details and "wobble" in caught.value.details
        bad_heads.close()
        assert sink.submit(make_unroll(10)) == 10 and sink.last_summary.accepted == 1  # still serving
    finally:
        sink.close()
        server.stop(grace=0.5)


# -------------------------------------------------------------------------------------------
# Limits, binding, shutdown, metrics
# -------------------------------------------------------------------------------------------


def test_oversize_messages_are_refused_and_the_server_keeps_serving(param_server: tuple[str, ParamService]) -> None:
    address, _ = param_server
    big_client = ServicesConfig(max_message_bytes=16 << 20)
    limit = CFG.max_message_bytes
    before = sample("spiral_rejected_messages_total", service=DISC, reason="too_large")
    with make_channel(address, big_client) as channel:
        stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)
        # Above the configured limit, within the transport's: INVALID_ARGUMENT naming the sizes, counted.
        padded = discriminator_pb2.DiscriminatorStatusRequest()
        request = parameters_pb2.GetParametersRequest(have_version=3)
        raw = request.SerializeToString() + _unknown_field(limit + 1000)
        call = channel.unary_stream("/spiral.v1.DiscriminatorLearner/GetParameters",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as caught:
            list(call(raw, timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "too_large" in caught.value.details() and str(limit) in caught.value.details()
        assert sample("spiral_rejected_messages_total", service=DISC, reason="too_large") == before + 1
        # Far above: cut off by the transport with RESOURCE_EXHAUSTED.
        with pytest.raises(grpc.RpcError) as caught:
            list(call(request.SerializeToString() + _unknown_field(3 * limit), timeout=10))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Everyone else is still served.
        assert stub.Status(padded, timeout=5).version == 3
        assert fetch_parameters(stub, have_version=-1, timeout=5) is not None


def _unknown_field(size: int) -> bytes:
    """An unknown length-delimited field (number 15) of ``size`` bytes: valid protobuf, just large."""
    length = size
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([15 << 3 | 2]) + bytes(varint) + b"\0" * size


def test_bind_only_the_configured_address_and_fail_loudly(param_server: tuple[str, ParamService]) -> None:
    address, service = param_server
    assert address.startswith("127.0.0.1:")
    with pytest.raises(BindError, match="cannot bind"):
        build_server([service.binding()], address, CFG)
    with pytest.raises(BindError):
        build_server([service.binding()], "192.0.2.1:0", CFG)  # TEST-NET: not an address of this host


def test_graceful_stop_finishes_inflight_calls_and_runs_hooks() -> None:
    service = ParamService(PublishedParameters(small_state(1)))
    service.status_delay = 1.0
    server = build_server([service.binding()], "127.0.0.1:0", CFG)
    server.start()
    results: list[object] = []
    events: list[str] = []
    channel = make_channel(server.address, CFG)
    stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)
    health = health_pb2_grpc.HealthStub(channel)

    def slow_call() -> None:
        try:
            results.append(stub.Status(discriminator_pb2.DiscriminatorStatusRequest(), timeout=10).version)
        except grpc.RpcError as error:
            results.append(error.code())

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.3)  # the call is in flight

    def stopping() -> None:
        events.append("stopping")
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        events.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    server.stop(grace=5.0, on_stopping=stopping, on_stopped=lambda: events.append(f"stopped:{service.completed}"))
    caller.join(10)
    assert results == [1]
    assert events == ["stopping", "NOT_SERVING", "stopped:1"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Status(discriminator_pb2.DiscriminatorStatusRequest(), timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_metrics_interceptor_counts_per_method_and_code(param_server: tuple[str, ParamService]) -> None:
    address, _ = param_server

    def handled(method: str, code: str) -> float:
        return sample("spiral_grpc_server_handled_total", service=DISC, method=method, code=code)

    def timed(method: str) -> float:
        return sample("spiral_grpc_server_handling_seconds_count", service=DISC, method=method)

    before = (handled("Status", "OK"), handled("GetParameters", "OK"), handled("GetParameters", "FAILED_PRECONDITION"),
              timed("Status"), timed("GetParameters"))
    with make_channel(address, CFG) as channel:
        stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)
        for _ in range(3):
            stub.Status(discriminator_pb2.DiscriminatorStatusRequest(), timeout=5)
        fetch_parameters(stub, have_version=-1, timeout=5)
        with pytest.raises(grpc.RpcError):
            fetch_parameters(stub, have_version=-1, member=7, timeout=5)
    after = (handled("Status", "OK"), handled("GetParameters", "OK"), handled("GetParameters", "FAILED_PRECONDITION"),
             timed("Status"), timed("GetParameters"))
    assert [a - b for a, b in zip(after, before)] == [3, 1, 1, 3, 2]
    assert sample("spiral_rejected_messages_total", service=DISC, reason="wrong_member") >= 1


# -------------------------------------------------------------------------------------------
# Retries
# -------------------------------------------------------------------------------------------


def test_retry_with_backoff_reaches_a_server_started_late() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    service = ParamService(PublishedParameters(small_state(2)))
    servers = []

    def start_late() -> None:
        time.sleep(1.0)
        server = build_server([service.binding()], address, CFG)
        server.start()
        servers.append(server)

    starter = threading.Thread(target=start_late)
    starter.start()
    attempts: list[float] = []
    channel = make_channel(address, CFG)
    stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)

    def call(timeout: float) -> int:
        attempts.append(time.monotonic())
        return stub.Status(discriminator_pb2.DiscriminatorStatusRequest(), timeout=min(timeout, 1.0)).version

    try:
        version = call_with_retry(call, policy=RetryPolicy(initial_backoff=0.05, max_backoff=0.4, call_timeout=1.0),
                                  deadline_seconds=60, description="Status")
        assert version == 2
        assert len(attempts) >= 2
    finally:
        starter.join()
        channel.close()
        for server in servers:
            server.stop(grace=0.2)


def test_retry_gives_up_at_the_deadline_on_stop_and_at_once_on_refusals() -> None:
    channel = make_channel(f"127.0.0.1:{free_port()}", CFG)
    stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)

    def call(timeout: float) -> object:
        return stub.Status(discriminator_pb2.DiscriminatorStatusRequest(), timeout=timeout)

    policy = RetryPolicy(initial_backoff=0.05, max_backoff=0.2, call_timeout=0.5)
    with pytest.raises(RetryDeadlineExceeded) as caught:
        call_with_retry(call, policy=policy, deadline_seconds=1.0)
    assert caught.value.attempts >= 2 and caught.value.last_error is not None
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(RetryStopped):
        call_with_retry(call, policy=policy, stop=stop)
    with pytest.raises(ValueError, match="forever"):
        call_with_retry(call, policy=policy)
    channel.close()

    calls = []

    class Refused(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INVALID_ARGUMENT

    def refused(timeout: float) -> None:
        calls.append(timeout)
        raise Refused()

    with pytest.raises(Refused):
        call_with_retry(refused, policy=policy, deadline_seconds=10)
    assert len(calls) == 1


def test_backoff_bounds_grow_and_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    assert [policy.backoff_bound(n) for n in (1, 2, 3, 4, 5, 50)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    with pytest.raises(ValueError):
        RetryPolicy(call_timeout=0)


# -------------------------------------------------------------------------------------------
# TLS and mutual TLS
# -------------------------------------------------------------------------------------------


def _write_certs_with_cryptography(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("spiral-test-ca")).issuer_name(name("spiral-test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(f"spiral-{who}")).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False))
        cert = builder.sign(ca_key, hashes.SHA256())
        (directory / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{who}.key").write_bytes(key_pem(key))


def _write_certs_with_openssl(directory: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-subj", "/CN=spiral-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj",
            f"/CN=spiral-{who}", "-keyout", f"{who}.key", "-out", f"{who}.csr")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "san.cnf", "-out", f"{who}.pem")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    try:
        _write_certs_with_cryptography(directory)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        _write_certs_with_openssl(directory)
    return directory


def _status(address: str, cfg: ServicesConfig, timeout: float = 5.0) -> int:
    with make_channel(address, cfg) as channel:
        stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)
        return stub.Status(discriminator_pb2.DiscriminatorStatusRequest(), timeout=timeout).version


def test_tls_server_with_verifying_client(certs: Path) -> None:
    server_cfg = ServicesConfig(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    service = ParamService(PublishedParameters(small_state(5)))
    server = build_server([service.binding()], "127.0.0.1:0", server_cfg)
    server.start()
    try:
        assert server.tls
        assert _status(server.address, ServicesConfig(tls_ca=str(certs / "ca.pem"))) == 5
        with pytest.raises(grpc.RpcError) as caught:
            _status(server.address, ServicesConfig(), timeout=2)  # plaintext client
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0.2)


def test_mutual_tls_refuses_clients_without_a_certificate(certs: Path) -> None:
    server_cfg = ServicesConfig(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                                tls_ca=str(certs / "ca.pem"))
    service = ParamService(PublishedParameters(small_state(6)))
    server = build_server([service.binding()], "127.0.0.1:0", server_cfg)
    server.start()
    try:
        client = ServicesConfig(tls_cert=str(certs / "client.pem"), tls_key=str(certs / "client.key"),
                                tls_ca=str(certs / "ca.pem"))
        assert _status(server.address, client) == 6
        source = RemoteParameterSource(server.address, client, "discriminator")
        assert source.fetch(-1).version == 6  # type: ignore[union-attr]
        source.close()
        with pytest.raises(grpc.RpcError) as caught:
            _status(server.address, ServicesConfig(tls_ca=str(certs / "ca.pem")), timeout=2)  # no client cert
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            _status(server.address, ServicesConfig(), timeout=2)  # plaintext
    finally:
        server.stop(grace=0.2)


def test_tls_config_errors_name_the_field(tmp_path: Path) -> None:
    service = ParamService(PublishedParameters(small_state(1)))
    with pytest.raises(TLSConfigError, match="services.tls_cert"):
        build_server([service.binding()], "127.0.0.1:0",
                     ServicesConfig(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "k.pem")))
    (tmp_path / "junk.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(TLSConfigError, match="not a PEM"):
        build_server([service.binding()], "127.0.0.1:0",
                     ServicesConfig(tls_cert=str(tmp_path / "junk.pem"), tls_key=str(tmp_path / "k.pem")))
    with pytest.raises(TLSConfigError, match="tls_ca"):
        build_server([service.binding()], "127.0.0.1:0", ServicesConfig(tls_ca=str(tmp_path / "junk.pem")))


# -------------------------------------------------------------------------------------------
# Experiment contract: peers of another experiment are refused, naming the differing fields
# -------------------------------------------------------------------------------------------


def tiny_with(*items: str) -> ExperimentConfig:
    return resolve_experiment(experiment_path("tiny"), items).config


@pytest.fixture()
def declared() -> Iterator[Callable[[ExperimentConfig | None], None]]:
    """Declare this test process's contract (as a service's main does); undeclared afterwards."""
    yield declare_process_contract
    declare_process_contract(None)


def test_the_contract_holds_what_peers_rely_on_and_nothing_else() -> None:
    tiny = experiment_contract(tiny_with())
    assert tiny["env.paint.grid_size"] == 8 and tiny["policy.core_dim"] == 64 and tiny["env.conditional"] is True
    assert "env.mujoco.grid_size" not in tiny and "policy.fp32_heads" not in tiny
    for own_business in ("learner.batch_size=4", "learner.learning_rate=1e-3", "seed=5", "policy.fp32_heads=false",
                         "actor.num_envs=2", "env.paint.brush_type=classic/pen"):
        assert experiment_contract(tiny_with(own_business)) == tiny, own_business
    for shared in ("env.paint.grid_size=16", "env.paint.canvas_size=32", "env.paint.use_color=true",
                   "env.episode_length=5", "env.conditional=false", "env.noise_dim=4", "policy.core_dim=32",
                   "discriminator.channels=8", "discriminator_learner.objective=sngan", "env.paint.brush_sizes=[1, 2]",
                   "env.paint.gray_levels=8"):
        assert experiment_contract(tiny_with(shared)) != tiny, shared
    assert contract_mismatch(tiny, experiment_contract(tiny_with("env.paint.grid_size=16", "policy.core_dim=32"))) == (
        "experiment mismatch: env.paint.grid_size is 8 here, 16 at the caller; policy.core_dim is 64 here, 32 at the "
        "caller (every service of a run needs the same experiment and --set / SPIRAL_SET overrides)")
    assert contract_mismatch(tiny, dict(tiny)) is None


def test_a_server_refuses_callers_of_another_experiment_and_serves_its_own(
        declared: Callable[[ExperimentConfig | None], None]) -> None:
    service = ParamService(PublishedParameters(small_state(3)))
    server = build_server([service.binding()], "127.0.0.1:0", CFG, contract=experiment_contract(tiny_with()))
    server.start()
    before = sample("spiral_rejected_messages_total", service=DISC, reason="experiment_mismatch")
    try:
        declared(tiny_with("env.paint.grid_size=16"))  # this process now acts for another experiment
        other = RemoteParameterSource(server.address, CFG, "discriminator")
        with pytest.raises(PeerRejected) as caught:
            other.fetch(-1)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert caught.value.details.startswith("experiment mismatch: env.paint.grid_size is 8 here, 16 at the caller")
        assert sample("spiral_rejected_messages_total", service=DISC, reason="experiment_mismatch") == before + 1
        with make_channel(server.address, CFG) as channel:  # health answers anyone
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=DISC), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        other.close()

        declared(tiny_with("learner.batch_size=4"))  # a setting that is the caller's own business
        same = RemoteParameterSource(server.address, CFG, "discriminator")
        assert same.fetch(-1).version == 3  # type: ignore[union-attr]
        same.close()
        declared(None)  # a caller that sends no contract (grpcurl, a probe) is not checked
        bare = RemoteParameterSource(server.address, CFG, "discriminator")
        assert bare.fetch(-1).version == 3  # type: ignore[union-attr]
        bare.close()
    finally:
        server.stop(grace=0.5)


def test_a_streaming_submit_of_another_experiment_is_refused_before_it_is_read(
        declared: Callable[[ExperimentConfig | None], None]) -> None:
    cfg = tiny_with()
    spec = action_spec_for(cfg)
    services = dataclasses.replace(cfg.services, max_message_bytes=8 << 20)
    service = UnrollService(UnrollExpectation.for_experiment(cfg, spec), latest_version=10, max_lag=3)
    declared(cfg)  # the server takes the process's contract by default, as a service's does
    server = build_server([service.binding()], "127.0.0.1:0", services)
    server.start()
    try:
        declared(tiny_with("env.noise_dim=4", "env.episode_length=5"))
        sink = RemoteUnrollSink(server.address, services, spec.names)
        with pytest.raises(PeerRejected) as caught:
            sink.submit(make_unroll(9))
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "env.episode_length is 10 here, 5 at the caller; env.noise_dim is 10 here, 4 at the caller" in \
            caught.value.details
        assert service.received == []
        sink.close()
        declared(cfg)
        sink = RemoteUnrollSink(server.address, services, spec.names)
        assert sink.submit(make_unroll(9)) == 10
        sink.close()
    finally:
        server.stop(grace=0.5)
