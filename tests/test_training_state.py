"""PBT copies: training state export/import, GetTrainingState and LoadFrom over real gRPC servers."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import torch

from discriminator.learner import DiscriminatorLearner
from discriminator.service import DiscriminatorLearnerServicer
from discriminator.training import DiscriminatorTrainer
from learner.learner import PolicyLearner
from learner.service import PolicyLearnerServicer
from learner.training import PolicyTrainer
from spiral.agent.acting import EpisodeRunner
from spiral.config import ExperimentConfig, experiment_path, load_experiment
from spiral.envs import make_env
from spiral.nets import build_discriminator, build_policy
from spiral.rpc.client import make_channel
from spiral.rpc.peers import PeerRejected, PeerUnavailable
from spiral.rpc.server import SpiralServer, build_server
from spiral.rpc.training_state import fetch_training_state, request_discriminator_copy, training_state_chunks
from spiral.agent.training_state import TrainingStateError
from spiral.agent.trajectory import Unroll
from spiral.v1 import discriminator_pb2, discriminator_pb2_grpc

SIZE = 64


def _backend() -> str:
    """libmypaint where the library loads, else the fast rasterizer."""
    try:
        cfg = load_experiment(experiment_path("tiny"))
        make_env(cfg, 1, 0, backend="libmypaint").close()
        return "libmypaint"
    except (OSError, ImportError, RuntimeError):
        return "fast"


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_experiment(experiment_path("tiny"), overrides={
        "env": {"paint": {"backend": _backend()}},
        "learner": {"batch_size": 4}, "discriminator_learner": {"batch_size": 4}})


def bar_targets(batch: int, offset: int = 0) -> np.ndarray:
    images = np.full((batch, SIZE, SIZE, 1), 255, np.uint8)
    for i in range(batch):
        row = 12 + (i * 7 + offset) % 40
        images[i, row:row + 4, 8:56] = 0
    return images


def collect(cfg: ExperimentConfig, policy, batch: int, seed: int) -> Unroll:
    """Act one episode on ``batch`` real environments with the actor's own loop."""
    env = make_env(cfg, batch, seed)
    try:
        return EpisodeRunner(cfg, env, policy, None, seed=seed, actor_id="test").run_episode(bar_targets(batch))
    finally:
        env.close()


def serve(binding, cfg: ExperimentConfig) -> SpiralServer:
    """A real gRPC server for ``binding`` on a free loopback port."""
    server = build_server([binding], "127.0.0.1:0", cfg.services)
    server.start()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# -- the flat format, no network ------------------------------------------------------------------


def test_policy_state_names_and_import_validation(cfg):
    torch.manual_seed(0)
    donor = PolicyTrainer(cfg, build_policy(cfg))
    unroll = collect(cfg, donor.policy, batch=2, seed=1)
    donor.update(unroll, None)
    state = donor.export_state()
    names = list(state)
    assert names[0].startswith("policy/") and any(n.startswith("optimizer/") for n in names)
    assert {"optimizer/0/step", "optimizer/0/exp_avg", "optimizer/0/exp_avg_sq"} <= set(state)
    assert float(state["optimizer/0/step"]) == 1.0
    for array in state.values():
        assert isinstance(array, np.ndarray) and array.flags.c_contiguous
    # Copies, not views: the next update does not change an exported state.
    frozen = {k: v.copy() for k, v in state.items()}
    donor.update(unroll, None)
    assert all(np.array_equal(frozen[k], state[k]) for k in state)

    torch.manual_seed(7)
    recipient = PolicyTrainer(cfg, build_policy(cfg))
    before = weights(recipient.policy)
    first_weight = next(n for n in names if n.startswith("policy/") and state[n].ndim >= 1)
    bad = dict(state)
    bad[first_weight] = np.zeros((3,) + state[first_weight].shape[1:], state[first_weight].dtype)
    bad["policy/no_such_layer.weight"] = np.zeros(2, np.float32)
    bad["optimizer/99999/exp_avg"] = np.zeros(2, np.float32)
    del bad[next(n for n in reversed(names) if n.startswith("policy/"))]
    with pytest.raises(ValueError) as info:
        recipient.import_state(bad)
    message = str(info.value)
    for fragment in (first_weight, "no_such_layer", "99999", "missing 1 policy tensor"):
        assert fragment in message
    assert isinstance(info.value, TrainingStateError)
    nonfinite = dict(state)
    nonfinite["optimizer/0/exp_avg"] = np.full_like(state["optimizer/0/exp_avg"], np.nan)
    with pytest.raises(ValueError, match="NaN"):
        recipient.import_state(nonfinite)
    # Atomic: nothing was loaded by the failed imports.
    assert_same(weights(recipient.policy), before)
    assert recipient.optimizer.state_dict()["state"] == {}


def test_discriminator_state_round_trip(cfg):
    torch.manual_seed(1)
    donor = DiscriminatorTrainer(cfg, build_discriminator(cfg), seed=1)
    real, fake = bar_targets(4), bar_targets(4, offset=3)
    for _ in range(2):
        donor.update(real, fake, real)
    torch.manual_seed(2)
    recipient = DiscriminatorTrainer(cfg, build_discriminator(cfg), seed=2)
    recipient.update(fake, real, fake)  # its own, different optimiser state
    recipient.optimizer.param_groups[0]["lr"] = 1e-3
    state = donor.export_state()
    assert all(n.startswith(("critic/", "optimizer/")) for n in state)
    recipient.import_state(state)
    assert recipient.optimizer.param_groups[0]["lr"] == 1e-3  # hyperparameters stay
    recipient.optimizer.param_groups[0]["lr"] = donor.optimizer.param_groups[0]["lr"]
    assert_same(weights(recipient.discriminator), weights(donor.discriminator))
    # The gradient penalty's random interpolation is not training state: align it for the comparison.
    donor.generator.manual_seed(5)
    recipient.generator.manual_seed(5)
    donor.update(real, fake, real)
    recipient.update(real, fake, real)
    assert_same(weights(recipient.discriminator), weights(donor.discriminator))


# -- the policy learner over gRPC -------------------------------------------------------------------


def test_learner_training_state_over_grpc(cfg, tmp_path: Path):
    torch.manual_seed(3)
    (tmp_path / "donor").mkdir()
    learner = PolicyLearner(cfg, tmp_path / "donor", member=2)
    server = serve(PolicyLearnerServicer(learner, member=2).binding(), cfg)
    try:
        unroll = collect(cfg, learner.policy, batch=4, seed=2)
        for _ in range(2):
            learner.submit(unroll)
            assert learner.step(timeout=5.0) is not None
        assert learner.version == 2
        update = fetch_training_state(server.address, cfg.services, "learner", member=2, timeout=30.0)
        assert update.version == 2 and update.member == 2
        assert float(update.tensors["optimizer/0/step"]) == 2.0

        torch.manual_seed(11)
        recipient = PolicyTrainer(cfg, build_policy(cfg))
        recipient.set_hyperparameters(learning_rate=1e-4, entropy_cost=0.05)
        recipient.import_state(update.tensors)
        assert recipient.hyperparameters == {"learning_rate": 1e-4, "entropy_cost": 0.05}
        assert all(g["lr"] == 1e-4 for g in recipient.optimizer.param_groups)
        recipient.set_hyperparameters(**learner.trainer.hyperparameters)
        assert_same(weights(recipient.policy), weights(learner.policy))
        # The next update is the same from the donor and from the copy.
        learner.trainer.update(unroll, None)
        recipient.update(unroll, None)
        assert_same(weights(recipient.policy), weights(learner.policy))

        with pytest.raises(PeerRejected) as refused:
            fetch_training_state(server.address, cfg.services, "learner", member=0, timeout=10.0)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and "member" in refused.value.details
    finally:
        server.stop(grace=0)


def test_the_policy_learner_takes_a_copy_between_two_updates_like_the_discriminator(cfg, tmp_path: Path):
    donor = PolicyLearner(cfg, tmp_path / "donor", member=1)  # another member: other initial weights
    donor_version, tensors = donor.export_training_state()
    learner = PolicyLearner(cfg, tmp_path / "recipient", member=0)
    assert not all(torch.equal(a, b) for a, b in zip(weights(learner.policy), weights(donor.policy)))

    # Refused at once, naming what does not fit: nothing is queued.
    missing = {k: v for k, v in tensors.items() if k != next(iter(tensors))}
    with pytest.raises(ValueError, match="missing 1 policy tensor"):
        learner.request_copy(missing)
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        learner.request_copy(tensors, hyperparameters={"learning_rate": -1.0})
    with pytest.raises(ValueError, match="gamma: not a hyperparameter"):
        learner.request_copy(None, hyperparameters={"gamma": 0.5})
    assert learner.pending_copy.request is None

    superseded = learner.request_copy(tensors, donor_version=donor_version, hyperparameters={"learning_rate": 5e-4})
    copy = learner.request_copy(tensors, donor_version=donor_version,
                                hyperparameters={"learning_rate": 2e-4, "entropy_cost": 0.03})
    assert superseded.done.is_set() and not superseded.applied
    assert not copy.done.is_set() and learner.version == 0  # held until the next update
    assert learner.step(timeout=0.01) is None  # no batch came, but the copy was applied first
    assert copy.done.is_set() and copy.applied and copy.version == learner.version == 1
    assert copy.donor_version == donor_version
    assert_same(weights(learner.policy), weights(donor.policy))
    assert learner.hyperparameters == {"learning_rate": 2e-4, "entropy_cost": 0.03}
    assert learner.fetch(0).version == 1  # published like an update, so actors pick it up

    explore = learner.request_copy(None, hyperparameters={"entropy_cost": 0.0})  # hyperparameters only
    learner.step(timeout=0.01)
    assert explore.applied and learner.version == 1 and learner.hyperparameters["entropy_cost"] == 0.0
    learner.close()
    donor.close()


# -- the discriminator over gRPC ----------------------------------------------------------------------


class FixedRenders:
    """A replay buffer stand-in: the same renders and targets every time, or nothing while closed."""

    def __init__(self, offset: int) -> None:
        self.renders = bar_targets(4, offset=offset)
        self.targets = bar_targets(4)
        self.open = True

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        if not self.open:
            return None
        return self.renders[:batch_size], self.targets[:batch_size]


def make_discriminator(cfg: ExperimentConfig, run_dir: Path, member: int, seed: int,
                       **servicer_args: float) -> tuple[DiscriminatorLearner, FixedRenders, SpiralServer]:
    torch.manual_seed(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    renders = FixedRenders(offset=seed)
    learner = DiscriminatorLearner(cfg, run_dir, np.zeros((4, SIZE, SIZE, 1), np.uint8), renders, member=member)
    server = serve(DiscriminatorLearnerServicer(learner, member=member, **servicer_args).binding(), cfg)
    return learner, renders, server


@pytest.fixture
def donor(cfg, tmp_path: Path) -> Iterator[tuple[DiscriminatorLearner, SpiralServer]]:
    learner, _, server = make_discriminator(cfg, tmp_path / "donor", member=1, seed=21)
    for _ in range(3):
        assert learner.step() is not None
    yield learner, server
    server.stop(grace=0)


def load_from(server: SpiralServer, cfg: ExperimentConfig, **fields) -> discriminator_pb2.LoadFromReply:
    channel = make_channel(server.address, cfg.services)
    try:
        stub = discriminator_pb2_grpc.DiscriminatorLearnerStub(channel)
        return stub.LoadFrom(discriminator_pb2.LoadFromRequest(**fields), timeout=30.0)
    finally:
        channel.close()


def test_discriminator_load_from_copies_the_donor_between_updates(cfg, tmp_path: Path, donor):
    donor_learner, donor_server = donor
    learner, renders, server = make_discriminator(cfg, tmp_path / "recipient", member=0, seed=22,
                                                  copy_wait_seconds=0.0)
    try:
        assert learner.step() is not None
        version = learner.version
        assert not all(torch.equal(a, b)
                       for a, b in zip(weights(learner.discriminator), weights(donor_learner.discriminator)))

        reply = load_from(server, cfg, donor_address=donor_server.address, donor_member=1, member=0)
        assert reply.donor_version == donor_learner.version == 3
        assert not reply.applied  # nobody ran a step yet: the copy is pending, not half-applied
        assert learner.version == version

        renders.open = False  # no batch: this step applies the copy and nothing else
        assert learner.step() is None
        assert learner.version == version + 1
        published = learner.published.latest()
        assert published.version == version + 1
        donor_weights = donor_learner.discriminator.state_dict()
        assert published.tensors.keys() == donor_weights.keys()
        for name, value in published.tensors.items():
            assert np.array_equal(value, donor_weights[name].numpy()), name
        assert learner.trainer.optimizer.state_dict()["state"][0]["step"] == 3

        # From here on the copy trains exactly like the donor on the same batch.
        renders.open = True
        donor_learner.trainer.generator.manual_seed(9)
        learner.trainer.generator.manual_seed(9)
        donor_learner.renders = renders
        assert donor_learner.step() is not None and learner.step() is not None
        assert learner.version == version + 2
        assert_same(weights(learner.discriminator), weights(donor_learner.discriminator))
    finally:
        server.stop(grace=0)


def test_discriminator_load_from_a_running_learner(cfg, tmp_path: Path, donor):
    """With the update loop running, LoadFrom waits for the copy; GetTrainingState reads stay consistent."""
    donor_learner, donor_server = donor
    donor_steps = 3
    learner, _, server = make_discriminator(cfg, tmp_path / "recipient", member=0, seed=23)
    stop = threading.Event()
    thread = threading.Thread(target=learner.run, args=(stop,), kwargs={"idle_sleep": 0.01}, daemon=True)
    thread.start()
    try:
        reply = request_discriminator_copy(server.address, cfg.services, donor_server.address, donor_member=1,
                                           member=0, timeout=30.0)
        assert reply.applied and reply.version > 0 and reply.donor_version == donor_steps
        versions = set()
        for _ in range(20):
            state = fetch_training_state(server.address, cfg.services, "discriminator", member=0, timeout=30.0)
            assert state.version >= reply.version
            # One Adam step per update since the copy: the counter and the version agree exactly.
            steps = {float(v) for k, v in state.tensors.items() if k.endswith("/step")}
            assert steps == {float(donor_steps + state.version - reply.version)}
            versions.add(state.version)
        assert len(versions) > 1  # the reads did overlap a training loop that kept going
    finally:
        stop.set()
        thread.join(timeout=30)
        server.stop(grace=0)
    assert not thread.is_alive()


def test_discriminator_load_from_refuses_bad_requests(cfg, tmp_path: Path, donor):
    _, donor_server = donor
    learner, _, server = make_discriminator(cfg, tmp_path / "recipient", member=0, seed=24, copy_wait_seconds=0.0)
    try:
        # A request for another member is a failed precondition, as on every other method.
        with pytest.raises(grpc.RpcError) as info:
            load_from(server, cfg, donor_address=donor_server.address, donor_member=1, member=3)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serves member 0, the request is for member 3" in info.value.details()
        cases = [
            (dict(donor_address="", donor_member=1, member=0), "donor_address"),
            (dict(donor_address=donor_server.address, donor_member=-1, member=0), "donor_member"),
        ]
        for fields, word in cases:
            with pytest.raises(grpc.RpcError) as info:
                load_from(server, cfg, **fields)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
            assert word in info.value.details()
        # The donor does not train member 5: it refuses, so the copy is a failed precondition.
        with pytest.raises(grpc.RpcError) as info:
            load_from(server, cfg, donor_address=donor_server.address, donor_member=5, member=0)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "member" in info.value.details()
        # Nobody listens there.
        nowhere = f"127.0.0.1:{free_port()}"
        with pytest.raises(grpc.RpcError) as info:
            load_from(server, cfg, donor_address=nowhere, donor_member=1, member=0)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert nowhere in info.value.details() and "cannot reach" in info.value.details()
        assert learner.version == 0 and learner.pending_copy.request is None
        with pytest.raises(PeerRejected) as rejected:
            request_discriminator_copy(server.address, cfg.services, "", donor_member=1, member=0)
        assert rejected.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(grace=0)
    with pytest.raises(PeerUnavailable):
        fetch_training_state(nowhere, cfg.services, "discriminator", member=0, timeout=2.0,
                             unavailable_retry_seconds=0.2)


def test_request_copy_refuses_a_state_of_another_architecture(cfg, tmp_path: Path):
    learner = DiscriminatorLearner(cfg, tmp_path, np.zeros((4, SIZE, SIZE, 1), np.uint8), FixedRenders(0))
    other_cfg = load_experiment(experiment_path("tiny"), overrides={"discriminator": {"channels": 8}})
    other = DiscriminatorTrainer(other_cfg, build_discriminator(other_cfg))
    with pytest.raises(ValueError, match="critic/"):
        learner.request_copy(other.export_state())
    assert learner.pending_copy.request is None


def test_training_state_chunks_round_trip():
    from spiral.rpc.parameters import assemble_parameters
    tensors = {"critic/w": np.arange(3000, dtype=np.float32).reshape(100, 30),
               "optimizer/0/step": np.asarray(4.0, np.float32)}
    chunks = training_state_chunks(7, tensors, member=3, max_chunk_bytes=4096)
    assert len(chunks) > 1 and all(c.version == 7 and c.member == 3 for c in chunks)
    update = assemble_parameters(chunks)
    assert update is not None and update.version == 7
    assert all(np.array_equal(update.tensors[k], v) for k, v in tensors.items())
