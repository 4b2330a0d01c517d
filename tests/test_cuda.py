"""The CUDA path against the CPU: the same computation on both devices gives the same numbers.

Every test here runs one computation twice, on the CPU and on ``cuda``, from the same weights
and the same inputs, and compares what comes out: the policy learner's update (rewards with
the discriminator's scores, log-probabilities, entropies, values, V-trace targets, the losses
and the gradients), the discriminator's update, the acting forward and the fast renderer's
torch path. They are marked ``cuda`` (``pytest -m cuda``, what ``bench/gpu_check.sh call1``
runs) and skip where torch sees no GPU, so the suite passes on CPU machines.

**Tolerances.** Both devices compute in fp32 here, with TF32 turned off for the comparison
(:func:`exact_fp32`; cuDNN would otherwise use it for convolutions), so they differ only in the
order of their sums: about 1e-6 relative per operation. Through the torso, an LSTM over the
episode and the heads that grows to the 1e-5s, so log-probabilities, entropies, values and
V-trace targets are compared to 1e-4 (absolute and relative); the losses, sums over T*B steps,
to 1e-3 relative; gradients to 1e-3 relative plus 1e-4 of each tensor's largest entry. The
renderer's canvases may differ by one level of 255 where a value sits on a rounding boundary.
bf16 is compared more loosely (:func:`test_a_bf16_update_on_cuda_stays_near_the_fp32_cpu_update`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from discriminator.training import DiscriminatorTrainer
from learner.training import PolicyTrainer
from spiral.agent.acting import EpisodeRunner
from spiral.agent.trajectory import Unroll
from spiral.config import ExperimentConfig, PaintConfig, experiment_path, load_experiment
from spiral.envs import make_env
from spiral.envs.fast_paint import FastPaintEnv
from spiral.losses import vtrace
from spiral.nets import build_discriminator, build_policy, observation_to_tensors

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
CLOSE = {"rtol": 1e-4, "atol": 1e-4}
"""Per-step outputs of the policy and of V-trace (see the module docstring)."""


@pytest.fixture(autouse=True)
def exact_fp32() -> Iterator[None]:
    """TF32 off while a test compares fp32 arithmetic across devices (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def experiment(name: str, **sections: dict[str, Any]) -> ExperimentConfig:
    """``name`` on the fast renderer (a GPU machine has no libmypaint), eager, fp32, plus ``sections``."""
    overrides: dict[str, Any] = {"env": {"paint": {"backend": "fast"}}, "learner": {"compile": False,
                                                                                    "precision": "fp32"}}
    for section, values in sections.items():
        overrides[section] = {**overrides.get(section, {}), **values}
    return load_experiment(experiment_path(name), overrides=overrides)


def bar_targets(batch: int, size: int = 64) -> np.ndarray:
    """Dark horizontal bars on white paper, at different heights."""
    images = np.full((batch, size, size, 1), 255, np.uint8)
    for i in range(batch):
        row = 12 + (i * 7) % 40
        images[i, row:row + 4, 8:56] = 0
    return images


def episodes(cfg: ExperimentConfig, policy: torch.nn.Module, batch: int, seed: int = 0) -> Unroll:
    """One batch of episodes acted on the CPU by ``policy`` (a copy), the actor's own loop."""
    env = make_env(cfg, batch, seed)
    try:
        runner = EpisodeRunner(cfg, env, copy.deepcopy(policy), None, seed=seed, actor_id="cuda-test")
        return runner.run_episode(bar_targets(batch) if cfg.env.conditional else None)
    finally:
        env.close()


def on_both(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of ``module`` with the same weights, on the CPU and on ``cuda``."""
    return copy.deepcopy(module).to(CPU), copy.deepcopy(module).to(CUDA)


def assert_same(cuda_value: torch.Tensor, cpu_value: torch.Tensor, what: str, **tolerance: float) -> None:
    torch.testing.assert_close(cuda_value.detach().cpu(), cpu_value.detach(), **(tolerance or CLOSE),
                               msg=lambda message: f"{what}: {message}")


def assert_same_gradients(cuda_module: torch.nn.Module, cpu_module: torch.nn.Module) -> None:
    for (name, cpu_p), cuda_p in zip(cpu_module.named_parameters(), cuda_module.parameters()):
        assert (cpu_p.grad is None) == (cuda_p.grad is None), name
        if cpu_p.grad is not None:
            scale = float(cpu_p.grad.abs().max())
            assert_same(cuda_p.grad, cpu_p.grad, f"gradient of {name}", rtol=1e-3, atol=1e-4 * scale + 1e-7)


def assert_same_figures(cuda_stats: object, cpu_stats: object, rel: float = 1e-3, abs_: float = 1e-4) -> None:
    cuda_figures, cpu_figures = dataclasses.asdict(cuda_stats), dataclasses.asdict(cpu_stats)
    for name, expected in cpu_figures.items():
        got = cuda_figures[name]
        assert (math.isnan(got) and math.isnan(expected)) or math.isclose(got, expected, rel_tol=rel, abs_tol=abs_), \
            f"{name}: cuda {got!r}, cpu {expected!r}"


def per_step_outputs(trainer: PolicyTrainer, discriminator: torch.nn.Module, unroll: Unroll) -> dict[str, torch.Tensor]:
    """What the trainer's update computes before its loss, on the trainer's device: the rewards
    (the discriminator's scores), the policy's re-evaluation and V-trace."""
    device, lc = trainer.device, trainer.cfg.learner
    rewards, _ = trainer.rewards(unroll, discriminator)
    inputs = observation_to_tensors(unroll.observations(), device)
    actions = torch.from_numpy(unroll.actions).to(device)
    with torch.no_grad():
        out = trainer.policy.unroll(inputs, actions, trainer.policy.initial_state(unroll.batch_size, device))
    discounts = torch.full(rewards.shape, float(lc.discount), device=device)
    discounts[-1] = 0.0
    behaviour = torch.from_numpy(unroll.behaviour_log_probs).to(device)
    returns = vtrace(behaviour, out.log_prob, discounts, rewards, out.value, torch.zeros(unroll.batch_size, device=device),
                     clip_rho_threshold=lc.clip_rho_threshold, clip_pg_rho_threshold=lc.clip_pg_rho_threshold,
                     clip_c_threshold=lc.clip_c_threshold)
    return {"rewards": rewards, "log_prob": out.log_prob, "entropy": out.entropy, "value": out.value,
            "vs": returns.vs, "pg_advantages": returns.pg_advantages}


# -- the policy learner's update ------------------------------------------------------------------

@pytest.mark.parametrize("name, sections", [
    ("tiny", {}),  # the discriminator's score paid per step (temporal credit), pairs judged at 16x16
    ("tiny-complement", {"learner": {"hindsight_weight": 0.5}}),  # complement halves, program recovery
])
def test_the_learners_update_on_cuda_matches_the_cpu(name: str, sections: dict[str, Any]) -> None:
    cfg = experiment(name, **sections)
    torch.manual_seed(0)
    policy, discriminator = build_policy(cfg), build_discriminator(cfg).eval()
    unroll = episodes(cfg, policy, batch=8)  # acted by the learner's own weights: on-policy, rho ~ 1
    cpu_policy, cuda_policy = on_both(policy)
    cpu, gpu = PolicyTrainer(cfg, cpu_policy, CPU), PolicyTrainer(cfg, cuda_policy, CUDA)
    cpu_disc, cuda_disc = on_both(discriminator)

    cpu_outputs, cuda_outputs = per_step_outputs(cpu, cpu_disc, unroll), per_step_outputs(gpu, cuda_disc, unroll)
    for what, cpu_value in cpu_outputs.items():
        assert cuda_outputs[what].device.type == "cuda", f"{what} was computed off the GPU"
        assert_same(cuda_outputs[what], cpu_value, what)

    cpu_stats, cuda_stats = cpu.update(unroll, cpu_disc, 1), gpu.update(unroll, cuda_disc, 1)
    assert cuda_stats.loss != 0.0 and math.isfinite(cuda_stats.loss)
    assert_same_figures(cuda_stats, cpu_stats)
    assert_same_gradients(gpu.policy, cpu.policy)
    assert all(p.device.type == "cuda" for p in gpu.policy.parameters())


def test_a_bf16_update_on_cuda_stays_near_the_fp32_cpu_update() -> None:
    """bf16 keeps 8 bits of mantissa: the torso's features move by about 1%, so the per-step
    log-probabilities (fp32 heads) are compared to 0.1 and the losses to 5%."""
    cfg = experiment("tiny")
    bf16 = experiment("tiny", learner={"precision": "bf16"})
    torch.manual_seed(0)
    policy, discriminator = build_policy(cfg), build_discriminator(cfg).eval()
    unroll = episodes(cfg, policy, batch=8)
    cpu_policy, cuda_policy = on_both(policy)
    cpu, gpu = PolicyTrainer(cfg, cpu_policy, CPU), PolicyTrainer(bf16, cuda_policy, CUDA)
    assert gpu.precision == "bf16", "an Ampere or newer GPU runs bf16 natively"
    cpu_disc, cuda_disc = on_both(discriminator)
    cpu_outputs, cuda_outputs = per_step_outputs(cpu, cpu_disc, unroll), per_step_outputs(gpu, cuda_disc, unroll)
    assert_same(cuda_outputs["log_prob"], cpu_outputs["log_prob"], "bf16 log_prob", rtol=0.02, atol=0.1)
    cpu_stats, cuda_stats = cpu.update(unroll, cpu_disc, 1), gpu.update(unroll, cuda_disc, 1)
    for name in ("loss", "pg_loss", "baseline_loss", "entropy_loss", "mean_entropy"):
        got, expected = getattr(cuda_stats, name), getattr(cpu_stats, name)
        assert math.isclose(got, expected, rel_tol=0.05, abs_tol=0.05), f"{name}: bf16 cuda {got}, fp32 cpu {expected}"


# -- the discriminator's update -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-complement"])
def test_the_discriminators_update_on_cuda_matches_the_cpu(name: str) -> None:
    cfg = experiment(name)
    torch.manual_seed(0)
    discriminator = build_discriminator(cfg)
    cpu_disc, cuda_disc = on_both(discriminator)
    # The same seed draws the same gradient-penalty points and complement halves on both.
    cpu = DiscriminatorTrainer(cfg, cpu_disc, CPU, seed=3)
    gpu = DiscriminatorTrainer(cfg, cuda_disc, CUDA, seed=3)
    b = cfg.discriminator_learner.batch_size
    real = bar_targets(b)
    fake = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    for _ in range(2):  # the second step starts from weights the first one moved on each device
        cpu_stats = cpu.update(real, fake, real if cfg.env.conditional else None)
        cuda_stats = gpu.update(real, fake, real if cfg.env.conditional else None)
        assert_same_figures(cuda_stats, cpu_stats)
        assert_same_gradients(gpu.discriminator, cpu.discriminator)


# -- acting ---------------------------------------------------------------------------------------

def test_the_acting_forward_on_cuda_scores_the_cpus_actions_alike() -> None:
    """An episode acted on the CPU (sampling from its generator), scored step by step on both
    devices from their own carried LSTM states: log-probabilities, entropies, values, masks."""
    cfg = experiment("tiny")
    torch.manual_seed(0)
    cpu_policy, cuda_policy = (p.eval() for p in on_both(build_policy(cfg)))
    env = make_env(cfg, 4, seed=0)
    generator = torch.Generator().manual_seed(0)
    obs = env.reset(bar_targets(4))
    cpu_state, cuda_state = cpu_policy.initial_state(4), cuda_policy.initial_state(4, CUDA)
    with torch.no_grad():
        while not env.done:
            cpu_out, cpu_state = cpu_policy(observation_to_tensors(obs), cpu_state, generator=generator)
            cuda_out, cuda_state = cuda_policy(observation_to_tensors(obs, CUDA), cuda_state,
                                               actions=cpu_out.actions.to(CUDA))
            for what in ("log_prob", "entropy", "value", "mask"):
                assert_same(getattr(cuda_out, what), getattr(cpu_out, what), f"step {obs.step[0]} {what}")
            assert_same(cuda_state[0], cpu_state[0], "LSTM state")
            obs = env.step(cpu_out.actions.numpy())
    env.close()


# -- the fast renderer ----------------------------------------------------------------------------

@pytest.mark.parametrize("use_color, brush_sizes", [(False, [1.0, 2.0, 3.0]), (True, [1.0, 2.0, 4.0, 8.0, 12.0, 24.0])])
def test_the_fast_renderers_torch_path_on_cuda_draws_the_cpus_canvases_within_one_level(
        use_color: bool, brush_sizes: list[float]) -> None:
    cfg = PaintConfig(backend="fast", canvas_size=64, grid_size=32, brush_sizes=tuple(brush_sizes), use_color=use_color)
    envs = [FastPaintEnv(cfg, num_envs=16, episode_length=21, noise_dim=1, seed=0, device=device, compiled=False)
            for device in (CPU, CUDA)]
    rng = np.random.default_rng(7)
    actions = np.stack([rng.integers(0, n, (20, 16)) for n in envs[0].spec.sizes], -1)
    reads: list[list[np.ndarray]] = [[], []]
    for env, out in zip(envs, reads):
        env.reset()
        for step in actions:
            out.append(env.step(step).canvas)
    cpu_reads, cuda_reads = (np.stack(r).astype(np.int16) for r in reads)
    assert (cpu_reads < 255).mean() > 0.05, "the programs draw"
    difference = np.abs(cuda_reads - cpu_reads)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, \
        f"{(difference > 1).sum()} pixels differ by more than one level (at most {difference.max()})"
    for env in envs:
        env.close()
