"""The policy and discriminator trainers on real episodes from a real paint environment."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from discriminator.training import DiscriminatorTrainer, DiscriminatorUpdateStats
from learner.learner import PolicyLearner
from learner.training import PolicyTrainer, PolicyUpdateStats
from spiral.agent.acting import EpisodeRunner
from spiral.config import ExperimentConfig, experiment_path, load_experiment
from spiral.envs import make_env
from spiral.nets import build_discriminator, build_policy, observation_to_tensors
from spiral.agent.trajectory import Unroll

SIZE = 64


def _backend() -> str:
    """libmypaint where the library loads, else the fast rasterizer."""
    try:
        cfg = load_experiment(experiment_path("tiny"))
        make_env(cfg, 1, 0, backend="libmypaint").close()
        return "libmypaint"
    except (OSError, ImportError, RuntimeError):
        return "fast"


TERMINAL_L2_REWARD = {"discriminator_weight": 0.1, "l2_weight": 1.0, "l2_shaping": False, "l2_pool": 1,
                      "blank_penalty": 0.0, "temporal_credit": False}


def eager_tiny(backend: str, learner: dict) -> ExperimentConfig:
    """The tiny profile on ``backend`` with ``learner`` overrides and its unroll run eagerly: a
    compile costs ~44 s cold, and tests/test_precision.py checks the compiled update."""
    return load_experiment(experiment_path("tiny"), overrides={
        "env": {"paint": {"backend": backend}}, "learner": {"compile": False, **learner}})


@pytest.fixture(scope="module")
def cfg() -> ExperimentConfig:
    # The tiny architecture with a plain terminal reward, pinned here so that tuning the CPU
    # profile's reward shaping does not change what these tests exercise.
    return eager_tiny(_backend(), {"entropy_cost": 0.01, "learning_rate": 3e-4, "ppo_clip": 0.0,
                                   "reward": TERMINAL_L2_REWARD})


def bar_targets(batch: int) -> np.ndarray:
    """Dark horizontal bars on white paper, at different heights."""
    images = np.full((batch, SIZE, SIZE, 1), 255, np.uint8)
    for i in range(batch):
        row = 12 + (i * 7) % 40
        images[i, row:row + 4, 8:56] = 0
    return images


def collect(cfg: ExperimentConfig, policy, batch: int, seed: int) -> Unroll:
    """Act one episode on ``batch`` real environments with the actor's own loop."""
    env = make_env(cfg, batch, seed)
    try:
        return EpisodeRunner(cfg, env, policy, None, seed=seed, actor_id="test").run_episode(bar_targets(batch) if cfg.env.conditional else None)
    finally:
        env.close()


def parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def episode_log_probs(policy, unroll: Unroll) -> torch.Tensor:
    with torch.no_grad():
        out = policy.unroll(observation_to_tensors(unroll.observations()), torch.from_numpy(unroll.actions),
                            policy.initial_state(unroll.batch_size))
    return out.log_prob.sum(0)


def test_policy_update_on_a_real_unroll(cfg):
    torch.manual_seed(0)
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=4, seed=1)
    trainer = PolicyTrainer(cfg, policy)
    discriminator = build_discriminator(cfg).eval()
    before = parameters(policy)
    stats = trainer.update(unroll, discriminator, discriminator_version=3)
    assert isinstance(stats, PolicyUpdateStats)
    for name, value in vars(stats).items():
        assert math.isfinite(value), name
    # The learner re-scores the actor's actions with the same weights: on-policy, rho = 1.
    assert stats.mean_rho == pytest.approx(1.0, abs=1e-4)
    assert stats.discriminator_version == 3.0
    assert stats.learning_rate == cfg.learner.learning_rate and stats.entropy_cost == cfg.learner.entropy_cost
    assert 0.0 < stats.reconstruction_l2 < 1.0 and stats.grad_norm > 0
    assert stats.entropy_loss < 0  # minus the summed entropy
    changed = [not torch.equal(a, b) for a, b in zip(before, parameters(policy))]
    assert sum(changed) > 0.9 * len(changed)


def test_rewards_sit_at_the_last_step_with_stroke_penalties(cfg):
    reward = {"discriminator_weight": 0.0, "l2_weight": 1.0, "stroke_start_penalty": 0.25, "l2_shaping": False}
    cfg = eager_tiny(cfg.env.paint.backend, {"reward": reward})
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=4, seed=2)
    trainer = PolicyTrainer(cfg, policy)
    rewards, parts = trainer.rewards(unroll, None)
    flags = unroll.actions[..., 0]
    starts = (flags == 1) & ~np.concatenate([np.zeros((1, 4), bool), flags[:-1] == 1])
    l2 = ((unroll.final_canvases / 255.0 - unroll.targets / 255.0) ** 2).reshape(4, -1).mean(1)
    expected = -0.25 * starts.astype(np.float64)
    expected[-1] -= l2
    np.testing.assert_allclose(rewards.numpy(), expected, atol=1e-6)
    assert parts["stroke_starts"] == pytest.approx(starts.sum(0).mean())
    stats = trainer.update(unroll, None)
    assert stats.paint_fraction == pytest.approx(float((flags == 1).mean()))
    assert math.isnan(stats.discriminator_score)
    assert stats.mean_reward == pytest.approx(float(expected.sum(0).mean()), abs=1e-6)


def test_l2_shaping_pays_each_step_its_drop_in_error(cfg):
    reward = {"discriminator_weight": 0.0, "l2_weight": 2.0, "l2_shaping": True, "l2_pool": 1}
    shaped_cfg = eager_tiny(cfg.env.paint.backend, {"reward": reward})
    plain_cfg = eager_tiny(cfg.env.paint.backend, {"reward": {**reward, "l2_shaping": False}})
    policy = build_policy(shaped_cfg)
    unroll = collect(shaped_cfg, policy, batch=4, seed=3)
    shaped, _ = PolicyTrainer(shaped_cfg, policy).rewards(unroll, None)
    plain, _ = PolicyTrainer(plain_cfg, policy).rewards(unroll, None)
    errors = np.stack([((c / 255.0 - unroll.targets / 255.0) ** 2).reshape(4, -1).mean(1) for c in unroll.canvases])
    np.testing.assert_allclose(shaped.numpy(), 2.0 * (errors[:-1] - errors[1:]), atol=1e-5)
    # Same return up to a per-episode constant (the empty canvas's error): same optimal policy.
    np.testing.assert_allclose(shaped.sum(0).numpy(), plain.sum(0).numpy() + 2.0 * errors[0], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_learning_raises_the_log_prob_of_rewarded_episodes(cfg, seed):
    # Only the policy-gradient term: no baseline fit or entropy bonus reshaping the shared torso.
    cfg = eager_tiny(cfg.env.paint.backend, {"baseline_cost": 0.0, "entropy_cost": 0.0})
    torch.manual_seed(seed)
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=8, seed=3 + seed)
    trainer = PolicyTrainer(cfg, policy)
    rewards = torch.zeros(unroll.num_steps, 8)
    rewards[-1, :4], rewards[-1, 4:] = 1.0, -1.0
    before = episode_log_probs(policy, unroll)
    for _ in range(3):
        trainer.learn(unroll, rewards)
    delta = episode_log_probs(policy, unroll) - before
    # Rewarded episodes became more likely relative to punished ones (per-episode changes also
    # carry shared drift, since the near-uniform policy first learns state-independent biases).
    assert delta[:4].mean() > delta[4:].mean() + 0.05, delta


def test_loss_decreases_on_a_repeated_fixed_batch(cfg):
    torch.manual_seed(2)
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=8, seed=4)
    trainer = PolicyTrainer(cfg, policy)
    history = [trainer.update(unroll, None) for _ in range(24)]
    # The baseline loss has fixed targets on a fixed batch and must fall; the total loss need not
    # (its advantages change as the baseline learns), but the advantages shrink with the baseline
    # error, and with them the policy-gradient term.
    assert history[-1].baseline_loss < 0.2 * history[0].baseline_loss
    assert abs(history[-1].pg_loss) < 0.5 * abs(history[0].pg_loss)
    assert history[-1].mean_rho != pytest.approx(1.0, abs=1e-4)  # the batch is off-policy by now


@pytest.mark.parametrize("behaviour_shift, kept", [(-5.0, False), (+5.0, True), (0.0, True)])
def test_ppo_clip_drops_the_steps_the_policy_has_already_moved_past(cfg, behaviour_shift, kept):
    """``learner.ppo_clip``: with every advantage positive, steps whose ratio pi/mu is above
    1 + eps give no policy gradient (the only loss term here); ratios below it still do."""
    torch.manual_seed(5)
    acting = build_policy(cfg)
    unroll = collect(cfg, acting, batch=4, seed=6)
    shifted = dataclasses.replace(unroll, behaviour_log_probs=unroll.behaviour_log_probs + np.float32(behaviour_shift))
    rewards = torch.full((unroll.num_steps, unroll.batch_size), 100.0)  # far above any untrained value
    stats = {}
    for clip in (0.0, 0.2):
        clipped = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, ppo_clip=clip, baseline_cost=0.0))
        trainer = PolicyTrainer(clipped, copy.deepcopy(acting))
        trainer.set_hyperparameters(entropy_cost=0.0)
        stats[clip] = trainer.learn(shifted, rewards)
    assert stats[0.0].clip_fraction == 0.0 and stats[0.0].grad_norm > 0
    assert stats[0.2].mean_rho == pytest.approx(math.exp(-behaviour_shift), rel=1e-3)
    if kept:  # rho = 1 or e^-5: inside the region, or below it with a positive advantage
        assert stats[0.2].clip_fraction == 0.0
        assert stats[0.2].grad_norm == pytest.approx(stats[0.0].grad_norm, rel=1e-5)
    else:  # rho = e^5 > 1.2 with a positive advantage everywhere: nothing left to push
        assert stats[0.2].clip_fraction == 1.0 and stats[0.2].grad_norm == 0.0


def test_hyperparameters_reach_the_optimizer(cfg):
    trainer = PolicyTrainer(cfg, build_policy(cfg))
    trainer.set_hyperparameters(learning_rate=2e-3)
    assert trainer.hyperparameters == {"learning_rate": 2e-3, "entropy_cost": cfg.learner.entropy_cost}
    assert all(group["lr"] == 2e-3 for group in trainer.optimizer.param_groups)
    trainer.set_hyperparameters(entropy_cost=0.05)
    assert trainer.hyperparameters["entropy_cost"] == 0.05
    with pytest.raises(ValueError, match="learning_rate"):
        trainer.set_hyperparameters(learning_rate=-1.0)
    with pytest.raises(ValueError, match="entropy_cost"):
        trainer.set_hyperparameters(entropy_cost=float("nan"))


def assert_same_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def test_policy_trainer_state_round_trip(cfg):
    torch.manual_seed(3)
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=4, seed=5)
    trainer = PolicyTrainer(cfg, policy)
    trainer.update(unroll, None)
    trainer.set_hyperparameters(learning_rate=5e-4, entropy_cost=0.02)
    trainer.update(unroll, None)
    state = copy.deepcopy(trainer.state_dict())

    torch.manual_seed(99)
    restored = PolicyTrainer(cfg, build_policy(cfg))
    restored.load_state_dict(state)
    assert_same_state(restored.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert restored.hyperparameters == {"learning_rate": 5e-4, "entropy_cost": 0.02}
    # The next update is the same from the original and from the restored trainer.
    trainer.update(unroll, None)
    restored.update(unroll, None)
    for a, b in zip(parameters(trainer.policy), parameters(restored.policy)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="optimizer"):
        restored.load_state_dict({"policy": state["policy"], "hyperparameters": {}})


def test_policy_average_is_the_moving_average_of_the_weights_and_survives_a_checkpoint(cfg):
    decay = 0.75
    averaged = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, policy_average_decay=decay))
    torch.manual_seed(4)
    policy = build_policy(averaged)
    unroll = collect(averaged, policy, batch=4, seed=6)
    trainer = PolicyTrainer(averaged, policy)
    assert PolicyTrainer(cfg, build_policy(cfg)).average is None  # off by default
    trainer.update(unroll, None)
    first = parameters(trainer.policy)
    # The first update starts the average at the weights it produced.
    for a, b in zip(parameters(trainer.average.module), first):
        assert torch.equal(a, b)
    trainer.update(unroll, None)
    second = parameters(trainer.policy)
    for avg, w1, w2 in zip(parameters(trainer.average.module), first, second):
        torch.testing.assert_close(avg, decay * w1 + (1 - decay) * w2)
    assert any(not torch.equal(avg, w2) for avg, w2 in zip(parameters(trainer.average.module), second))

    state = copy.deepcopy(trainer.state_dict())
    assert state["policy_average_updates"] == 2
    restored = PolicyTrainer(averaged, build_policy(averaged))
    restored.load_state_dict(state)
    assert_same_state(restored.average.module.state_dict(), trainer.average.module.state_dict())
    trainer.update(unroll, None)
    restored.update(unroll, None)
    for a, b in zip(parameters(trainer.average.module), parameters(restored.average.module)):
        assert torch.equal(a, b)

    # A PBT copy restarts the average at the copied member's weights.
    donor = PolicyTrainer(averaged, build_policy(averaged))
    restored.import_state(donor.export_state())
    for a, b in zip(parameters(restored.average.module), parameters(donor.policy)):
        assert torch.equal(a, b)
    # A checkpoint written without an average starts one at its weights.
    fresh = PolicyTrainer(averaged, build_policy(averaged))
    fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("policy_average")})
    for a, b in zip(parameters(fresh.average.module), parameters(fresh.policy)):
        assert torch.equal(a, b)


# -- the discriminator ------------------------------------------------------------------------


@pytest.mark.parametrize("conditional", [False, True])
def test_discriminator_separates_real_from_different_fakes(cfg, conditional):
    cfg = load_experiment(experiment_path("tiny"), overrides={"env": {"conditional": conditional}})
    torch.manual_seed(4)
    trainer = DiscriminatorTrainer(cfg, build_discriminator(cfg))
    real = bar_targets(8)
    rng = np.random.default_rng(0)
    fake = np.full_like(real, 255)
    fake[:, 20:44, 20:44] = rng.integers(0, 256, (8, 24, 24, 1), dtype=np.uint8)  # a noise blob, no bar
    fake_targets = real if conditional else None
    history = [trainer.update(real, fake, fake_targets) for _ in range(40)]
    assert isinstance(history[0], DiscriminatorUpdateStats)
    first, last = history[0], history[-1]
    assert last.wasserstein > first.wasserstein + 0.3
    assert last.d_real > last.d_fake
    assert last.wasserstein == pytest.approx(last.d_real - last.d_fake, abs=1e-5)
    assert all(math.isfinite(s.gp) and s.gp >= 0 for s in history)


def test_discriminator_input_checks(cfg):
    trainer = DiscriminatorTrainer(cfg, build_discriminator(cfg))  # tiny is conditional
    real = bar_targets(2)
    with pytest.raises(ValueError, match="fake_targets"):
        trainer.update(real, real)
    with pytest.raises(ValueError, match="uint8"):
        trainer.update(real.astype(np.float32), real, real)
    with pytest.raises(ValueError, match="fake"):
        trainer.update(real, real[:1], real)


def test_discriminator_trainer_state_round_trip(cfg):
    torch.manual_seed(5)
    trainer = DiscriminatorTrainer(cfg, build_discriminator(cfg))
    real = bar_targets(4)
    fake = np.full_like(real, 255)
    for _ in range(2):
        trainer.update(real, fake, real)
    state = copy.deepcopy(trainer.state_dict())
    torch.manual_seed(6)
    restored = DiscriminatorTrainer(cfg, build_discriminator(cfg))
    restored.load_state_dict(state)
    assert_same_state(restored.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert_same_state(restored.discriminator.state_dict(), trainer.discriminator.state_dict())


@pytest.mark.slow
def test_reconstruction_reward_improves_with_training(cfg):
    """End to end on CPU: acting and learning on fixed targets with reward -L2 lowers the L2."""
    cfg = load_experiment(experiment_path("tiny"), overrides={
        "env": {"paint": {"backend": cfg.env.paint.backend}},
        "learner": {"learning_rate": 1e-3, "entropy_cost": 0.01,
                    "reward": {**TERMINAL_L2_REWARD, "discriminator_weight": 0.0}}})
    torch.manual_seed(7)
    policy = build_policy(cfg)
    trainer = PolicyTrainer(cfg, policy)
    l2 = []
    for iteration in range(60):
        unroll = collect(cfg, policy, batch=16, seed=100 + iteration)
        l2.append(trainer.update(unroll, None).reconstruction_l2)
    assert np.mean(l2[-10:]) < 0.8 * np.mean(l2[:10]), l2


def test_learner_refuses_a_checkpoint_of_another_policy_architecture(cfg, tmp_path):
    PolicyLearner(cfg, Path(tmp_path)).checkpoint()
    other = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, location_skip=not cfg.policy.location_skip))
    expected = r"(?s)does not fit this experiment.s policy.*policy\.\* settings.*location_skips"
    with pytest.raises(ValueError, match=expected):
        PolicyLearner(other, Path(tmp_path))
    assert PolicyLearner(cfg, Path(tmp_path)).version == 0  # the same settings resume


def relabelled(unroll: Unroll) -> Unroll:
    return dataclasses.replace(unroll, targets=unroll.final_canvases.copy())


def prior_unroll(cfg: ExperimentConfig, batch: int, seed: int) -> Unroll:
    env = make_env(cfg, batch, seed)
    try:
        return EpisodeRunner(cfg, env, build_policy(cfg), None, seed=seed, actor_id="prior").run_prior_episode()
    finally:
        env.close()


def test_program_recovery_is_the_likelihood_of_each_episodes_program_given_its_own_render(cfg):
    torch.manual_seed(4)
    recovering = eager_tiny(cfg.env.paint.backend, {"hindsight_weight": 0.5, "entropy_cost": 0.01,
                                                    "reward": TERMINAL_L2_REWARD})
    policy = build_policy(recovering)
    unroll = collect(recovering, policy, batch=4, seed=5)
    prior = prior_unroll(recovering, batch=3, seed=6)
    assert prior.prior and (prior.targets == prior.final_canvases).all()
    assert (prior.behaviour_log_probs == 0).all()
    expected = -(episode_log_probs(policy, relabelled(unroll)).sum() + episode_log_probs(policy, prior).sum())
    plain_policy = copy.deepcopy(policy)
    rewards = torch.zeros(unroll.num_steps, 4)
    stats = PolicyTrainer(recovering, policy).learn(unroll, rewards, prior=prior)
    assert stats.recovery_episodes == 7
    assert stats.recovery_loss == pytest.approx(float(expected), rel=1e-5)
    # The same step without recovery: the total loss differs by exactly the weighted term.
    plain = PolicyTrainer(dataclasses.replace(recovering, learner=dataclasses.replace(
        recovering.learner, hindsight_weight=0.0)), plain_policy).learn(unroll, rewards, prior=prior)
    assert plain.recovery_loss == 0.0 and plain.recovery_episodes == 0
    assert stats.loss == pytest.approx(plain.loss + 0.5 * float(expected), rel=1e-5)
    assert stats.pg_loss == pytest.approx(plain.pg_loss, rel=1e-5, abs=1e-6)


def test_program_recovery_alone_makes_each_render_s_program_more_likely(cfg):
    recovering = eager_tiny(cfg.env.paint.backend, {"hindsight_weight": 1.0, "entropy_cost": 0.0,
                                                    "baseline_cost": 0.0, "learning_rate": 1e-3})
    torch.manual_seed(7)
    policy = build_policy(recovering)
    unroll = collect(recovering, policy, batch=4, seed=8)
    trainer = PolicyTrainer(recovering, policy)
    before = episode_log_probs(policy, relabelled(unroll))
    for _ in range(5):
        trainer.learn(unroll, torch.zeros(unroll.num_steps, 4))  # no reward: recovery alone moves the policy
    after = episode_log_probs(policy, relabelled(unroll))
    assert (after > before).all(), (before, after)


def test_prior_episodes_are_never_trained_on_with_the_reward(cfg):
    recovering = eager_tiny(cfg.env.paint.backend, {"hindsight_weight": 1.0})
    prior = prior_unroll(recovering, batch=2, seed=9)
    trainer = PolicyTrainer(recovering, build_policy(recovering))
    with pytest.raises(ValueError, match="not trained on with the reward"):
        trainer.learn(prior, torch.zeros(prior.num_steps, 2))
    with pytest.raises(ValueError, match="prior programs"):
        trainer.learn(collect(recovering, build_policy(recovering), batch=2, seed=1), torch.zeros(prior.num_steps, 2),
                      prior=dataclasses.replace(prior, prior=False))
