"""The discriminator's reward (``reward_critic``): a pinned level, SPIRAL++'s switches (spectral
norm + non-saturating loss, temporal credit assignment, the complement discriminator) and running
reward normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from discriminator.training import DiscriminatorTrainer
from learner.learner import reward_in_band
from learner.training import PolicyTrainer
from spiral.config import ConfigError, ExperimentConfig, experiment_path, load_experiment
from spiral.agent.discriminator_inputs import (HALVES, complement_mix, discriminator_inputs, half_masks, random_halves,
                                               reward_scores)
from spiral.losses import level_penalty, nonsaturating_discriminator_loss
from spiral.nets import build_discriminator, build_policy, images_to_tensor
from spiral.agent.rewards import RewardFunction, RunningScoreNormalizer
from test_training import bar_targets, collect

SIZE = 64


def experiment(**sections) -> ExperimentConfig:
    """The tiny profile with the fast renderer and the given section overrides."""
    overrides = {"env": {"paint": {"backend": "fast"}}}
    for name, value in sections.items():
        overrides.setdefault(name, {}).update(value)
    return load_experiment(experiment_path("tiny"), overrides=overrides)


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    ({"discriminator_learner": {"objective": "hinge"}}, "discriminator_learner.objective"),
    ({"discriminator_learner": {"level_penalty": -1}}, "discriminator_learner.level_penalty"),
    ({"learner": {"reward": {"normalize": "batch"}}}, "learner.reward.normalize"),
    ({"learner": {"reward": {"normalize_decay": 1.0}}}, "learner.reward.normalize_decay"),
    ({"learner": {"reward": {"normalize_freeze_updates": -2}}}, "learner.reward.normalize_freeze_updates"),
    ({"discriminator": {"complement": True}, "env": {"conditional": False}}, "discriminator.complement"),
    ({"learner": {"reward": {"band": [1.0, -1.0]}}}, "learner.reward.band"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_experiment(experiment_path("tiny"), overrides=overrides)


# -- what the discriminator sees -----------------------------------------------------------------


def test_complement_mix_shows_the_render_on_one_half_and_the_target_elsewhere():
    renders, targets = torch.zeros(4, 1, 8, 8), torch.ones(4, 1, 8, 8)
    mixed = complement_mix(renders, targets, np.arange(4))
    left, right, top, bottom = mixed[:, 0]
    assert torch.all(left[:, :4] == 0) and torch.all(left[:, 4:] == 1)
    assert torch.all(right[:, 4:] == 0) and torch.all(right[:, :4] == 1)
    assert torch.all(top[:4] == 0) and torch.all(top[4:] == 1)
    assert torch.all(bottom[4:] == 0) and torch.all(bottom[:4] == 1)
    # the real example of the complement discriminator is the target itself
    torch.testing.assert_close(complement_mix(targets, targets, np.arange(4)), targets)
    assert half_masks(np.array([0, 1]), 8).sum().item() == 64
    with pytest.raises(ValueError, match="halves"):
        half_masks(np.array([len(HALVES)]), 8)
    with pytest.raises(ValueError, match="one half per image"):
        complement_mix(renders, targets, np.arange(3))


def test_random_halves_cover_every_mask():
    halves = random_halves(np.random.default_rng(0), 400)
    assert sorted(set(halves.tolist())) == [0, 1, 2, 3]


def test_discriminator_inputs_by_experiment():
    images, targets = torch.rand(2, 1, SIZE, SIZE), torch.rand(2, 1, SIZE, SIZE)
    unconditional = experiment(env={"conditional": False})
    assert len(discriminator_inputs(unconditional, images, None)) == 1
    with pytest.raises(ValueError, match="no targets"):
        discriminator_inputs(unconditional, images, targets)
    pairs = discriminator_inputs(experiment(), images, targets)
    assert pairs[0] is images and pairs[1] is targets
    complement = experiment(discriminator={"complement": True})
    (mixed,) = discriminator_inputs(complement, images, targets, np.array([0, 3]))
    torch.testing.assert_close(mixed, complement_mix(images, targets, np.array([0, 3])))
    with pytest.raises(ValueError, match="half"):
        discriminator_inputs(complement, images, targets)
    # the complement discriminator judges one image, not a pair
    assert build_discriminator(complement).conditional is False
    assert build_discriminator(experiment()).conditional is True


def test_reward_scores_by_objective():
    logits = torch.tensor([-3.0, 0.0, 4.0])
    torch.testing.assert_close(reward_scores(logits, experiment()), logits)
    sngan = experiment(discriminator_learner={"objective": "sngan"})
    torch.testing.assert_close(reward_scores(logits, sngan), torch.log(torch.sigmoid(logits)))


# -- the discriminator's losses ------------------------------------------------------------------


def test_level_penalty_and_nonsaturating_loss_values():
    d_real, d_fake = torch.tensor([3.0, 5.0]), torch.tensor([-1.0, 1.0])
    assert level_penalty(d_real, d_fake, 0.5).item() == pytest.approx(0.5 * 2.0 ** 2)
    expected = (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-5.0))) / 2 + (
        math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert nonsaturating_discriminator_loss(d_real, d_fake).item() == pytest.approx(expected, rel=1e-6)


def test_the_level_penalty_alone_moves_the_discriminators_offset():
    """The WGAN loss and its gradient penalty do not depend on D's additive constant (the score
    layer's bias), so that bias's gradient is exactly the level penalty's: 2 * weight * level."""
    cfg = experiment(discriminator_learner={"level_penalty": 0.5})
    torch.manual_seed(0)
    trainer = DiscriminatorTrainer(cfg, build_discriminator(cfg), seed=0)
    with torch.no_grad():
        trainer.discriminator.score.bias.fill_(7.0)  # a drifted level
    captured = {}
    trainer.discriminator.score.bias.register_hook(lambda grad: captured.setdefault("grad", grad.clone()))
    targets = bar_targets(8)
    stats = trainer.update(targets, np.full_like(targets, 255), targets)
    assert stats.level == pytest.approx(0.5 * (stats.d_real + stats.d_fake), rel=1e-6)
    assert stats.level > 5.0 and stats.level_penalty == pytest.approx(0.5 * stats.level ** 2, rel=1e-5)
    assert captured["grad"].item() == pytest.approx(2 * 0.5 * stats.level, rel=1e-4)
    # and without the penalty nothing pulls the level back
    plain = DiscriminatorTrainer(experiment(discriminator_learner={"level_penalty": 0.0}),
                                 build_discriminator(cfg), seed=0)
    plain.discriminator.score.bias.register_hook(lambda grad: captured.__setitem__("plain", grad.clone()))
    assert plain.update(targets, np.full_like(targets, 255), targets).level_penalty == 0.0
    assert captured["plain"].abs().item() < 1e-5


def test_level_penalty_keeps_the_discriminator_level_near_zero_while_it_separates():
    targets = bar_targets(16)
    fakes = np.full_like(targets, 255)
    levels = {}
    for weight in (0.0, 1.0):
        cfg = experiment(discriminator_learner={"level_penalty": weight, "learning_rate": 1e-3})
        torch.manual_seed(0)
        trainer = DiscriminatorTrainer(cfg, build_discriminator(cfg), seed=0)
        with torch.no_grad():
            trainer.discriminator.score.bias.fill_(10.0)
        for _ in range(60):
            stats = trainer.update(targets, fakes, targets)
        levels[weight] = stats.level
        assert stats.wasserstein > 1.0  # it learnt to tell them apart either way
    assert abs(levels[1.0]) < 2.0 < abs(levels[0.0])


def test_spectrally_normalised_discriminator_trained_with_the_nonsaturating_loss():
    # The paper's full-resolution discriminator: one power iteration per update tracks its layers'
    # largest singular values within 40 updates. (Under tiny's pooled 3-layer discriminator at this
    # learning rate the estimate lags: sigma 1.17 after 40 updates, 1.09 after 200.)
    cfg = experiment(discriminator_learner={"objective": "sngan", "learning_rate": 1e-3},
                     discriminator={"num_layers": 4, "input_pool": 1})
    torch.manual_seed(0)
    discriminator = build_discriminator(cfg)
    assert discriminator.spectral_norm
    trainer = DiscriminatorTrainer(cfg, discriminator, seed=0)
    targets = bar_targets(16)
    fakes = np.full_like(targets, 255)
    for _ in range(40):
        stats = trainer.update(targets, fakes, targets)
    assert stats.gp == 0.0 and stats.level_penalty == 0.0
    assert stats.d_real > 0 > stats.d_fake  # logits: real called real, renders called fake
    discriminator.eval()
    with torch.no_grad():  # every layer's largest singular value is held near 1
        for module in (*[m for m in discriminator.features if isinstance(m, torch.nn.Conv2d)], discriminator.score):
            sigma = torch.linalg.matrix_norm(module.weight.flatten(1), ord=2).item()
            assert sigma == pytest.approx(1.0, abs=0.1)
    # weights, buffers and optimiser survive a round trip through the trainer's state
    restored = DiscriminatorTrainer(cfg, build_discriminator(cfg), seed=0)
    restored.load_state_dict(trainer.state_dict())
    real_t = images_to_tensor(targets)
    restored.discriminator.eval()
    torch.testing.assert_close(restored.discriminator(real_t, real_t), discriminator(real_t, real_t))


class SpyDiscriminator(torch.nn.Module):
    """An unconditional discriminator (the complement discriminator's shape) that records its inputs."""

    conditional = False

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().clone())
        return self.w * images.mean(dim=(1, 2, 3))


def test_complement_discriminator_trains_on_targets_against_half_renders():
    cfg = experiment(discriminator={"complement": True})
    discriminator = SpyDiscriminator()
    trainer = DiscriminatorTrainer(cfg, discriminator, seed=0)
    targets = np.zeros((8, SIZE, SIZE, 1), np.uint8)  # black targets, white renders
    trainer.update(targets, np.full_like(targets, 255), targets)
    real, fake = discriminator.seen[0], discriminator.seen[1]
    assert torch.all(real == 0)  # the real example is the target itself
    assert torch.allclose(fake.mean(dim=(1, 2, 3)), torch.full((8,), 0.5))  # half render, half target


# -- the policy learner's rewards ---------------------------------------------------------


class InkDiscriminator(torch.nn.Module):
    """D(image, target) = how much darker than white the image is, in [0, 1] units x 10."""

    conditional = True

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        return 10.0 * (1.0 - images).mean(dim=(1, 2, 3))


def ink_scores(canvases: np.ndarray) -> np.ndarray:
    return 10.0 * (1.0 - canvases.astype(np.float64) / 255.0).mean(axis=(-3, -2, -1))


def discriminator_only(**reward) -> dict:
    return {"discriminator_weight": 0.5, "l2_weight": 0.0, "l2_shaping": False, "blank_penalty": 0.0,
            "stroke_start_penalty": 0.0, **reward}


def test_temporal_credit_pays_each_step_the_change_in_the_discriminators_score():
    cfg = experiment(learner={"reward": discriminator_only(temporal_credit=True)})
    torch.manual_seed(0)
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=4, seed=3)
    discriminator = InkDiscriminator()
    rewards, parts = RewardFunction(cfg)(unroll, discriminator)
    scores = ink_scores(unroll.canvases)  # [T + 1, B]; canvas 0 is the empty canvas
    np.testing.assert_allclose(rewards.numpy(), 0.5 * (scores[1:] - scores[:-1]), rtol=1e-4, atol=1e-5)
    # the return telescopes to the final score minus the empty canvas's
    np.testing.assert_allclose(rewards.sum(0).numpy(), 0.5 * (scores[-1] - scores[0]), rtol=1e-4, atol=1e-5)
    assert discriminator.calls == 1  # every canvas of the unroll in one batched call
    assert parts["discriminator_score"] == pytest.approx(scores[-1].mean(), rel=1e-4)
    assert parts["discriminator_score_empty"] == pytest.approx(0.0, abs=1e-6)
    assert parts["reward_critic"] == pytest.approx(float(rewards.sum(0).mean()), rel=1e-5)


def test_without_temporal_credit_the_discriminator_pays_once_at_the_end():
    cfg = experiment(learner={"reward": discriminator_only(temporal_credit=False)})
    torch.manual_seed(0)
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=4, seed=3)
    rewards, parts = RewardFunction(cfg)(unroll, InkDiscriminator())
    assert torch.all(rewards[:-1] == 0)
    np.testing.assert_allclose(rewards[-1].numpy(), 0.5 * ink_scores(unroll.final_canvases), rtol=1e-4, atol=1e-5)
    assert parts["normalizer_mean"] == 0.0 and parts["normalizer_std"] == 1.0


def test_complement_rewards_keep_one_half_per_episode():
    cfg = experiment(discriminator={"complement": True}, learner={"reward": discriminator_only(temporal_credit=True)})
    torch.manual_seed(0)
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=3, seed=3)
    discriminator = SpyDiscriminator()
    RewardFunction(cfg)(unroll, discriminator)
    seen = discriminator.seen[0].reshape(unroll.num_steps + 1, 3, 1, SIZE, SIZE)
    targets = images_to_tensor(unroll.targets)
    for b in range(3):
        canvases = images_to_tensor(unroll.canvases[:, b])
        # the same half of every canvas of an episode shows the render
        matches = [torch.allclose(seen[:, b], complement_mix(canvases, targets[b].expand_as(canvases),
                                                              np.full(len(canvases), h))) for h in range(4)]
        assert any(matches), b


def test_running_normalizer_statistics_and_freeze():
    normalizer = RunningScoreNormalizer(decay=0.5, freeze_after=2)
    first = torch.tensor([1.0, 3.0])
    out = normalizer(first)
    assert normalizer.mean == pytest.approx(2.0) and normalizer.var == pytest.approx(1.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0]))
    normalizer(torch.tensor([5.0, 7.0]))  # mean 0.5 * 2 + 0.5 * 6 = 4
    assert normalizer.mean == pytest.approx(4.0) and normalizer.frozen
    var = normalizer.var
    assert var == pytest.approx(0.5 * (1.0 + 4.0) + 0.5 * (1.0 + 4.0))  # spread of both batches around 4
    normalizer(torch.tensor([100.0, 200.0]))  # frozen: nothing moves
    assert normalizer.mean == pytest.approx(4.0) and normalizer.var == var
    restored = RunningScoreNormalizer(decay=0.5, freeze_after=2)
    restored.load_state_dict(normalizer.state_dict())
    assert restored.frozen and restored.mean == normalizer.mean and restored.std == normalizer.std
    constant = RunningScoreNormalizer()
    assert torch.isfinite(constant(torch.zeros(4))).all()  # a discriminator that scores all alike


def test_normalised_rewards_have_unit_scale_and_survive_a_checkpoint():
    cfg = experiment(learner={"reward": discriminator_only(temporal_credit=False, normalize="running",
                                                    normalize_freeze_updates=3)})
    torch.manual_seed(0)
    policy = build_policy(cfg)
    unroll = collect(cfg, policy, batch=8, seed=3)
    trainer = PolicyTrainer(cfg, policy)
    rewards, parts = trainer.rewards(unroll, InkDiscriminator())
    final = rewards[-1] / 0.5
    assert final.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert final.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)
    assert parts["normalizer_std"] == pytest.approx(ink_scores(unroll.final_canvases).std(), rel=1e-3)
    restored = PolicyTrainer(cfg, build_policy(cfg))
    restored.load_state_dict(trainer.state_dict())
    assert restored.rewards.normalizer.state_dict() == trainer.rewards.normalizer.state_dict()
    assert "reward_normalizer" in trainer.state_dict()  # the checkpoint key older checkpoints carry


def test_reward_band():
    band = (-2.0, 3.0)
    assert reward_in_band(0.5, band) and reward_in_band(-2.0, band) and reward_in_band(3.0, band)
    assert not reward_in_band(3.5, band) and not reward_in_band(-92.0, band)
    assert not reward_in_band(math.nan, band) and not reward_in_band(math.inf, band)
