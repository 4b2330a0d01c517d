"""A real policy learner process answers malformed or stale unrolls precisely and keeps serving.

Valid unrolls are made here with the real environment and a policy copy fetched from the
learner over gRPC, then damaged one field at a time. A real replay buffer started with other
overrides (``SPIRAL_SET``) refuses the peers of the unchanged experiment, and a service given a
bad override exits naming it.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from spiral.agent.acting import EpisodeRunner
from spiral.config import experiment_path, load_experiment, resolve_experiment
from spiral.envs import action_spec_for, make_env
from spiral.nets import build_policy
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.rpc.client import make_channel
from spiral.rpc.contract import declare_process_contract
from spiral.rpc.messages import encode_unroll
from spiral.rpc.parameters import fetch_parameters
from spiral.rpc.peers import PeerRejected, RemoteRenderSink
from spiral.commands.layout import free_port
from spiral.commands.status import scrape
from spiral.v1 import learner_pb2, learner_pb2_grpc
from system_harness import write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def learner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    tmp = tmp_path_factory.mktemp("learner")
    # One episode batch of 4 makes an update; max_policy_lag 1 makes version 0 stale after two.
    config = write_config(tmp, {"learner": {"batch_size": 4, "max_policy_lag": 1},
                                "services": {"max_message_bytes": 4 * 1024 * 1024},
                                "actor": {"num_envs": 4}})
    port, metrics_port = free_port(), free_port()
    log = open(tmp / "learner.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "spiral.commands.cli", "learner", "--config", str(config),
                             "--run-dir", str(tmp / "run"), "--listen", f"127.0.0.1:{port}",
                             "--metrics-port", str(metrics_port),
                             "--discriminator-address", f"127.0.0.1:{free_port()}"],
                            stdout=log, stderr=subprocess.STDOUT)
    channel = make_channel(f"127.0.0.1:{port}", load_experiment(config).services)
    try:
        grpc.channel_ready_future(channel).result(timeout=120)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", config
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp / "learner.log").read_text()
        log.close()


def _episodes(config: Path, stub: learner_pb2_grpc.PolicyLearnerStub, seed: int = 0) -> learner_pb2.Unroll:
    cfg = load_experiment(config)
    update = fetch_parameters(stub, -1, timeout=30)
    assert update is not None
    runner = EpisodeRunner(cfg, make_env(cfg, cfg.actor.num_envs, seed=seed), build_policy(cfg),
                           np.full((4, 64, 64, cfg.image_channels), 255, np.uint8), seed=seed, actor_id="test")
    runner.load_parameters(ParameterSnapshot(update.version, dict(update.tensors)))
    return encode_unroll(runner.run_episode(), action_spec_for(cfg).names)


def _submit(stub: learner_pb2_grpc.PolicyLearnerStub, msg: learner_pb2.Unroll) -> learner_pb2.SubmitSummary:
    return stub.SubmitUnrolls(iter([msg]), timeout=60)


def _damaged(good: learner_pb2.Unroll) -> dict[str, tuple[learner_pb2.Unroll, str]]:
    cases: dict[str, tuple[learner_pb2.Unroll, str]] = {}
    msg = copy.deepcopy(good)
    msg.canvases.shape[0] += 1
    cases["shape and bytes disagree"] = (msg, "canvases")
    msg = copy.deepcopy(good)
    msg.masks.dtype = "float64"
    cases["wrong dtype"] = (msg, "masks")
    msg = copy.deepcopy(good)
    msg.head_names[1] = "loudness"
    cases["unknown action head"] = (msg, "loudness")
    msg = copy.deepcopy(good)
    noise = np.frombuffer(msg.noise.data, np.float32).copy()
    noise[0] = np.nan
    msg.noise.data = noise.tobytes()
    cases["NaN"] = (msg, "noise")
    msg = copy.deepcopy(good)
    log_probs = np.frombuffer(msg.behaviour_log_probs.data, np.float32).copy()
    log_probs[-1] = -np.inf
    msg.behaviour_log_probs.data = log_probs.tobytes()
    cases["Inf"] = (msg, "behaviour_log_probs")
    return cases


def test_bad_unrolls_are_refused_counted_and_the_learner_goes_on(learner: tuple[str, str, Path]) -> None:
    address, metrics_url, config = learner
    cfg = load_experiment(config)
    channel = make_channel(address, cfg.services)
    stub = learner_pb2_grpc.PolicyLearnerStub(channel)
    good = _episodes(config, stub)

    for case, (msg, mentioned) in _damaged(good).items():
        with pytest.raises(grpc.RpcError) as info:
            _submit(stub, msg)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert mentioned in info.value.details(), (case, info.value.details())

    oversize = copy.deepcopy(good)
    oversize.canvases.data = bytes(5 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as info:
        _submit(stub, oversize)
    assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)

    rejected = scrape(metrics_url).get("spiral_rejected_messages_total", 0)
    assert rejected >= 5

    # The learner still serves everyone else: good unrolls are taken and trained on.
    assert _submit(stub, good).accepted == 1
    assert _submit(stub, _episodes(config, stub, seed=1)).accepted == 1
    for _ in range(240):
        status = stub.Status(learner_pb2.StatusRequest(), timeout=10)
        if status.updates >= 2:
            break
        time.sleep(0.5)
    assert status.updates >= 2 and status.version >= 2, status

    # An unroll acted with version 0 is now more than max_policy_lag (1) behind: refused.
    with pytest.raises(grpc.RpcError) as info:
        _submit(stub, good)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "behind" in info.value.details()
    # An unroll claiming a version the learner never published is refused as well.
    future = copy.deepcopy(good)
    future.policy_version = status.version + 100
    with pytest.raises(grpc.RpcError) as info:
        _submit(stub, future)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "newer than the learner's" in info.value.details()
    assert scrape(metrics_url).get("spiral_rejected_messages_total", 0) >= rejected + 2
    channel.close()


def test_a_replay_buffer_started_with_other_overrides_refuses_this_experiments_renders(tmp_path: Path) -> None:
    """SPIRAL_SET gives one pod another grid: its peers' calls are refused, naming the field."""
    port = free_port()
    log = open(tmp_path / "replaybuffer.log", "wb")  # noqa: SIM115
    env = dict(os.environ, SPIRAL_SET="env.paint.grid_size=16\nlearner.reward.band=[-5, 5]; seed=3")
    proc = subprocess.Popen([sys.executable, "-m", "spiral.commands.cli", "replaybuffer", "--config", "tiny",
                             "--run-dir", str(tmp_path / "run"), "--listen", f"127.0.0.1:{port}", "--metrics-port", "0"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    cfg = load_experiment(experiment_path("tiny"))
    renders = np.zeros((2, 64, 64, 1), np.uint8)
    try:
        with make_channel(f"127.0.0.1:{port}", cfg.services) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        declare_process_contract(cfg)  # this test acts as an actor of the unchanged experiment
        sink = RemoteRenderSink(f"127.0.0.1:{port}", cfg.services)
        with pytest.raises(PeerRejected) as caught:
            sink.insert(renders, renders, policy_version=0, actor_id="test")
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert caught.value.details.startswith("experiment mismatch: env.paint.grid_size is 16 here, 8 at the caller")
        sink.close()
        declare_process_contract(resolve_experiment(experiment_path("tiny"), ["env.paint.grid_size=16"]).config)
        sink = RemoteRenderSink(f"127.0.0.1:{port}", cfg.services)
        assert sink.insert(renders, renders, policy_version=0, actor_id="test") == 2  # the same experiment: taken
        sink.close()
    finally:
        declare_process_contract(None)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "replaybuffer.log").read_text()
        log.close()
    assert "experiment mismatch: env.paint.grid_size is 16 here, 8 at the caller" in \
        (tmp_path / "replaybuffer.log").read_text()


def test_a_service_given_a_bad_override_exits_naming_the_item_and_the_field(tmp_path: Path) -> None:
    for how, extra_args, env in (("--set", ["--set", "replay.capcity=5"], dict(os.environ)),
                                 ("SPIRAL_SET", [], dict(os.environ, SPIRAL_SET="seed=1;replay.capcity=5"))):
        done = subprocess.run([sys.executable, "-m", "spiral.commands.cli", "replaybuffer", "--config", "tiny",
                               "--run-dir", str(tmp_path), "--metrics-port", "0", *extra_args],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode != 0
        assert f"spiral replaybuffer: {how} replay.capcity=5: replay.capcity: unknown field (known: capacity," in \
            done.stderr, done.stderr
