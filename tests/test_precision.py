"""bf16 mixed precision (spiral.nets.precision): configuration, fallback and its error against fp32.

The tolerances are stated per quantity and checked on the same real episodes (libmypaint or the
fast rasterizer), with a policy whose heads were made peaky: sharp logits amplify rounding, and
an untrained policy's near-uniform ones would hide it. Multiplying the heads' weights by 5 gives
a mean per-step entropy of ~2.2 nats, sharper than the CPU profile's policies after 20 minutes
of training (3.2-4.5); on those checkpoints bf16 autocast moved log-probabilities by 0.015 nats
on average and 0.06-0.13 at most (bench/RESULTS.md), on this policy by 0.015 and 0.10.

* per-step log-probability (a sum over the kept heads): at most ``LOG_PROB_TOL`` nats, and
  ``LOG_PROB_MEAN_TOL`` on average (an importance weight off by ~3% on average);
* per-step entropy: within ``ENTROPY_TOL`` nats;
* value: within ``VALUE_TOL``;
* V-trace targets ``vs`` and advantages (unit-normal rewards): within ``VTRACE_TOL`` times the
  targets' standard deviation (the importance weights' error, compounded over the unroll's
  traces; 0.10 on this policy).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from spiral.agent.acting import EpisodeRunner
from discriminator.training import DiscriminatorTrainer
from learner.training import PolicyTrainer
from spiral.agent.rewards import RewardFunction
from spiral.config import ConfigError, ExperimentConfig, RewardConfig, experiment_path, load_experiment
from spiral.envs import make_env
from spiral.losses import vtrace
from spiral.nets import build_discriminator, build_policy, observation_to_tensors
from spiral.nets.precision import autocast, bf16_native, bf16_runs, cpu_bf16_units, resolve_precision
from test_losses import reward_experiment, two_tiny_episodes

LOG_PROB_TOL = 0.2
LOG_PROB_MEAN_TOL = 0.03
ENTROPY_TOL = 0.1
VALUE_TOL = 0.02
VTRACE_TOL = 0.15
HEAD_SHARPENING = 5.0

_skip_without_bf16 = pytest.mark.skipif(not bf16_runs("cpu"), reason="this CPU has no bf16 kernels (AMX/AVX-512-BF16)")


@pytest.fixture
def bf16_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``precision: bf16`` take effect on a CPU whose bf16 kernels run but do not pay (no AMX):
    these tests check bf16's numbers, not its speed."""
    monkeypatch.setattr("spiral.nets.precision.bf16_native", lambda device: True)


def needs_bf16(test):  # type: ignore[no-untyped-def]
    """Skip where the CPU has no bf16 kernels at all; elsewhere run the test with bf16 in effect."""
    return _skip_without_bf16(pytest.mark.usefixtures("bf16_everywhere")(test))


def test_bf16_counts_as_native_on_a_cpu_only_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """AVX-512-BF16 without AMX runs bf16 slower than fp32 (bench/RESULTS.md): it falls back."""
    monkeypatch.setattr("spiral.nets.precision.bf16_runs", lambda device: True)
    monkeypatch.setattr("spiral.nets.precision.cpu_bf16_units", lambda: ["avx512_bf16"])
    assert not bf16_native("cpu")
    assert resolve_precision("bf16", "cpu") == "fp32"
    monkeypatch.setattr("spiral.nets.precision.cpu_bf16_units", lambda: ["amx_bf16", "avx512_bf16"])
    assert bf16_native("cpu")
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert set(cpu_bf16_units()) <= {"amx_bf16", "avx512_bf16"}


def _backend() -> str:
    try:
        make_env(load_experiment(experiment_path("tiny")), 1, 0, backend="libmypaint").close()
        return "libmypaint"
    except (OSError, ImportError, RuntimeError):
        return "fast"


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    return load_experiment(experiment_path("tiny-critic"), overrides={"env": {"paint": {"backend": _backend()}}})


def _targets(n: int) -> np.ndarray:
    images = np.full((n, 64, 64, 1), 255, np.uint8)
    for i in range(n):
        images[i, 10 + 5 * i:16 + 5 * i, 8:56] = 0
    return images


def _peaky_policy(cfg: ExperimentConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    policy = build_policy(cfg)
    with torch.no_grad():
        for head in policy.heads:
            for p in head.parameters():
                p.mul_(HEAD_SHARPENING)
        policy.value_head.weight.normal_(0.0, 0.5)
    return policy


def test_precision_fields_are_validated_and_named() -> None:
    for section in ("learner", "discriminator_learner", "actor"):
        with pytest.raises(ConfigError, match=rf"{section}\.precision"):
            load_experiment(experiment_path("tiny"), overrides={section: {"precision": "fp16"}})
    cfg = load_experiment(experiment_path("tiny"), overrides={"learner": {"precision": "bf16"}})
    assert cfg.learner.precision == "bf16" and cfg.actor.precision == "fp32"


def test_resolve_precision_falls_back_where_bf16_is_not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="learner.precision"):
        resolve_precision("fp8", "cpu", "learner.precision")
    monkeypatch.setattr("spiral.nets.precision.bf16_native", lambda device: False)
    assert resolve_precision("bf16", "cpu") == "fp32"
    monkeypatch.setattr("spiral.nets.precision.bf16_native", lambda device: True)
    assert resolve_precision("bf16", "cpu") == "bf16"


@needs_bf16
def test_bf16_scores_stay_within_the_stated_tolerance_of_fp32(cfg: ExperimentConfig) -> None:
    policy = _peaky_policy(cfg)
    unroll = EpisodeRunner(cfg, make_env(cfg, 8, 0), policy, _targets(8), seed=0).run_episode()
    inputs = observation_to_tensors(unroll.observations())
    actions = torch.from_numpy(unroll.actions)
    t, b = unroll.num_steps, unroll.batch_size
    with torch.no_grad():
        full = policy.unroll(inputs, actions, policy.initial_state(b))
        with autocast("bf16", "cpu"):
            half = policy.unroll(inputs, actions, policy.initial_state(b))
    for out in (full, half):
        assert out.log_prob.dtype == out.entropy.dtype == out.value.dtype == torch.float32
    # The heads are sharp: rounding is visible, so the comparison below measures something.
    assert 1.0 < float(full.entropy.mean()) < 3.5
    error = (full.log_prob - half.log_prob).abs()
    assert float(error.max()) > 0.0
    assert float(error.max()) < LOG_PROB_TOL and float(error.mean()) < LOG_PROB_MEAN_TOL
    assert float((full.entropy - half.entropy).abs().max()) < ENTROPY_TOL
    assert float((full.value - half.value).abs().max()) < VALUE_TOL

    behaviour = torch.from_numpy(unroll.behaviour_log_probs)
    discounts = torch.full((t, b), 0.99)
    discounts[-1] = 0.0
    rewards = torch.from_numpy(np.random.default_rng(0).normal(size=(t, b)).astype(np.float32))
    ref = vtrace(behaviour, full.log_prob, discounts, rewards, full.value, torch.zeros(b))
    low = vtrace(behaviour, half.log_prob, discounts, rewards, half.value, torch.zeros(b))
    spread = float(ref.vs.std())
    assert float((ref.vs - low.vs).abs().max()) < VTRACE_TOL * spread
    assert float((ref.pg_advantages - low.pg_advantages).abs().max()) < VTRACE_TOL * spread


@needs_bf16
def test_bf16_acting_records_fp32_behaviour_log_probs_close_to_the_fp32_scores(cfg: ExperimentConfig) -> None:
    bf16 = load_experiment(experiment_path("tiny-critic"), overrides={
        "env": {"paint": {"backend": cfg.env.paint.backend}}, "actor": {"precision": "bf16"}})
    policy = _peaky_policy(cfg)
    runner = EpisodeRunner(bf16, make_env(bf16, 8, 0), policy, _targets(8), seed=0)
    assert runner.precision == "bf16"
    unroll = runner.run_episode()
    assert unroll.behaviour_log_probs.dtype == np.float32
    with torch.no_grad():
        scored = policy.unroll(observation_to_tensors(unroll.observations()), torch.from_numpy(unroll.actions),
                               policy.initial_state(unroll.batch_size))
    error = np.abs(scored.log_prob.numpy() - unroll.behaviour_log_probs)
    assert error.max() < LOG_PROB_TOL and error.mean() < LOG_PROB_MEAN_TOL


@needs_bf16
def test_bf16_updates_keep_fp32_master_weights_and_optimizer_state(cfg: ExperimentConfig) -> None:
    bf16 = load_experiment(experiment_path("tiny-critic"), overrides={
        "env": {"paint": {"backend": cfg.env.paint.backend}},
        "learner": {"precision": "bf16"}, "discriminator_learner": {"precision": "bf16"}})
    unroll = EpisodeRunner(bf16, make_env(bf16, 8, 0), build_policy(bf16), _targets(8), seed=0).run_episode()
    trainer = PolicyTrainer(bf16, build_policy(bf16))
    discriminator = build_discriminator(bf16).eval()
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    stats = trainer.update(unroll, discriminator, 1)
    assert trainer.precision == "bf16"
    assert np.isfinite([stats.loss, stats.grad_norm, stats.mean_reward]).all()
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values()
               for k, v in s.items() if k != "step")
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.policy.parameters()))

    disc = DiscriminatorTrainer(bf16, build_discriminator(bf16))
    assert disc.precision == "bf16"
    real = _targets(8)
    out = disc.update(real, unroll.final_canvases, real)
    assert np.isfinite([out.loss, out.gp, out.d_real, out.d_fake]).all()
    assert all(p.dtype == torch.float32 for p in disc.discriminator.parameters())


@needs_bf16
def test_bf16_discriminator_update_stays_close_to_fp32(cfg: ExperimentConfig) -> None:
    """The same discriminator, batch and penalty draws in both precisions: losses agree within 2%."""
    unroll = EpisodeRunner(cfg, make_env(cfg, 8, 0), build_policy(cfg), _targets(8), seed=0).run_episode()
    real = _targets(8)
    results = {}
    for precision in ("fp32", "bf16"):
        c = load_experiment(experiment_path("tiny-critic"), overrides={
            "env": {"paint": {"backend": cfg.env.paint.backend}}, "discriminator_learner": {"precision": precision}})
        torch.manual_seed(3)
        results[precision] = DiscriminatorTrainer(c, build_discriminator(c), seed=0).update(
            real, unroll.final_canvases, real)
    full, half = results["fp32"], results["bf16"]
    assert abs(full.loss - half.loss) <= 0.02 * abs(full.loss) + 0.02
    assert abs(full.d_real - half.d_real) < 0.02 and abs(full.d_fake - half.d_fake) < 0.02


def test_compiled_unroll_matches_eager_and_checks_actions_outside_the_graph(cfg: ExperimentConfig) -> None:
    """learner.compile: the compiled update takes the same step as the eager one (fp32)."""
    from spiral.nets.compilation import compiler_missing
    if compiler_missing("cpu"):
        pytest.skip(compiler_missing("cpu"))
    compiled_cfg = load_experiment(experiment_path("tiny-critic"), overrides={
        "env": {"paint": {"backend": cfg.env.paint.backend}}, "learner": {"compile": True}})
    unroll = EpisodeRunner(cfg, make_env(cfg, 8, 0), build_policy(cfg), _targets(8), seed=0).run_episode()
    discriminator = build_discriminator(cfg).eval()
    stats = {}
    for name, c in (("eager", cfg), ("compiled", compiled_cfg)):
        torch.manual_seed(0)
        trainer = PolicyTrainer(c, build_policy(c))
        stats[name] = trainer.update(unroll, discriminator, 1)
    assert stats["compiled"].loss == pytest.approx(stats["eager"].loss, rel=1e-4, abs=1e-4)
    assert stats["compiled"].grad_norm == pytest.approx(stats["eager"].grad_norm, rel=1e-3)
    bad = copy.deepcopy(unroll)
    bad.actions[0, 0, 1] = 10_000
    with pytest.raises(ValueError, match="out of range"):
        trainer.update(bad, discriminator, 1)


@needs_bf16
def test_fp32_heads_cut_bf16s_log_prob_error(cfg: ExperimentConfig) -> None:
    """policy.fp32_heads: the same peaky policy's bf16 log-probabilities come much closer to fp32."""
    heads = load_experiment(experiment_path("tiny-critic"), overrides={
        "env": {"paint": {"backend": cfg.env.paint.backend}}, "policy": {"fp32_heads": True}})
    plain, fp32_heads = _peaky_policy(cfg), _peaky_policy(heads)
    unroll = EpisodeRunner(cfg, make_env(cfg, 8, 0), plain, _targets(8), seed=0).run_episode()
    inputs = observation_to_tensors(unroll.observations())
    actions = torch.from_numpy(unroll.actions)
    errors = {}
    for name, policy in (("plain", plain), ("fp32_heads", fp32_heads)):
        with torch.no_grad():
            full = policy.unroll(inputs, actions, policy.initial_state(8))
            with autocast("bf16", "cpu"):
                half = policy.unroll(inputs, actions, policy.initial_state(8))
        errors[name] = float((full.log_prob - half.log_prob).abs().mean())
    assert errors["fp32_heads"] < 0.25 * errors["plain"]


class AutocastSpy(torch.nn.Module):
    """A conditional discriminator that notes whether it ran under CPU autocast, and in which dtype."""

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        return (1.0 - images).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("precision, autocast_dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_the_reward_runs_the_discriminator_in_the_learners_precision(precision: str,
                                                                      autocast_dtype: torch.dtype | None) -> None:
    """``learner.precision`` covers the discriminator's forward in the reward as it covers the
    unroll (:class:`spiral.agent.rewards.RewardFunction` gets the trainer's resolved precision);
    the rewards themselves stay fp32."""
    spy = AutocastSpy()
    rewards, _ = RewardFunction(reward_experiment(RewardConfig()), "cpu", precision)(two_tiny_episodes(), spy)
    assert spy.autocast_dtype == autocast_dtype and rewards.dtype == torch.float32
    eager = load_experiment(experiment_path("tiny"), overrides={"learner": {"compile": False}})
    trainer = PolicyTrainer(eager, build_policy(eager))
    assert trainer.rewards.precision == trainer.precision
