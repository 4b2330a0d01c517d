"""One policy-learner update: rewards, V-trace and an Adam step, free of queues and networking.

:class:`PolicyTrainer` turns a batch of finished episodes (:class:`~spiral.agent.trajectory.Unroll`)
into one optimiser step of SPIRAL's off-policy actor-critic (A2C with V-trace, as IMPALA):

1. **Rewards** (:class:`spiral.agent.rewards.RewardFunction`, :attr:`PolicyTrainer.rewards`).
   The final render of each episode is scored (the discriminator's score, optional negative L2
   to the target, blank-canvas penalty); that reward sits at the last step ``T - 1`` and every
   other step gets 0, minus ``stroke_start_penalty`` where a paint step starts a new stroke.
   With ``temporal_credit`` the discriminator's score is paid per step instead, as its change.
2. **Re-evaluation.** The learner's policy scores the actors' actions from a fresh LSTM state
   (:meth:`SpiralPolicy.unroll`): log-probabilities, entropies and values, all ``[T, B]``.
3. **V-trace.** With the behaviour log-probabilities the actors recorded, discount ``gamma``
   at every step but 0 after the last, and bootstrap value 0 (episodes are complete).
4. **Loss and step.** ``pg + baseline_cost * baseline + entropy_cost * entropy`` (sums, see
   :mod:`spiral.losses.actor_critic`; with ``ppo_clip`` the pg term keeps only the steps inside
   the trust region), global gradient-norm clipping, Adam.
5. **Average** (``policy_average_decay`` > 0). An exponential moving average of the weights,
   kept beside them for evaluation only (:attr:`PolicyTrainer.average`).

With ``learner.precision: bf16`` step 1's discriminator and step 2 run under bf16 autocast
(:mod:`spiral.nets.precision`); V-trace, the losses and Adam's fp32 master weights do not.

The learning rate and entropy cost are the hyperparameters population-based training tunes
(:meth:`set_hyperparameters`); they live in the checkpointed state with the weights and the
optimiser moments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from spiral.config import ExperimentConfig
from spiral.losses import (baseline_loss, entropy_loss, policy_gradient_loss, recovery_loss, trust_region_mask,
                           vtrace)
from spiral.nets import observation_to_tensors
from spiral.nets.discriminator import Discriminator
from spiral.nets.policy import SpiralPolicy, UnrollOutput
from spiral.nets.compilation import maybe_compile
from spiral.nets.precision import autocast, resolve_precision
from spiral.agent.rewards import RewardFunction, RewardParts
from spiral.agent.training_state import check_training_state, export_training_state, import_training_state
from spiral.agent.trajectory import Unroll, join_observations
from spiral.runtime.device import host_to_device, read_floats, training_device


@dataclass
class PolicyUpdateStats:
    """What one update measured (batch means unless said otherwise).

    Attributes:
        loss: Total loss (a sum over the batch, see :mod:`spiral.losses.actor_critic`).
        pg_loss, baseline_loss, entropy_loss: Its unweighted terms.
        mean_reward: Mean per-episode return (final reward plus shaping penalties).
        reconstruction_l2: Mean squared error of final renders to targets (NaN if unconditional).
        discriminator_score: Mean discriminator output on the final renders (NaN without a discriminator).
        mean_rho: Mean importance weight pi/mu (1 when on-policy; drifts with policy lag).
        clip_fraction: Share of steps whose policy-gradient term ``learner.ppo_clip`` dropped
            (0 without it): how far the learner's policy has moved from the acting one.
        grad_norm: Global gradient norm before clipping.
        discriminator_version: Version of the discriminator that produced the rewards.
        learning_rate, entropy_cost: The hyperparameters in force.
        mean_entropy: Mean per-step policy entropy (summed over kept heads).
        blank_fraction: Fraction of final renders that show nothing.
        paint_fraction: Fraction of steps that paint (flag 1; NaN outside the painting
            environment). An agent that learns to paint less on its way to a blank canvas shows
            here first.
        reward_critic, reward_l2, reward_blank, reward_stroke: Each reward term's mean
            per-episode return; together they make ``mean_reward``. ``reward_critic`` is the
            discriminator's (adversarial) term; the logs and dashboards keep that name.
        discriminator_score_empty: Mean discriminator output on the empty canvases.
        normalizer_mean, normalizer_std: The statistics the discriminator's scores were
            normalised with (``normalize: running``; 0 and 1 otherwise).
        recovery_loss: Program recovery's term before its weight (``learner.hindsight_weight``):
            minus the summed log-probability of the relabelled episodes' own actions (0 when off).
        recovery_episodes: The episodes it was summed over: the batch, relabelled, plus the
            prior programs' (0 when off).
    """

    loss: float
    pg_loss: float
    baseline_loss: float
    entropy_loss: float
    mean_reward: float
    reconstruction_l2: float
    discriminator_score: float
    mean_rho: float
    grad_norm: float
    discriminator_version: float
    learning_rate: float
    entropy_cost: float
    mean_entropy: float = math.nan
    clip_fraction: float = 0.0
    blank_fraction: float = math.nan
    paint_fraction: float = math.nan
    reward_critic: float = math.nan
    reward_l2: float = math.nan
    reward_blank: float = math.nan
    reward_stroke: float = math.nan
    discriminator_score_empty: float = math.nan
    normalizer_mean: float = math.nan
    normalizer_std: float = math.nan
    recovery_loss: float = 0.0
    recovery_episodes: float = 0.0


_REWARD_PARTS = ("reconstruction_l2", "discriminator_score", "blank_fraction", "paint_fraction", "reward_critic",
                 "reward_l2", "reward_blank", "reward_stroke", "discriminator_score_empty", "normalizer_mean",
                 "normalizer_std")
"""Fields of :class:`PolicyUpdateStats` copied from the reward's parts (:class:`RewardFunction`; NaN where absent)."""


class PolicyTrainer:
    """Owns the policy's optimiser and hyperparameters and performs updates.

    Args:
        cfg: The experiment (``cfg.learner`` holds Adam's settings, the costs and V-trace's
            thresholds; ``cfg.learner.reward`` the reward weights).
        policy: The policy to train (moved to ``device``).
        device: Torch device of the update (checked to exist, :func:`~spiral.runtime.device.training_device`).
    """

    def __init__(self, cfg: ExperimentConfig, policy: SpiralPolicy, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = training_device(device, "policy trainer device")
        self.policy = policy.to(self.device)
        lc = cfg.learner
        self._learning_rate = float(lc.learning_rate)
        self._entropy_cost = float(lc.entropy_cost)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self._learning_rate,
                                          betas=(lc.adam_beta1, lc.adam_beta2), eps=lc.adam_eps)
        self.average = (AveragedModel(self.policy, multi_avg_fn=get_ema_multi_avg_fn(lc.policy_average_decay),
                                      use_buffers=True)
                        if lc.policy_average_decay > 0 else None)
        """The exponential moving average of the policy's weights (``learner.policy_average_decay``;
        ``average.module`` is a :class:`SpiralPolicy`), else None. Updated after every step."""
        self.precision = resolve_precision(lc.precision, self.device, "learner.precision")
        """The arithmetic of the unroll's forward and backward and of the discriminator's scoring
        (``learner.precision`` where this device runs it natively, else fp32)."""
        self.rewards = RewardFunction(cfg, self.device, self.precision)
        """Turns an unroll's canvases into its per-step rewards (owns the running normaliser)."""
        self._unroll = (maybe_compile(self.policy.unroll_unchecked, self.device, "learner.compile") if lc.compile
                        else self.policy.unroll_unchecked)
        """The policy's unroll (validated by :meth:`learn` first), compiled with ``learner.compile``."""

    # -- hyperparameters -----------------------------------------------------------------------

    @property
    def hyperparameters(self) -> dict[str, float]:
        """``{"learning_rate": ..., "entropy_cost": ...}`` currently in force."""
        return {"learning_rate": self._learning_rate, "entropy_cost": self._entropy_cost}

    def check_hyperparameters(self, hyperparameters: Mapping[str, float]) -> list[str]:
        """Every reason :meth:`set_hyperparameters` would refuse ``hyperparameters`` (empty: none)."""
        problems = [f"{name}: not a hyperparameter of the policy learner (it has {sorted(self.hyperparameters)})"
                    for name in hyperparameters if name not in self.hyperparameters]
        learning_rate = hyperparameters.get("learning_rate")
        if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate > 0):
            problems.append(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
        entropy_cost = hyperparameters.get("entropy_cost")
        if entropy_cost is not None and not (math.isfinite(entropy_cost) and entropy_cost >= 0):
            problems.append(f"entropy_cost must be a finite number >= 0, got {entropy_cost!r}")
        return problems

    def set_hyperparameters(self, learning_rate: float | None = None, entropy_cost: float | None = None) -> None:
        """Change the learning rate (in every optimiser parameter group) and/or the entropy cost.

        Raises:
            ValueError: A value :meth:`check_hyperparameters` refuses; nothing was changed.
        """
        given = {name: value for name, value in (("learning_rate", learning_rate), ("entropy_cost", entropy_cost))
                 if value is not None}
        problems = self.check_hyperparameters(given)
        if problems:
            raise ValueError("; ".join(problems))
        if learning_rate is not None:
            self._learning_rate = float(learning_rate)
            for group in self.optimizer.param_groups:
                group["lr"] = self._learning_rate
        if entropy_cost is not None:
            self._entropy_cost = float(entropy_cost)

    # -- the update ----------------------------------------------------------------------------

    def update(self, unroll: Unroll, discriminator: Discriminator | None,
               discriminator_version: int = 0, prior: Unroll | None = None) -> PolicyUpdateStats:
        """Score the unroll's episodes with ``discriminator`` (None: no adversarial term) and take
        one optimiser step on them (with program recovery on them and on ``prior``'s episodes
        when ``learner.hindsight_weight`` is set)."""
        unroll.validate()
        rewards, parts = self.rewards.score(unroll, discriminator)  # parts read back with the update's figures
        return self.learn(unroll, rewards, parts, discriminator_version, prior=prior)

    def learn(self, unroll: Unroll, rewards: torch.Tensor, parts: RewardParts | Mapping[str, float] | None = None,
              discriminator_version: int = 0, prior: Unroll | None = None) -> PolicyUpdateStats:
        """One optimiser step on ``unroll`` with the given per-step ``rewards`` ``[T, B]``.

        With ``learner.hindsight_weight`` the step also maximises the likelihood of each
        episode's own actions given its own final canvas as the target, for ``unroll``'s
        episodes and for ``prior``'s (episodes of prior programs, :attr:`Unroll.prior`): the
        relabelled episodes go through the same (possibly compiled) unroll call as the batch.

        On CUDA the episodes are copied from pinned memory without waiting, and the host does
        not wait for the device until the update is queued: its figures (and the reward's
        ``parts``, floats or tensors) are read back together at the end, in one transfer.
        """
        lc = self.cfg.learner
        t, b = unroll.num_steps, unroll.batch_size
        if tuple(rewards.shape) != (t, b):
            raise ValueError(f"rewards must be [T, B] = [{t}, {b}], got {list(rewards.shape)}")
        if unroll.prior:
            raise ValueError("episodes of prior programs are not trained on with the reward")
        parts = parts or {}
        device = self.device
        self.policy.train()
        recovered = self._recovery_episodes(unroll, prior)
        observations = unroll.observations()
        all_actions = unroll.actions
        if recovered:
            observations = join_observations([observations, *(r.observations() for r in recovered)])
            all_actions = np.concatenate([unroll.actions, *(r.actions for r in recovered)], axis=1)
        inputs = observation_to_tensors(observations, device)
        host_actions = torch.from_numpy(np.ascontiguousarray(all_actions)).long()
        # Eagerly (the possibly compiled unroll does not branch on data), and on the host copy:
        # checking the actions' range on the device would wait for it.
        self.policy.check_unroll(inputs, host_actions)
        actions = host_to_device(host_actions, device)
        behaviour = host_to_device(torch.from_numpy(np.ascontiguousarray(unroll.behaviour_log_probs)).float(), device)
        rewards = rewards.to(device=device, dtype=torch.float32)

        with autocast(self.precision, device):  # log-probs, entropies and values come out fp32
            everything = self._unroll(inputs, actions, self.policy.initial_state(actions.shape[1], device))
        out = UnrollOutput(log_prob=everything.log_prob[:, :b], entropy=everything.entropy[:, :b],
                           value=everything.value[:, :b])
        recovery = recovery_loss(everything.log_prob[:, b:]) if recovered else torch.zeros((), device=device)
        discounts = torch.full((t, b), float(lc.discount), device=device)
        discounts[-1] = 0.0
        returns = vtrace(behaviour, out.log_prob.detach(), discounts, rewards, out.value.detach(),
                         torch.zeros(b, device=device), clip_rho_threshold=lc.clip_rho_threshold,
                         clip_pg_rho_threshold=lc.clip_pg_rho_threshold, clip_c_threshold=lc.clip_c_threshold)
        kept = trust_region_mask(returns.rhos, returns.pg_advantages, lc.ppo_clip)
        pg = policy_gradient_loss(out.log_prob, returns.pg_advantages * kept)
        base = baseline_loss(returns.vs - out.value)
        ent = entropy_loss(out.entropy)
        loss = pg + lc.baseline_cost * base + self._entropy_cost * ent + lc.hindsight_weight * recovery

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = lc.max_grad_norm if lc.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        if self.average is not None:
            self.average.update_parameters(self.policy)

        figures = read_floats({  # the update's one wait for the device
            "loss": loss, "pg_loss": pg, "baseline_loss": base, "entropy_loss": ent,
            "mean_reward": rewards.sum(0).mean(), "mean_rho": returns.rhos.mean(), "clip_fraction": 1.0 - kept.mean(),
            "grad_norm": grad_norm, "mean_entropy": out.entropy.detach().mean(), "recovery_loss": recovery,
            **{name: parts.get(name, math.nan) for name in _REWARD_PARTS}})
        return PolicyUpdateStats(
            **figures, discriminator_version=float(discriminator_version), learning_rate=self._learning_rate,
            entropy_cost=self._entropy_cost, recovery_episodes=float(everything.log_prob.shape[1] - b))

    def _recovery_episodes(self, unroll: Unroll, prior: Unroll | None) -> list[Unroll]:
        """Program recovery's examples: ``unroll`` relabelled with its own final canvases as
        targets, and ``prior``'s episodes (already so); none with ``hindsight_weight`` 0."""
        if self.cfg.learner.hindsight_weight <= 0:
            return []
        relabelled = dataclasses.replace(unroll, targets=unroll.final_canvases.copy())
        if prior is None or prior.batch_size == 0:
            return [relabelled]
        if not prior.prior or prior.num_steps != unroll.num_steps:
            raise ValueError(f"prior must hold episodes of prior programs of {unroll.num_steps} steps, got "
                             f"{prior.num_steps} steps (prior={prior.prior})")
        return [relabelled, prior]

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Policy weights, optimiser state and hyperparameters (a checkpoint or a PBT copy)."""
        state = {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "hyperparameters": self.hyperparameters}
        state.update(self.rewards.state_dict())  # the reward normaliser's statistics, if any
        if self.average is not None:
            state["policy_average"] = self.average.module.state_dict()
            state["policy_average_updates"] = int(self.average.n_averaged)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors are copied onto this trainer's device)."""
        missing = {"policy", "optimizer", "hyperparameters"} - set(state)
        if missing:
            raise ValueError(f"trainer state lacks {sorted(missing)}")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.set_hyperparameters(**state["hyperparameters"])
        self.rewards.load_state_dict(state)
        if self.average is not None:
            if "policy_average" in state:
                self.average.module.load_state_dict(state["policy_average"])
                self.average.n_averaged.fill_(int(state.get("policy_average_updates", 1)))
            else:  # a checkpoint from before the average was turned on: start it at these weights
                self.restart_average()

    def restart_average(self) -> None:
        """Start the weights' moving average afresh at the current weights (no-op without one)."""
        if self.average is not None:
            self.average.n_averaged.zero_()
            self.average.update_parameters(self.policy)

    # -- population-based training copies ------------------------------------------------------

    def export_state(self) -> dict[str, np.ndarray]:
        """Weights and Adam state as flat CPU numpy arrays (what a PBT exploit copies).

        Names: ``"policy/<state_dict name>"`` and ``"optimizer/<param_index>/<key>"`` (``step``,
        ``exp_avg``, ``exp_avg_sq``); see :mod:`spiral.agent.training_state`. Hyperparameters
        are not included: PBT sets them separately.
        """
        return export_training_state("policy", self.policy, self.optimizer)

    def check_state(self, tensors: Mapping[str, np.ndarray]) -> list[str]:
        """Every way ``tensors`` does not fit this trainer (empty when :meth:`import_state` would succeed)."""
        return check_training_state(tensors, "policy", self.policy, self.optimizer)

    def import_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Become a copy of the trainer whose :meth:`export_state` gave ``tensors``.

        Validates every name, shape and dtype first and changes nothing unless all fit; the
        learning rate, entropy cost and Adam's other settings stay as they are.

        Raises:
            ValueError: (:class:`~spiral.agent.training_state.TrainingStateError`) naming each bad entry.
        """
        import_training_state(tensors, "policy", self.policy, self.optimizer)
        self.restart_average()  # the copied member's weights, not an average across two members
