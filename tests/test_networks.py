"""SPIRAL networks: shapes, autoregressive scoring, masks, gradients, sampling, parameters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from spiral.config import ExperimentConfig, load_experiment
from spiral.envs import action_spec_for, make_env
from spiral.envs.base import Observation
from spiral.nets import (build_discriminator, build_policy, images_to_tensor, observation_to_tensors)
from spiral.nets.discriminator import Discriminator
from spiral.nets.params import load_snapshot, snapshot_of
from spiral.runtime.snapshot import ParameterSnapshot
from spiral.nets.policy import PolicyInputs
from spiral.agent.trajectory import Unroll

torch.set_num_threads(1)


def tiny(**env_overrides: object) -> ExperimentConfig:
    overrides: dict = {"env": dict(env_overrides)} if env_overrides else {}
    return load_experiment("experiments/tiny.yaml", overrides=overrides)


def with_policy(cfg: ExperimentConfig, **changes: object) -> ExperimentConfig:
    return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, **changes))


VARIANTS = {
    "tiny-conditional": lambda: tiny(),
    "tiny-unconditional": lambda: tiny(conditional=False),
    "tiny-blind": lambda: with_policy(tiny(), blind=True),
    "tiny-blind-unconditional": lambda: with_policy(tiny(conditional=False), blind=True),
    "tiny-color": lambda: tiny(paint={"use_color": True, "use_pressure": True}),
    "tiny-gray": lambda: tiny(paint={"gray_levels": 8, "use_pressure": True, "brush_sizes": [2.0, 6.0, 12.0]}),
    "tiny-location-skip": lambda: with_policy(tiny(), location_skip=True),
    "paper-paint": lambda: ExperimentConfig(),
    "scene": lambda: load_experiment("experiments/mujoco.yaml"),
    "scene-location-features": lambda: with_policy(load_experiment("experiments/mujoco.yaml"), location_skip=True,
                                                   location_features=True),
}


def random_inputs(cfg: ExperimentConfig, lead: tuple[int, ...], seed: int = 0) -> PolicyInputs:
    """Policy inputs with random canvases, previous actions (with their true masks) and noise."""
    rng = np.random.default_rng(seed)
    spec = action_spec_for(cfg)
    c, s = cfg.image_channels, cfg.env.image_size
    prev = np.stack([rng.integers(0, n, size=lead) for n in spec.sizes], -1)
    canvas = rng.integers(0, 256, size=(*lead, s, s, c), dtype=np.uint8)
    target = rng.integers(0, 256, size=(*lead, s, s, c), dtype=np.uint8) if cfg.env.conditional else None
    obs = Observation(canvas=canvas, step=np.ones(lead, np.int32), prev_action=prev,
                      prev_mask=spec.masks_for(prev[..., 0]),
                      noise=rng.standard_normal((*lead, cfg.env.noise_dim)).astype(np.float32), target=target)
    return observation_to_tensors(obs)


def random_actions(cfg: ExperimentConfig, lead: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    sizes = action_spec_for(cfg).sizes
    return torch.from_numpy(np.stack([rng.integers(0, n, size=lead) for n in sizes], -1))


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------


def test_images_to_tensor_layout_and_range() -> None:
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[1, 2, 3, 1] = 255
    images[0, 0, 0, 2] = 51
    t = images_to_tensor(images)
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32
    assert t[1, 1, 2, 3] == 1.0 and t[0, 2, 0, 0] == pytest.approx(0.2)
    assert float(t.sum()) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(images.astype(np.float32))


def test_observation_to_tensors_single_and_stacked() -> None:
    cfg = tiny()
    single = random_inputs(cfg, (3,))
    assert single.canvas.shape == (3, 1, 64, 64) and single.target is not None
    assert single.prev_action.dtype == torch.long and single.step.dtype == torch.long
    assert single.prev_mask.dtype == torch.float32 and single.noise.shape == (3, cfg.env.noise_dim)
    stacked = random_inputs(cfg, (4, 3))
    num_heads = action_spec_for(cfg).num_heads
    assert stacked.canvas.shape == (4, 3, 1, 64, 64) and stacked.prev_action.shape == (4, 3, num_heads)
    assert stacked.flatten_time().canvas.shape == (12, 1, 64, 64)
    unconditional = random_inputs(tiny(conditional=False), (2,))
    assert unconditional.target is None and unconditional.to("cpu").target is None


# ---------------------------------------------------------------------------------------------
# Shapes and masks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_policy_step_shapes_and_masks(variant: str) -> None:
    cfg = VARIANTS[variant]()
    spec = action_spec_for(cfg)
    policy = build_policy(cfg)
    n = 5
    inputs = random_inputs(cfg, (n,))
    state = policy.initial_state(n)
    assert state[0].shape == (n, cfg.policy.core_dim) and state[1].shape == (n, cfg.policy.core_dim)
    out, new_state = policy(inputs, state, generator=torch.Generator().manual_seed(0))
    k = spec.num_heads
    assert out.actions.shape == (n, k) and out.actions.dtype == torch.long
    spec.validate_actions(out.actions.numpy())
    assert out.log_prob.shape == out.entropy.shape == out.value.shape == (n,)
    assert out.mask.shape == (n, k)
    np.testing.assert_array_equal(out.mask.numpy(), spec.masks_for(out.actions[:, 0].numpy()))
    assert bool((out.log_prob <= 0).all()) and bool((out.entropy >= 0).all())
    assert new_state[0].shape == (n, cfg.policy.core_dim)
    assert not torch.equal(new_state[0], state[0])


def test_paper_profile_location_heads_decode_the_full_grid() -> None:
    policy = build_policy(ExperimentConfig())
    spec = policy.spec
    assert spec.names == ("flag", "end", "control", "size", "pressure")
    inputs = random_inputs(ExperimentConfig(), (2,))
    logits = policy.head_logits(inputs, policy.initial_state(2), random_actions(ExperimentConfig(), (2,)))
    assert [tuple(l.shape) for l in logits] == [(2, 2), (2, 32 * 32), (2, 32 * 32), (2, 3), (2, 10)]


@pytest.mark.parametrize("grid_size", [4, 8, 16])
def test_location_skip_starts_as_the_policy_without_it_then_reads_the_encoder_map(grid_size: int) -> None:
    base = tiny(paint={"grid_size": grid_size})
    plain = build_policy(with_policy(base, location_skip=False))
    skip = build_policy(with_policy(base, location_skip=True))
    missing, unexpected = skip.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"location_skips.{k}.weight" for k in (1, 2))  # the shortcut's only parameters
    assert not unexpected
    cfg = with_policy(base, location_skip=True)
    inputs, actions = random_inputs(cfg, (3,)), random_actions(cfg, (3,))
    with torch.no_grad():
        before = plain.head_logits(inputs, plain.initial_state(3), actions)
        same = skip.head_logits(inputs, skip.initial_state(3), actions)
        for a, b in zip(before, same):
            torch.testing.assert_close(a, b)  # zero-initialised: acts exactly as without it
        for conv in skip.location_skips.values():
            conv.weight.normal_()
        changed = skip.head_logits(inputs, skip.initial_state(3), actions)
    torch.testing.assert_close(changed[0], before[0])  # flag has no shortcut
    for k in (1, 2):
        assert changed[k].shape == (3, grid_size * grid_size)
        assert not torch.allclose(changed[k], before[k])


def scenes(grid_size: int) -> ExperimentConfig:
    return load_experiment("experiments/tiny-mujoco.yaml", overrides={"env": {"mujoco": {"grid_size": grid_size}}})


@pytest.mark.parametrize("grid_size", [4, 8, 16])
def test_location_features_start_as_the_policy_without_them_then_feed_the_heads_after_the_location(
        grid_size: int) -> None:
    base = scenes(grid_size)
    plain = build_policy(with_policy(base, location_features=False))
    cfg = with_policy(base, location_features=True)
    featured = build_policy(cfg)
    missing, unexpected = featured.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["location_feature_projections.1.bias", "location_feature_projections.1.weight"]
    assert not unexpected
    inputs, actions = random_inputs(cfg, (3,)), random_actions(cfg, (3,))
    with torch.no_grad():
        before = plain.head_logits(inputs, plain.initial_state(3), actions)
        same = featured.head_logits(inputs, featured.initial_state(3), actions)
        for a, b in zip(before, same):
            torch.testing.assert_close(a, b)  # zero-initialised: acts exactly as without them
        for parameter in featured.location_feature_projections.parameters():
            parameter.normal_()
        changed = featured.head_logits(inputs, featured.initial_state(3), actions)
    for k in (0, 1):  # flag and location come before the features
        torch.testing.assert_close(changed[k], before[k])
    for k in range(2, len(before)):  # shape, size and colours read the chosen cell's features
        assert not torch.allclose(changed[k], before[k])


def test_move_steps_ignore_masked_heads() -> None:
    cfg = tiny(paint={"brush_sizes": [1.0, 2.0]})  # two sizes: a size head that a move ignores
    spec = action_spec_for(cfg)
    policy = build_policy(cfg)
    inputs = random_inputs(cfg, (4,))
    state = policy.initial_state(4)
    actions = random_actions(cfg, (4,))
    control, size = spec.index("control"), spec.index("size")
    changed = actions.clone()
    changed[:, control] = (changed[:, control] + 7) % spec.sizes[control]
    changed[:, size] = (changed[:, size] + 1) % spec.sizes[size]

    actions[:, 0] = changed[:, 0] = 0  # move: only flag and end count
    a, _ = policy(inputs, state, actions=actions)
    b, _ = policy(inputs, state, actions=changed)
    np.testing.assert_array_equal(a.mask.numpy(), np.tile([[1, 1, 0, 0]], (4, 1)))
    torch.testing.assert_close(a.log_prob, b.log_prob)
    torch.testing.assert_close(a.entropy, b.entropy)

    actions[:, 0] = changed[:, 0] = 1  # paint: every head counts
    a, _ = policy(inputs, state, actions=actions)
    b, _ = policy(inputs, state, actions=changed)
    assert bool((a.mask == 1).all())
    assert not torch.allclose(a.log_prob, b.log_prob)
    assert bool((a.entropy > policy(inputs, state, actions=torch.zeros_like(actions))[0].entropy).all())


# ---------------------------------------------------------------------------------------------
# Autoregressive scoring
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tiny-conditional", "tiny-color", "tiny-gray", "scene"])
def test_sampled_log_prob_equals_teacher_forcing_and_masked_head_sum(variant: str) -> None:
    cfg = VARIANTS[variant]()
    spec = action_spec_for(cfg)
    policy = build_policy(cfg).eval()
    n = 16
    inputs = random_inputs(cfg, (n,))
    state = policy.initial_state(n)
    with torch.no_grad():
        sampled, sampled_state = policy(inputs, state, generator=torch.Generator().manual_seed(3))
        forced, forced_state = policy(inputs, state, actions=sampled.actions)
        logits = policy.head_logits(inputs, state, sampled.actions)
    assert set(sampled.actions[:, 0].tolist()) == {0, 1}, "both flags should occur in 16 samples"
    torch.testing.assert_close(forced.log_prob, sampled.log_prob)
    torch.testing.assert_close(forced.entropy, sampled.entropy)
    torch.testing.assert_close(forced.value, sampled.value)
    torch.testing.assert_close(forced_state[0], sampled_state[0])

    mask = spec.masks_for(sampled.actions[:, 0].numpy())
    expected_lp = np.zeros(n)
    expected_entropy = np.zeros(n)
    for k, head_logits in enumerate(logits):
        log_p = torch.log_softmax(head_logits.double(), -1).numpy()
        assert log_p.shape == (n, spec.sizes[k])
        expected_lp += mask[:, k] * log_p[np.arange(n), sampled.actions[:, k].numpy()]
        expected_entropy += mask[:, k] * -(np.exp(log_p) * log_p).sum(-1)
    np.testing.assert_allclose(sampled.log_prob.numpy(), expected_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sampled.entropy.numpy(), expected_entropy, rtol=1e-5, atol=1e-5)


def test_later_heads_depend_on_earlier_choices() -> None:
    cfg = tiny()
    spec = action_spec_for(cfg)
    policy = build_policy(cfg)
    inputs = random_inputs(cfg, (3,))
    actions = random_actions(cfg, (3,))
    other = actions.clone()
    end = spec.index("end")
    other[:, end] = (other[:, end] + 37) % spec.sizes[end]
    with torch.no_grad():
        a = policy.head_logits(inputs, policy.initial_state(3), actions)
        b = policy.head_logits(inputs, policy.initial_state(3), other)
    torch.testing.assert_close(a[0], b[0])  # flag and end come before the change
    torch.testing.assert_close(a[end], b[end])
    assert not torch.allclose(a[spec.index("control")], b[spec.index("control")])


def test_unroll_of_a_real_episode_reproduces_the_acting_log_probs() -> None:
    cfg = tiny()
    policy = build_policy(cfg).eval()
    env = make_env(cfg, num_envs=3, seed=0, backend="fast")
    targets = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 1), dtype=np.uint8)
    obs = env.reset(targets)
    state = policy.initial_state(3)
    generator = torch.Generator().manual_seed(0)
    canvases, actions, masks, log_probs, values = [obs.canvas], [], [], [], []
    with torch.no_grad():
        while not env.done:
            out, state = policy(observation_to_tensors(obs), state, generator=generator)
            obs = env.step(out.actions.numpy())
            canvases.append(obs.canvas)
            actions.append(out.actions.numpy())
            masks.append(out.mask.numpy())
            log_probs.append(out.log_prob.numpy())
            values.append(out.value.numpy())
    unroll = Unroll(canvases=np.stack(canvases), actions=np.stack(actions), masks=np.stack(masks),
                    behaviour_log_probs=np.stack(log_probs), noise=obs.noise, targets=targets, policy_version=0)
    unroll.validate()
    inputs = observation_to_tensors(unroll.observations())
    assert inputs.canvas.shape == (9, 3, 1, 64, 64)
    with torch.no_grad():
        scored = policy.unroll(inputs, torch.from_numpy(unroll.actions), policy.initial_state(3))
    assert scored.log_prob.shape == scored.entropy.shape == scored.value.shape == (9, 3)
    np.testing.assert_allclose(scored.log_prob.numpy(), unroll.behaviour_log_probs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scored.value.numpy(), np.stack(values), rtol=1e-4, atol=1e-4)


def test_unroll_equals_forward_loop_from_a_nonzero_state() -> None:
    cfg = load_experiment("experiments/mujoco.yaml")
    policy = build_policy(cfg)
    t, b = 3, 2
    inputs = random_inputs(cfg, (t, b))
    actions = random_actions(cfg, (t, b))
    state = (torch.randn(b, cfg.policy.core_dim), torch.randn(b, cfg.policy.core_dim))
    with torch.no_grad():
        batched = policy.unroll(inputs, actions, state)
        s = state
        for i in range(t):
            step = PolicyInputs(**{f.name: None if getattr(inputs, f.name) is None else getattr(inputs, f.name)[i]
                                   for f in dataclasses.fields(inputs)})
            out, s = policy(step, s, actions=actions[i])
            torch.testing.assert_close(batched.log_prob[i], out.log_prob, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.entropy[i], out.entropy, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.value[i], out.value, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Gradients and sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tiny-conditional", "tiny-blind-unconditional", "tiny-color", "tiny-gray",
                                     "tiny-location-skip", "scene"])
def test_gradients_reach_every_parameter(variant: str) -> None:
    cfg = VARIANTS[variant]()
    policy = build_policy(cfg)
    t, b = 3, 4
    inputs = random_inputs(cfg, (t, b))
    actions = random_actions(cfg, (t, b))
    actions[..., 0] = torch.tensor([[0, 1, 1, 1]] * t)  # paint steps make every head count
    out = policy.unroll(inputs, actions, policy.initial_state(b))
    (-(out.log_prob.sum()) - 0.1 * out.entropy.sum() + out.value.pow(2).sum()).backward()
    dead = [name for name, p in policy.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0.0]
    assert not dead, f"no gradient reached {dead}"


def test_generator_makes_sampling_deterministic() -> None:
    cfg = tiny()
    policy = build_policy(cfg)
    inputs = random_inputs(cfg, (8,))

    def sample(seed: int) -> torch.Tensor:
        with torch.no_grad():
            out, _ = policy(inputs, policy.initial_state(8), generator=torch.Generator().manual_seed(seed))
        return out.actions

    assert torch.equal(sample(11), sample(11))
    assert not torch.equal(sample(11), sample(12))


@pytest.mark.parametrize("variant", ["tiny-conditional", "tiny-color", "scene"])
def test_greedy_acting_takes_each_heads_most_likely_value_given_the_earlier_ones(variant: str) -> None:
    cfg = VARIANTS[variant]()
    torch.manual_seed(0)
    policy = build_policy(cfg)
    inputs = random_inputs(cfg, (8,))
    state = policy.initial_state(8)
    with torch.no_grad():
        runs = [policy(inputs, state, generator=torch.Generator().manual_seed(seed), greedy=True)[0]
                for seed in (1, 2)]
        assert torch.equal(runs[0].actions, runs[1].actions), "greedy acting must not depend on the random source"
        logits = policy.head_logits(inputs, state, runs[0].actions)
    for k, head_logits in enumerate(logits):
        assert torch.equal(head_logits.argmax(-1), runs[0].actions[:, k]), f"head {k} is not its argmax"


def test_bad_inputs_are_named() -> None:
    cfg = tiny()
    policy = build_policy(cfg)
    inputs = random_inputs(cfg, (2,))
    with pytest.raises(ValueError, match="target"):
        policy(dataclasses.replace(inputs, target=None), policy.initial_state(2))
    with pytest.raises(ValueError, match="canvas"):
        policy(random_inputs(cfg, (2, 2)), policy.initial_state(2))
    spec = action_spec_for(cfg)
    with pytest.raises(ValueError, match="actions"):
        policy(inputs, policy.initial_state(2), actions=torch.zeros(2, spec.num_heads + 1, dtype=torch.long))
    too_big = torch.zeros(2, spec.num_heads, dtype=torch.long)
    too_big[:, spec.index("end")] = spec.sizes[spec.index("end")]
    with pytest.raises(ValueError, match="out of range"):
        policy(inputs, policy.initial_state(2), actions=too_big)
    with pytest.raises(ValueError, match="mlp_hidden"):
        build_policy(with_policy(cfg, mlp_hidden=(32, 16, 8)))


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def test_snapshot_bytes_round_trip_into_a_fresh_policy() -> None:
    cfg = tiny()
    torch.manual_seed(0)
    source = build_policy(cfg)
    torch.manual_seed(1)
    dest = build_policy(cfg)
    snapshot = snapshot_of(source, version=42)
    assert list(snapshot.tensors) == list(source.state_dict())
    assert snapshot.num_bytes == sum(p.numel() * 4 for p in source.parameters())
    data = snapshot.to_bytes()
    assert len(data) >= snapshot.num_bytes
    restored = ParameterSnapshot.from_bytes(data)
    assert restored.version == 42 and list(restored.tensors) == list(snapshot.tensors)
    for name, array in snapshot.tensors.items():
        np.testing.assert_array_equal(restored.tensors[name], array)
    # The archive is a plain .npz: readable without pickle by numpy itself.
    import io
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert int(npz["__version__"]) == 42

    inputs = random_inputs(cfg, (3,))
    frozen = {k: v.setflags(write=False) or v for k, v in restored.tensors.items()}  # as from the wire
    load_snapshot(dest, ParameterSnapshot(restored.version, frozen))
    with torch.no_grad():
        a, _ = source(inputs, source.initial_state(3), generator=torch.Generator().manual_seed(5))
        b, _ = dest(inputs, dest.initial_state(3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.actions, b.actions)
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=0)
    # The snapshot is a copy: training the source later does not change it.
    with torch.no_grad():
        next(source.parameters()).add_(1.0)
    np.testing.assert_array_equal(snapshot.tensors[next(iter(snapshot.tensors))],
                                  restored.tensors[next(iter(restored.tensors))])


def test_load_snapshot_names_missing_unexpected_and_misshaped_tensors() -> None:
    policy = build_policy(tiny())
    good = snapshot_of(policy, 1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    names = list(good.tensors)

    missing = dict(good.tensors)
    del missing[names[3]]
    with pytest.raises(ValueError, match=f"missing tensors: {names[3]}"):
        load_snapshot(policy, ParameterSnapshot(2, missing))

    unexpected = {**good.tensors, "extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="unexpected tensors: extra.weight"):
        load_snapshot(policy, ParameterSnapshot(2, unexpected))

    misshaped = {k: (v + 1.0 if k != names[0] else np.zeros((1, 2), np.float32)) for k, v in good.tensors.items()}
    with pytest.raises(ValueError, match=f"mis-shaped tensors: {names[0]}"):
        load_snapshot(policy, ParameterSnapshot(2, misshaped))
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the load failed"

    other = build_discriminator(tiny())
    with pytest.raises(ValueError, match="does not fit SpiralPolicy"):
        load_snapshot(policy, snapshot_of(other, 1))


def test_from_bytes_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="parameter archive"):
        ParameterSnapshot.from_bytes(b"definitely not a zip file")
    import io
    buf = io.BytesIO()
    np.savez(buf, weight=np.zeros(2))
    with pytest.raises(ValueError, match="__version__"):
        ParameterSnapshot.from_bytes(buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------


def test_discriminator_conditional_requires_targets() -> None:
    cfg = tiny()
    critic = build_discriminator(cfg)
    images = torch.rand(5, 1, 64, 64)
    scores = critic(images, torch.rand(5, 1, 64, 64))
    assert scores.shape == (5,)
    with pytest.raises(ValueError, match="conditional"):
        critic(images)
    with pytest.raises(ValueError, match="targets must be"):
        critic(images, torch.rand(5, 3, 64, 64))
    with pytest.raises(ValueError, match="images must be"):
        critic(torch.rand(5, 64, 64))
    # The pair matters: the same render scores differently against different targets.
    assert not torch.allclose(critic(images, torch.zeros_like(images)), critic(images, torch.ones_like(images)))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_unconditional_discriminator_and_input_gradients(layer_norm: bool) -> None:
    cfg = load_experiment("experiments/mujoco.yaml", overrides={"env": {"conditional": False}})
    critic = Discriminator(cfg.image_channels, 64, conditional=False, channels=8, num_layers=4, layer_norm=layer_norm)
    images = torch.rand(4, 3, 64, 64, requires_grad=True)
    scores = critic(images)
    assert scores.shape == (4,)
    # WGAN-GP needs per-sample gradients of the score with respect to the input.
    (grad,) = torch.autograd.grad(scores.sum(), images, create_graph=True)
    assert grad.shape == images.shape and float(grad.detach().abs().sum()) > 0
    # No batch statistics: a sample's score does not depend on the rest of the batch.
    torch.testing.assert_close(critic(images[:1]), scores[:1])
    with pytest.raises(ValueError, match="unconditional"):
        critic(images, images)
    assert isinstance(build_discriminator(cfg), Discriminator)
    with pytest.raises(ValueError, match="num_layers"):
        Discriminator(1, 64, conditional=False, num_layers=7)


def test_pooled_critic_judges_where_the_ink_is_at_the_pooled_scale() -> None:
    cfg = load_experiment("experiments/tiny-critic-pool.yaml")
    critic = build_discriminator(cfg)
    assert critic.input_pool == 4
    targets = torch.rand(3, 1, 64, 64)
    # Two renders with the same ink in every 4x4 cell (one spread evenly, one in a corner pixel
    # of each cell at 16x the intensity) look the same to it; moving the ink to another cell does not.
    spread = torch.full((3, 1, 64, 64), 0.05)
    corner = torch.zeros(3, 1, 64, 64)
    corner[..., ::4, ::4] = 0.8
    torch.testing.assert_close(critic(spread, targets), critic(corner, targets))
    moved = torch.zeros(3, 1, 64, 64)
    moved[..., :32, :] = 0.1
    assert not torch.allclose(critic(spread, targets), critic(moved, targets))
    # WGAN-GP's input gradients pass through the pooling.
    images = torch.rand(2, 1, 64, 64, requires_grad=True)
    (grad,) = torch.autograd.grad(critic(images, targets[:2]).sum(), images)
    assert float(grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="input_pool=3"):
        Discriminator(1, 64, conditional=False, num_layers=2, input_pool=3)
    with pytest.raises(ValueError, match="16x16 input"):
        Discriminator(1, 64, conditional=False, num_layers=5, input_pool=4)
    with pytest.raises(Exception, match="discriminator.input_pool"):
        load_experiment("experiments/tiny-critic-pool.yaml", overrides={"discriminator": {"num_layers": 5}})
