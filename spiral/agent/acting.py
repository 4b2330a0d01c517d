"""The actor's loop, free of networking: run N environments for one episode with a policy copy.

An actor owns a batched environment (libmypaint, the fast rasterizer or MuJoCo) and a CPU copy
of the policy that lags the learner's. One call of :meth:`EpisodeRunner.run_episode` resets
the N canvases (with targets from the dataset in conditional mode), samples an action for all N
canvases with one policy forward per step, executes it, and returns the finished episodes as
an :class:`~spiral.agent.trajectory.Unroll` stamped with the policy version that acted.

The same runner serves the distributed actor (``actor/main.py``, which adds parameter
refreshes and gRPC streaming) and the in-process loop used for debugging and as the
no-gRPC baseline of the throughput benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from spiral.agent.prior import prior_programs
from spiral.config import ExperimentConfig
from spiral.envs.base import BatchedEnv
from spiral.nets import observation_to_tensors
from spiral.nets.params import load_snapshot
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.nets.policy import SpiralPolicy
from spiral.nets.precision import autocast, resolve_precision
from spiral.agent.trajectory import Unroll


@dataclass
class EpisodeTiming:
    """Where an episode's wall time went."""

    inference_seconds: float = 0.0
    render_seconds: float = 0.0


class EpisodeRunner:
    """Runs batched episodes with a local policy copy.

    Args:
        cfg: The experiment.
        env: N environments of the experiment's kind.
        policy: The acting policy (CPU); its parameters are replaced by :meth:`load_parameters`.
        targets: Images to reconstruct in conditional mode (uint8 ``[M, H, W, C]``), else None
            (a conditional runner without them must be given targets per episode).
        seed: Seed for target choice and action sampling.
        actor_id: Identity stamped on every unroll.
        greedy: Act with each head's most likely value instead of sampling (evaluation only:
            training needs the exploration that sampling gives).
    """

    def __init__(self, cfg: ExperimentConfig, env: BatchedEnv, policy: SpiralPolicy,
                 targets: np.ndarray | None, seed: int = 0, actor_id: str = "",
                 greedy: bool = False) -> None:
        if cfg.env.conditional and targets is not None and len(targets) == 0:
            raise ValueError("conditional experiments need target images")
        self.cfg = cfg
        self.env = env
        self.policy = policy.eval()
        self.targets = targets if cfg.env.conditional else None
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.actor_id = actor_id
        self.greedy = greedy
        self.policy_version = 0
        self.timing = EpisodeTiming()
        self.precision = resolve_precision(cfg.actor.precision, "cpu", "actor.precision")
        """The acting forward's arithmetic (``actor.precision`` where native, else fp32)."""

    def load_parameters(self, snapshot: ParameterSnapshot) -> None:
        """Act with ``snapshot`` from the next episode on."""
        load_snapshot(self.policy, snapshot)
        self.policy_version = snapshot.version

    @torch.no_grad()
    def run_episode(self, targets: np.ndarray | None = None) -> Unroll:
        """One episode on every canvas; returns it as an unroll of T = episode_length - 1 steps.

        Args:
            targets: This episode's targets, one per canvas (conditional runs); by default they
                are drawn uniformly from the runner's target images.
        """
        env = self.env
        n = env.num_envs
        batch_targets = targets
        if batch_targets is not None:
            if not self.cfg.env.conditional:
                raise ValueError("targets given to an unconditional experiment")
            if len(batch_targets) != n:
                raise ValueError(f"targets: {len(batch_targets)} images for {n} canvases")
        elif self.targets is not None:
            batch_targets = self.targets[self.rng.integers(0, len(self.targets), size=n)]
        obs = env.reset(batch_targets)
        state = self.policy.initial_state(n)
        canvases = [obs.canvas]
        actions, masks, log_probs = [], [], []
        while not env.done:
            t0 = time.perf_counter()
            with autocast(self.precision, "cpu"):  # sampling and log-probabilities stay fp32
                out, state = self.policy(observation_to_tensors(obs), state, generator=self.generator,
                                         greedy=self.greedy)
            step_actions = out.actions.numpy()
            t1 = time.perf_counter()
            obs = env.step(step_actions)
            t2 = time.perf_counter()
            self.timing.inference_seconds += t1 - t0
            self.timing.render_seconds += t2 - t1
            canvases.append(obs.canvas)
            actions.append(step_actions)
            masks.append(out.mask.numpy().astype(np.float32))
            log_probs.append(out.log_prob.numpy().astype(np.float32))
        return Unroll(
            canvases=np.stack(canvases),
            actions=np.stack(actions).astype(np.int64),
            masks=np.stack(masks),
            behaviour_log_probs=np.stack(log_probs),
            noise=obs.noise,
            targets=batch_targets,
            policy_version=self.policy_version,
            actor_id=self.actor_id,
        )

    def run_prior_episode(self) -> Unroll:
        """One episode on every canvas executing programs drawn from the broad prior instead of acting.

        The episodes are examples for program recovery (``learner.hindsight_weight``): their
        targets are their own final canvases, their behaviour log-probabilities 0, and the
        unroll is marked :attr:`~spiral.agent.trajectory.Unroll.prior`. The policy is not run.
        """
        if not self.cfg.env.conditional:
            raise ValueError("prior programs are examples for program recovery, which needs a conditional run")
        env = self.env
        n = env.num_envs
        programs = prior_programs(self.cfg, env.spec, n, self.rng)  # [N, T, K]
        obs = env.reset(np.full((n, *env.image_shape), 255, np.uint8))  # the target is set once painted
        canvases = [obs.canvas]
        t0 = time.perf_counter()
        for step in np.swapaxes(programs, 0, 1):
            obs = env.step(step)
            canvases.append(obs.canvas)
        self.timing.render_seconds += time.perf_counter() - t0
        actions = np.swapaxes(programs, 0, 1)
        return Unroll(
            canvases=np.stack(canvases),
            actions=actions,
            masks=env.spec.masks_for(actions[..., 0]),
            behaviour_log_probs=np.zeros(actions.shape[:2], np.float32),
            noise=obs.noise,
            targets=obs.canvas.copy(),
            policy_version=self.policy_version,
            actor_id=self.actor_id,
            prior=True,
        )
