"""Policy speed: acting forwards and learning unrolls, against a plain conv+LSTM baseline.

What the autoregressive heads cost. In one run on this machine (so the ratios are fair on a
busy machine) this measures, for the SPIRAL policy and for a baseline of the same widths
(same input conv, encoder, Linear and LSTM, but one independent Linear head per action
component and no location decoders or per-head residual MLPs):

1. acting: ``forward`` with sampling for N environments under ``torch.no_grad`` (what an
   actor does once per environment step), as environment steps per second;
2. learning: ``unroll`` over a ``[T, B]`` batch of episodes (T = episode_length - 1) plus the
   backward pass of a loss on its log-probabilities, entropies and values, in milliseconds.

Both are measured at batch 64 (N = B = 64) for each profile given, by default the CPU profile
(``tiny``) and the paper profile (``mnist``: the released agent's widths). The two networks
are timed in alternating rounds and the median round is reported, with their parameter
counts. The last line of output is one JSON object with every number.

Usage::

    python -m bench.policy_speed [--config tiny mnist] [--num-envs 64] [--batch 64] [--threads 1]
                                 [--seconds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import numpy as np
import torch
from torch import nn


from spiral.runtime.allocator import retain_freed_memory
from spiral.config import ExperimentConfig, experiment_path, load_experiment
from spiral.envs import action_spec_for
from spiral.envs.base import Observation
from spiral.nets import build_policy, observation_to_tensors
from spiral.nets.layers import MLP, ConvEncoder, xy_grids
from spiral.nets.policy import PolicyInputs, PolicyOutput, UnrollOutput


class ConvLSTMBaseline(nn.Module):
    """The SPIRAL torso and LSTM with factorised (independent, linear) heads: the cheap reference."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        p = cfg.policy
        self.spec = action_spec_for(cfg)
        c, s = cfg.image_channels, cfg.env.image_size
        in_channels = 2 + (0 if p.blind else c) + (c if cfg.env.conditional else 0)
        self.blind, self.conditional, self.core_dim = p.blind, cfg.env.conditional, p.core_dim
        self.register_buffer("grids", xy_grids(s, s), persistent=False)
        self.input_conv = nn.Conv2d(in_channels, p.conv_channels, 5, padding=2)
        self.cond = MLP(self.spec.num_heads + cfg.env.noise_dim, p.mlp_hidden)
        self.encoder = ConvEncoder(p.conv_channels, s // 8, p.conv_channels, p.encoder_res_blocks, p.conv_channels)
        self.torso_out = nn.Linear(p.conv_channels * 64, p.core_dim)
        self.core = nn.LSTM(p.core_dim, p.core_dim)
        self.heads = nn.Linear(p.core_dim, sum(self.spec.sizes))
        self.value_head = nn.Linear(p.core_dim, 1)
        self.register_buffer("mask_table", torch.from_numpy(self.spec.mask_table()), persistent=False)
        self.to(memory_format=torch.channels_last)  # the same layout tricks as SpiralPolicy

    def initial_state(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(n, self.core_dim, device=self.value_head.weight.device)
        return zeros, zeros.clone()

    def _torso(self, x: PolicyInputs) -> torch.Tensor:
        spatial = [] if self.blind else [x.canvas]
        if self.conditional:
            spatial.append(x.target)
        spatial.append(self.grids.expand(x.canvas.shape[0], -1, -1, -1))
        h = self.input_conv(torch.cat(spatial, 1).contiguous(memory_format=torch.channels_last))
        cond = self.cond(torch.cat([x.prev_action.float() * x.prev_mask, x.noise], 1))
        return self.torso_out(self.encoder(h.add_(cond[:, :, None, None]).relu_()).flatten(1))

    def _score(self, core: torch.Tensor, actions: torch.Tensor | None,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = torch.split(self.heads(core), list(self.spec.sizes), dim=1)
        if actions is None:
            actions = torch.stack([torch.multinomial(torch.softmax(l, -1), 1, generator=generator).squeeze(-1)
                                   for l in logits], 1)
        mask = self.mask_table[actions[:, 0]]
        log_ps = [torch.log_softmax(l, -1) for l in logits]
        lp = torch.stack([lp.gather(1, actions[:, k:k + 1]).squeeze(1) for k, lp in enumerate(log_ps)], 1)
        ent = torch.stack([-(lp.exp() * lp).sum(-1) for lp in log_ps], 1)
        return actions, (lp * mask).sum(1), (ent * mask).sum(1), mask

    def forward(self, x: PolicyInputs, state: tuple[torch.Tensor, torch.Tensor],
                generator: torch.Generator | None = None) -> tuple[PolicyOutput, tuple[torch.Tensor, torch.Tensor]]:
        h, c = state
        out, (h2, c2) = self.core(self._torso(x).unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))
        core = out[0]
        actions, lp, ent, mask = self._score(core, None, generator)
        return PolicyOutput(actions, lp, ent, self.value_head(core).squeeze(-1), mask), (h2[0], c2[0])

    def unroll(self, x: PolicyInputs, actions: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> UnrollOutput:
        t, b = x.canvas.shape[:2]
        h, c = state
        core, _ = self.core(self._torso(x.flatten_time()).view(t, b, -1), (h.unsqueeze(0), c.unsqueeze(0)))
        core = core.reshape(t * b, -1)
        _, lp, ent, _ = self._score(core, actions.reshape(t * b, -1), None)
        return UnrollOutput(lp.view(t, b), ent.view(t, b), self.value_head(core).view(t, b))


def random_observation(cfg: ExperimentConfig, lead: tuple[int, ...], rng: np.random.Generator) -> Observation:
    spec = action_spec_for(cfg)
    s, c = cfg.env.image_size, cfg.image_channels
    prev = np.stack([rng.integers(0, n, size=lead) for n in spec.sizes], -1)
    return Observation(
        canvas=rng.integers(0, 256, size=(*lead, s, s, c), dtype=np.uint8),
        step=np.zeros(lead, np.int32), prev_action=prev, prev_mask=spec.masks_for(prev[..., 0]),
        noise=rng.standard_normal((*lead, cfg.env.noise_dim)).astype(np.float32),
        target=rng.integers(0, 256, size=(*lead, s, s, c), dtype=np.uint8) if cfg.env.conditional else None)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rounds(fns: dict[str, Callable[[], None]], seconds: float, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds of ~0.25 s."""
    for fn in fns.values():  # warm-up
        fn(); fn()
    sync()
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + seconds * len(fns)
    while time.perf_counter() < deadline or min(len(v) for v in per_call.values()) < 3:
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                if time.perf_counter() - start >= 0.25:
                    break
            sync()
            per_call[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(v) for name, v in per_call.items()}


def measure(cfg: ExperimentConfig, args: argparse.Namespace, device: torch.device,
            sync: Callable[[], None]) -> dict[str, object]:
    """Acting and learning times of the SPIRAL policy and the baseline for one profile."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    policy = build_policy(cfg).to(device)
    baseline = ConvLSTMBaseline(cfg).to(device)
    nets = {"spiral": policy, "baseline": baseline}

    # 1. Acting: one sampling forward for N environments (observation conversion included).
    obs = random_observation(cfg, (args.num_envs,), rng)
    generator = torch.Generator(device=device).manual_seed(0)

    def act(net: nn.Module) -> Callable[[], None]:
        state = net.initial_state(args.num_envs)

        def step() -> None:
            with torch.no_grad():
                out, _ = net(observation_to_tensors(obs).to(device), state, generator=generator)
                out.actions.cpu()
        return step

    acting = rounds({name: act(net) for name, net in nets.items()}, args.seconds, sync)

    # 2. Learning: unroll (the forward over [T, B]) and backward.
    t = cfg.env.episode_length - 1
    inputs = observation_to_tensors(random_observation(cfg, (t, args.batch), rng)).to(device)
    spec = action_spec_for(cfg)
    actions = torch.from_numpy(np.stack([rng.integers(0, n, size=(t, args.batch)) for n in spec.sizes], -1)).to(device)

    def learn(net: nn.Module) -> Callable[[], None]:
        def step() -> None:
            net.zero_grad(set_to_none=True)
            out = net.unroll(inputs, actions, net.initial_state(args.batch))
            (-(out.log_prob.mean()) - 0.01 * out.entropy.mean() + out.value.pow(2).mean()).backward()
        return step

    learning = rounds({name: learn(net) for name, net in nets.items()}, args.seconds, sync)
    result: dict[str, object] = {
        "config": cfg.name,
        "num_envs": args.num_envs,
        "act_steps_per_s": round(args.num_envs / acting["spiral"], 1),
        "act_forward_ms": round(acting["spiral"] * 1e3, 3),
        "baseline_act_steps_per_s": round(args.num_envs / acting["baseline"], 1),
        "act_slowdown_vs_baseline": round(acting["spiral"] / acting["baseline"], 2),
        "unroll_T": t,
        "unroll_B": args.batch,
        "unroll_backward_ms": round(learning["spiral"] * 1e3, 2),
        "baseline_unroll_backward_ms": round(learning["baseline"] * 1e3, 2),
        "learn_slowdown_vs_baseline": round(learning["spiral"] / learning["baseline"], 2),
        "params": count(policy),
        "baseline_params": count(baseline),
    }
    print(f"{cfg.name}: acting, N={args.num_envs}: SPIRAL {result['act_steps_per_s']} steps/s "
          f"({result['act_forward_ms']} ms/forward); baseline {result['baseline_act_steps_per_s']} steps/s; "
          f"SPIRAL/baseline time x{result['act_slowdown_vs_baseline']}")
    print(f"{cfg.name}: forward+backward of an unroll, T={t} B={args.batch}: SPIRAL {result['unroll_backward_ms']} ms; "
          f"baseline {result['baseline_unroll_backward_ms']} ms; SPIRAL/baseline time "
          f"x{result['learn_slowdown_vs_baseline']}")
    print(f"{cfg.name}: parameters: SPIRAL {result['params']:,}; baseline {result['baseline_params']:,}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["tiny", "mnist"],
                        help="experiment names or YAML paths (default: the CPU profile tiny and the paper "
                             "profile mnist)")
    parser.add_argument("--num-envs", type=int, default=64, help="N environments per acting forward")
    parser.add_argument("--batch", type=int, default=64, help="B episodes per learning unroll")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing seconds per network and phase")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    retain_freed_memory()  # allocate as the learner does (the actor loop is unaffected: its blocks are small)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"policy speed on {device} ({args.threads} thread(s))")
    profiles = [measure(load_experiment(experiment_path(name)), args, device, sync) for name in args.config]
    print(json.dumps({"device": str(device), "threads": args.threads, "profiles": profiles}))

if __name__ == "__main__":
    main()
