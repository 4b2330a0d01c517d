"""Losses and rewards against plain reference implementations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from spiral.agent.rewards import RewardFunction, is_blank, reconstruction_l2, stroke_starts
from spiral.agent.trajectory import Unroll
from spiral.config import ExperimentConfig, RewardConfig, experiment_path, load_experiment
from spiral.losses import (baseline_loss, entropy_loss, gradient_penalty, policy_gradient_loss, trust_region_mask,
                           vtrace, wasserstein_estimate, wgan_discriminator_loss)
from spiral.nets import images_to_tensor
from spiral.nets.discriminator import Discriminator


def reference_vtrace(mu_log, pi_log, gamma, r, v, bootstrap, rho_bar, pg_rho_bar, c_bar):
    """IMPALA's definition, loop by loop in float64:

    v_s = V(x_s) + sum_{t>=s} gamma^{t-s}-products * (prod_{i=s}^{t-1} c_i) * delta_t,
    delta_t = min(rho_bar, rho_t) (r_t + gamma_t V(x_{t+1}) - V(x_t)).
    """
    T, B = v.shape
    rho = np.exp(pi_log - mu_log)
    vs = np.zeros((T, B))
    adv = np.zeros((T, B))
    for b in range(B):
        values = list(v[:, b]) + [bootstrap[b]]
        for s in range(T):
            total = values[s]
            for t in range(s, T):
                weight = 1.0
                for i in range(s, t):
                    weight *= gamma[i, b] * min(c_bar, rho[i, b])
                delta = min(rho_bar, rho[t, b]) * (r[t, b] + gamma[t, b] * values[t + 1] - values[t])
                total += weight * delta
            vs[s, b] = total
        for s in range(T):
            next_vs = vs[s + 1, b] if s + 1 < T else bootstrap[b]
            adv[s, b] = min(pg_rho_bar, rho[s, b]) * (r[s, b] + gamma[s, b] * next_vs - v[s, b])
    return vs, adv, rho


@pytest.mark.parametrize("thresholds", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.8), (3.0, 0.7, 1.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vtrace_matches_the_impala_recursion(thresholds, seed):
    rng = np.random.default_rng(seed)
    T, B = 7, 5
    mu_log = rng.normal(-2.0, 1.0, (T, B))
    pi_log = mu_log + rng.normal(0.0, 0.8, (T, B))
    pi_log[0, 0], pi_log[2, 3] = mu_log[0, 0] + 2.0, mu_log[2, 3] - 2.0  # rhos on both sides of every threshold
    gamma = rng.uniform(0.5, 1.0, (T, B))
    gamma[3, 1] = 0.0  # an episode boundary inside the unroll
    r = rng.normal(size=(T, B))
    v = rng.normal(size=(T, B))
    bootstrap = rng.normal(size=B)
    rho_bar, pg_rho_bar, c_bar = thresholds
    rho = np.exp(pi_log - mu_log)
    assert (rho > max(thresholds)).any() and (rho < min(thresholds)).any()

    def t(x):
        return torch.tensor(x, dtype=torch.float64)

    out = vtrace(t(mu_log), t(pi_log), t(gamma), t(r), t(v), t(bootstrap), clip_rho_threshold=rho_bar,
                 clip_pg_rho_threshold=pg_rho_bar, clip_c_threshold=c_bar)
    vs, adv, rhos = reference_vtrace(mu_log, pi_log, gamma, r, v, bootstrap, rho_bar, pg_rho_bar, c_bar)
    np.testing.assert_allclose(out.vs.numpy(), vs, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.pg_advantages.numpy(), adv, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.rhos.numpy(), rhos, rtol=1e-12)


def test_vtrace_on_policy_gives_n_step_returns():
    rng = np.random.default_rng(3)
    T, B = 6, 4
    log_p = torch.tensor(rng.normal(size=(T, B)))
    gamma = torch.full((T, B), 0.9, dtype=torch.float64)
    r = torch.tensor(rng.normal(size=(T, B)))
    v = torch.tensor(rng.normal(size=(T, B)))
    bootstrap = torch.tensor(rng.normal(size=B))
    out = vtrace(log_p, log_p, gamma, r, v, bootstrap)
    for s in range(T):
        expected = sum(0.9 ** (k - s) * r[k] for k in range(s, T)) + 0.9 ** (T - s) * bootstrap
        torch.testing.assert_close(out.vs[s], expected)
        next_vs = out.vs[s + 1] if s + 1 < T else bootstrap
        torch.testing.assert_close(out.pg_advantages[s], r[s] + 0.9 * next_vs - v[s])
    assert torch.all(out.rhos == 1.0)


def test_vtrace_is_constant_for_the_loss_and_checks_shapes():
    pi_log = torch.zeros(3, 2, requires_grad=True)
    values = torch.zeros(3, 2, requires_grad=True)
    out = vtrace(torch.zeros(3, 2), pi_log, torch.ones(3, 2), torch.ones(3, 2), values, torch.zeros(2))
    assert not out.vs.requires_grad and not out.pg_advantages.requires_grad
    with pytest.raises(ValueError, match="rewards"):
        vtrace(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3, 2), torch.ones(2, 2), torch.zeros(3, 2),
               torch.zeros(2))
    with pytest.raises(ValueError, match="bootstrap_value"):
        vtrace(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3, 2), torch.ones(3, 2), torch.zeros(3, 2),
               torch.zeros(3))


def test_actor_critic_terms_are_torchbeast_sums():
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0], [2.0, 0.5]], requires_grad=True)
    pg = policy_gradient_loss(log_probs, advantages)
    assert pg.item() == pytest.approx(-(-1.0 * 1.0 + -2.0 * -1.0 + -0.5 * 2.0 + -3.0 * 0.5))
    pg.backward()
    assert advantages.grad is None  # advantages are constants
    torch.testing.assert_close(log_probs.grad, -advantages.detach())
    assert baseline_loss(torch.tensor([[1.0, -2.0], [3.0, 0.0]])).item() == pytest.approx(0.5 * 14.0)
    assert entropy_loss(torch.tensor([[1.0, 2.0], [0.5, 0.5]])).item() == pytest.approx(-4.0)


@pytest.mark.parametrize("epsilon", [0.1, 0.2, 0.5])
def test_trust_region_mask_is_where_ppos_clipped_surrogate_has_gradient(epsilon):
    """The mask is 1 exactly where PPO's ``min(rho A, clip(rho, 1-eps, 1+eps) A)`` has a gradient."""
    gen = torch.Generator().manual_seed(0)
    behaviour = torch.randn(50, 40, generator=gen)
    target = (behaviour + 0.6 * torch.randn(50, 40, generator=gen)).requires_grad_(True)
    advantages = torch.randn(50, 40, generator=gen)
    rhos = torch.exp(target - behaviour)
    surrogate = torch.minimum(rhos * advantages, rhos.clamp(1 - epsilon, 1 + epsilon) * advantages)
    surrogate.sum().backward()
    has_gradient = (target.grad != 0).float()
    mask = trust_region_mask(rhos.detach(), advantages, epsilon)
    torch.testing.assert_close(mask, has_gradient)
    assert 0.05 < 1 - mask.mean().item() < 0.95  # both kinds of step occur
    assert torch.equal(trust_region_mask(rhos.detach(), advantages, 0.0), torch.ones_like(advantages))
    with pytest.raises(ValueError, match="epsilon"):
        trust_region_mask(rhos.detach(), advantages, 1.0)


class LinearDiscriminator(torch.nn.Module):
    """D(x) = <w, x> (+ <u, target>): its gradient w.r.t. x is w everywhere."""

    def __init__(self, shape, conditional=False):
        super().__init__()
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        self.w = torch.nn.Parameter(w)
        self.u = torch.nn.Parameter(torch.randn(shape))
        self.conditional = conditional

    def forward(self, x, targets=None):
        score = (x * self.w).flatten(1).sum(1)
        if targets is not None:
            score = score + (targets * self.u).flatten(1).sum(1)
        return score


@pytest.mark.parametrize("conditional", [False, True])
def test_gradient_penalty_of_linear_discriminators(conditional):
    shape = (1, 8, 8)
    discriminator = LinearDiscriminator(shape, conditional)
    real, fake = torch.rand(6, *shape), torch.rand(6, *shape)
    targets = torch.rand(6, *shape) if conditional else None
    with torch.no_grad():
        discriminator.w /= discriminator.w.norm()  # 1-Lipschitz, gradient norm exactly 1
    gp = gradient_penalty(discriminator, real, fake, targets, weight=10.0)
    assert gp.item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        discriminator.w *= 3.0  # gradient norm 3 everywhere: penalty weight * (3 - 1)^2
    gp = gradient_penalty(discriminator, real, fake, targets, weight=10.0)
    assert gp.item() == pytest.approx(40.0, rel=1e-5)
    gp.backward()  # the penalty back-propagates into the discriminator's weights
    assert discriminator.w.grad is not None and discriminator.w.grad.norm() > 0


def test_gradient_penalty_uses_interpolates_between_real_and_fake():
    seen = []

    def discriminator(x):
        seen.append(x.detach().clone())
        return (x ** 2).flatten(1).sum(1)

    real, fake = torch.ones(64, 1, 2, 2), torch.zeros(64, 1, 2, 2)
    gradient_penalty(discriminator, real, fake, weight=1.0, generator=torch.Generator().manual_seed(0))
    eps = seen[0][:, 0, 0, 0]
    assert torch.all(seen[0] == eps[:, None, None, None])  # one eps per sample
    assert 0.0 <= eps.min() < 0.2 and 0.8 < eps.max() <= 1.0


def test_wgan_discriminator_loss_and_wasserstein_estimate():
    d_real, d_fake = torch.tensor([2.0, 4.0]), torch.tensor([1.0, -1.0])
    assert wgan_discriminator_loss(d_real, d_fake).item() == pytest.approx(0.0 - 3.0)
    assert wasserstein_estimate(d_real, d_fake).item() == pytest.approx(3.0)


# -- rewards ---------------------------------------------------------------------------------


def digit_like(batch: int, size: int = 16) -> np.ndarray:
    images = np.full((batch, size, size, 1), 255, np.uint8)
    images[:, size // 2 - 1:size // 2 + 1, 2:-2] = 0
    return images


def test_reconstruction_l2_in_unit_pixels():
    blank = np.full((2, 16, 16, 1), 255, np.uint8)
    target = digit_like(2)
    dark_fraction = (target == 0).mean()
    np.testing.assert_allclose(reconstruction_l2(blank, target), [dark_fraction] * 2, rtol=1e-6)
    np.testing.assert_allclose(reconstruction_l2(target, target), [0.0, 0.0])
    assert reconstruction_l2(np.zeros_like(blank), blank)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_l2(blank, target[:1])
    with pytest.raises(ValueError, match="uint8"):
        reconstruction_l2(blank.astype(np.float32), target)


def test_blank_detection_and_stroke_starts():
    canvases = np.full((3, 16, 16, 1), 255, np.uint8)
    canvases[1, 4, 4] = 250  # invisible
    canvases[2, 4, 4] = 100  # a visible dab
    assert is_blank(canvases).tolist() == [True, True, False]
    floor = np.full((3, 16, 16, 1), 90, np.uint8)  # an empty scene that is not white
    assert is_blank(floor, floor).tolist() == [True, True, True]
    flags = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1]])  # [T=4, B=3]
    starts = stroke_starts(flags)
    np.testing.assert_array_equal(starts, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])


def reward_experiment(reward: RewardConfig, conditional: bool = True) -> ExperimentConfig:
    """The tiny painting experiment with the given reward settings."""
    cfg = load_experiment(experiment_path("tiny"), overrides={"env": {"conditional": conditional}})
    return dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, reward=reward))


def hand_unroll(canvases: np.ndarray, flags: np.ndarray, targets: np.ndarray | None) -> Unroll:
    """Episodes given by their canvases ``[T + 1, B, H, W, C]`` and flag actions ``[T, B]``."""
    t, b = flags.shape
    return Unroll(canvases=canvases, actions=flags[..., None].astype(np.int64), masks=np.ones((t, b, 1), np.float32),
                  behaviour_log_probs=np.zeros((t, b), np.float32), noise=np.zeros((b, 1), np.float32),
                  targets=targets, policy_version=0)


def one_step(finals: np.ndarray, targets: np.ndarray | None) -> Unroll:
    """One move per episode, from white paper to ``finals``."""
    return hand_unroll(np.stack([np.full_like(finals, 255), finals]), np.zeros((1, len(finals)), np.int64), targets)


class ConstantScores(torch.nn.Module):
    """A discriminator that answers ``scores`` whatever it is shown."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.scores


def test_the_reward_function_combines_l2_blank_and_the_discriminator():
    targets = digit_like(2)
    finals = targets.copy()
    finals[0] = 255  # blank canvas vs a perfect reconstruction
    cfg = reward_experiment(RewardConfig(discriminator_weight=0.0, l2_weight=2.0, blank_penalty=0.5))
    rewards, parts = RewardFunction(cfg)(one_step(finals, targets), None)
    l2 = reconstruction_l2(finals, targets)
    assert l2[0] > 0.01 and l2[1] == 0.0
    torch.testing.assert_close(rewards[-1], torch.tensor([-2.0 * l2[0] - 0.5, 0.0]))
    assert parts["blank_fraction"] == 0.5 and math.isnan(parts["discriminator_score"])
    assert parts["reconstruction_l2"] == pytest.approx(l2.mean())
    assert parts["reward_l2"] + parts["reward_blank"] + parts["reward_critic"] == pytest.approx(parts["reward"])

    discriminator = Discriminator(1, 16, conditional=True, channels=4, num_layers=2)
    cfg = reward_experiment(RewardConfig(discriminator_weight=3.0, l2_weight=0.0))
    with torch.no_grad():
        scores = discriminator(images_to_tensor(finals), images_to_tensor(targets))
    rewards, parts = RewardFunction(cfg)(one_step(finals, targets), discriminator)
    expected = 3.0 * scores
    torch.testing.assert_close(rewards[-1], expected)
    assert parts["discriminator_score"] == pytest.approx(float(expected.mean() / 3.0), rel=1e-5)
    assert parts["reward_critic"] == pytest.approx(float(expected.mean()), rel=1e-5)
    unconditional = reward_experiment(RewardConfig(discriminator_weight=3.0, l2_weight=0.0), conditional=False)
    with pytest.raises(RuntimeError, match="shape"):  # one score for every canvas it was shown
        RewardFunction(unconditional)(one_step(finals, None), ConstantScores(scores[:1]))

    unconditional = reward_experiment(RewardConfig(l2_weight=1.0), conditional=False)
    rewards, parts = RewardFunction(unconditional)(one_step(finals, None), ConstantScores(torch.zeros(4)))
    assert rewards.shape == (1, 2) and math.isnan(parts["reconstruction_l2"])


class InkFraction(torch.nn.Module):
    """D(image, target) = the image's mean ink (1 - brightness), in [0, 1]."""

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return (1.0 - images).mean(dim=(1, 2, 3))


def two_tiny_episodes() -> Unroll:
    """Two episodes of two steps on 2x2 paper, worked out by hand in the test below.

    Episode 0 paints the target's two dark pixels, one per step (flags paint, paint: one stroke
    start); episode 1 moves, then paints nothing visible (flags move, paint: a stroke start at
    step 1) and ends blank, one dark pixel short of its target.
    """
    white = np.full((2, 2, 1), 255, np.uint8)
    one, two = white.copy(), white.copy()
    one[0, 0] = 0
    two[0, :] = 0
    canvases = np.stack([np.stack([white, white]), np.stack([one, white]), np.stack([two, white])])  # [3, 2, 2, 2, 1]
    targets = np.stack([two, one])
    return hand_unroll(canvases, np.array([[1, 0], [1, 1]]), targets)


def test_the_reward_function_pays_what_the_hand_computes_for_two_tiny_episodes():
    unroll = two_tiny_episodes()
    # Ink per canvas [T + 1, B]: episode 0 goes 0, 1/4, 1/2; episode 1 stays 0.
    # Squared error to the target per canvas: episode 0 goes 1/2, 1/4, 0; episode 1 stays 1/4.
    terminal = reward_experiment(RewardConfig(discriminator_weight=2.0, l2_weight=4.0, blank_penalty=0.5,
                                              stroke_start_penalty=0.1))
    rewards, parts = RewardFunction(terminal)(unroll, InkFraction())
    expected = [[-0.1, 0.0],  # episode 0 starts its stroke; episode 1 moves
                [2.0 * 0.5 - 4.0 * 0.0, 2.0 * 0.0 - 4.0 * 0.25 - 0.5 - 0.1]]  # ink, L2, blank, stroke
    np.testing.assert_allclose(rewards.numpy(), expected, atol=1e-6)
    assert parts == pytest.approx({
        "discriminator_score": 0.25, "discriminator_score_empty": 0.0, "reconstruction_l2": 0.125,
        "reward_critic": 0.5, "reward_l2": -0.5, "reward_blank": -0.25, "reward_stroke": -0.1,
        "reward": -0.75, "blank_fraction": 0.5, "paint_fraction": 0.75, "stroke_starts": 1.0,
        "normalizer_mean": 0.0, "normalizer_std": 1.0})
    assert float(rewards.sum(0).mean()) == pytest.approx(
        parts["reward_critic"] + parts["reward_l2"] + parts["reward_blank"] + parts["reward_stroke"])

    # Temporal credit on running-normalised scores, and the L2 term paid as the error drops.
    per_step = reward_experiment(RewardConfig(discriminator_weight=2.0, temporal_credit=True, normalize="running",
                                              l2_weight=4.0, l2_shaping=True))
    rewards, parts = RewardFunction(per_step)(unroll, InkFraction())
    ink = np.array([[0.0, 0.0], [0.25, 0.0], [0.5, 0.0]])
    mean, std = ink.mean(), ink.std()  # the normaliser's first batch: every scored canvas
    adversarial = 2.0 * np.diff(ink, axis=0) / std
    shaping = 4.0 * np.array([[0.25, 0.0], [0.25, 0.0]])  # 4 * (error before - error after)
    np.testing.assert_allclose(rewards.numpy(), adversarial + shaping, rtol=1e-5, atol=1e-6)
    assert parts["normalizer_mean"] == pytest.approx(mean) and parts["normalizer_std"] == pytest.approx(std)
    assert parts["reward_critic"] == pytest.approx(adversarial.sum(0).mean(), rel=1e-5)
    assert parts["reward_l2"] == pytest.approx(4.0 * (0.5 - 0.0) / 2)
