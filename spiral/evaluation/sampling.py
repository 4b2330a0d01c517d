"""Sampling a trained agent: paint N episodes with a checkpoint's policy, exactly as actors act.

:func:`sample_policy` runs the actor's own episode loop (:class:`spiral.agent.acting.EpisodeRunner`)
in chunks of at most ``chunk_size`` canvases, so a thousand episodes need no more memory than
one chunk. Unconditional runs paint from fresh noise; conditional runs paint a pool of target
images (by default the experiment's held-out ``dataset.holdout``), cycled when more episodes
than targets are asked for: episode ``i`` paints target ``i % len(pool)``.

:func:`write_samples` writes what ``spiral sample`` leaves behind: ``canvases.npz``, a grid
PNG and one program JSON per episode (which ``spiral render`` re-executes; on libmypaint it
reproduces the episode's canvas pixel for pixel); :func:`write_animations` the stroke
animations (``spiral sample --animate``, :mod:`spiral.evaluation.animation`).

Loading weights: :func:`load_policy` reads a learner checkpoint (``{"trainer": ...}``, see
``learner/learner.py``) into a fresh policy, the trained weights or, with ``average``, their
moving average (``learner.policy_average_decay``); :func:`resolve_run` finds the config and
weights of a run directory, a checkpoint file or an export (:mod:`spiral.evaluation.export`),
and :func:`locate_agent` is the one place that tells which a path is. It acts with
:class:`spiral.agent.acting.EpisodeRunner`, the actors' own loop.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from spiral.agent.acting import EpisodeRunner  # the actors' own loop, so sampling acts exactly alike
from spiral.runtime.artifact_store import fetch_run, is_remote_uri
from spiral.runtime.atomic import atomic_write_bytes
from spiral.runtime.checkpoint import latest_checkpoint, load_checkpoint
from spiral.config import ExperimentConfig, resolve_experiment
from spiral.envs import action_spec_for, make_env
from spiral.envs.programs import Program, program_from_actions, save_program
from spiral.nets import build_policy
from spiral.nets.policy import SpiralPolicy
from spiral.agent.rewards import reconstruction_l2
from spiral.evaluation.animation import encode_gif, step_frames
from spiral.evaluation.export import MANIFEST_NAME, ExportError, is_export, read_export
from spiral.evaluation.visualize import pair_grid, save_png

DEFAULT_CHUNK_SIZE = 64
"""Episodes run side by side in one batched environment."""
GRID_EPISODES = 64
"""Episodes shown in the grid PNG (the first ones); every episode is in ``canvases.npz``."""


class SampleError(ValueError):
    """Bad input to sampling: a missing run, config or checkpoint, or a malformed targets file."""


@dataclass(frozen=True)
class SampleResult:
    """The finished episodes of :func:`sample_policy`.

    Attributes:
        cfg: The experiment the episodes ran in, with ``env.paint.backend`` set to the renderer
            that painted them (so each program's default backend is that renderer).
        canvases: Final canvases, uint8 ``[N, H, W, C]``.
        actions: Every episode's actions, int64 ``[N, T, K]`` in action-spec head order.
        targets: The target each episode painted, uint8 ``[N, H, W, C]``; None when unconditional.
        l2: Per-episode reconstruction error ``[N]`` against ``targets``; None when unconditional.
        canvas_steps: Every episode's canvas before each action and the final one, time-major
            uint8 ``[T + 1, N, H, W, C]`` as in an unroll (``sample_policy(keep_steps=True)``), else None.
    """

    cfg: ExperimentConfig
    canvases: np.ndarray
    actions: np.ndarray
    targets: np.ndarray | None = None
    l2: np.ndarray | None = None
    canvas_steps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.canvases)

    @property
    def mean_l2(self) -> float | None:
        """Mean reconstruction error over the episodes (None for unconditional runs)."""
        return None if self.l2 is None else float(self.l2.mean())

    def program(self, index: int) -> Program:
        """The program episode ``index`` executed."""
        return program_from_actions(self.cfg.env, self.actions[index], action_spec_for(self.cfg))


@dataclass(frozen=True)
class SampleOutputs:
    """Paths :func:`write_samples` wrote."""

    canvases: Path
    grid: Path
    programs: Path


@dataclass(frozen=True)
class AnimationOutputs:
    """Paths :func:`write_animations` wrote."""

    grid: Path
    """The grid animation: frame ``i`` shows every shown episode's canvas after ``i`` actions."""
    episodes: Path
    """The directory of ``episode-NNNNN.gif``, one per episode."""


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


def has_average(state: dict[str, Any]) -> bool:
    """Whether a learner checkpoint's ``state`` carries the policy's moving average."""
    trainer = state.get("trainer")
    return isinstance(trainer, dict) and "policy_average" in trainer


def policy_from_weights(cfg: ExperimentConfig, weights: Mapping[str, Mapping[str, torch.Tensor]],
                        average: bool = False) -> SpiralPolicy:
    """A policy for ``cfg`` holding weight set ``policy`` (or, with ``average``, ``policy_average``) of ``weights``.

    Raises:
        ValueError, RuntimeError: the set is missing, or its tensors do not fit ``cfg``'s policy.
    """
    key = "policy_average" if average else "policy"
    if key not in weights:
        hint = " (its run had learner.policy_average_decay 0)" if average else ""
        raise ValueError(f"no {key!r} weights{hint} (there are {sorted(weights)})")
    policy = build_policy(cfg)
    policy.load_state_dict(weights[key])
    return policy


def policy_from_state(cfg: ExperimentConfig, state: dict[str, Any], average: bool = False) -> SpiralPolicy:
    """A policy for ``cfg`` holding the weights of a learner checkpoint's ``state``.

    Args:
        cfg: The experiment the checkpoint was trained for (it decides the architecture).
        state: A learner checkpoint's state: ``{"trainer": PolicyTrainer.state_dict(), ...}``.
        average: Load the weights' moving average (``learner.policy_average_decay``) instead of
            the trained weights.

    Raises:
        KeyError, ValueError, RuntimeError: the state is not a learner checkpoint of ``cfg``,
            or ``average`` is asked of a checkpoint without one.
    """
    return policy_from_weights(cfg, checkpoint_weights(state), average)


def checkpoint_weights(state: Mapping[str, Any]) -> dict[str, Mapping[str, torch.Tensor]]:
    """The policy weight sets of a learner checkpoint's ``state``: ``policy`` and, where kept, ``policy_average``.

    Raises:
        KeyError: the state is no learner checkpoint's (no trainer state with policy weights).
    """
    trainer = state["trainer"]
    if not isinstance(trainer, Mapping) or "policy" not in trainer:
        raise KeyError("the checkpoint's trainer state holds no 'policy' weights")
    return {key: trainer[key] for key in ("policy", "policy_average") if key in trainer}


def load_policy(cfg: ExperimentConfig, path: str | Path, average: bool = False) -> tuple[SpiralPolicy, int]:
    """The policy (or, with ``average``, the weights' moving average) of a learner checkpoint file, and its version.

    Raises:
        OSError, KeyError, RuntimeError, ValueError: the file is missing, not a checkpoint,
            not one of ``cfg``'s policy, or has no average when ``average`` asks for it.
    """
    version, state = load_checkpoint(Path(path))
    return policy_from_state(cfg, state, average), version


@dataclass(frozen=True)
class AgentLocation:
    """What an agent path names (:func:`locate_agent`).

    Attributes:
        kind: ``run`` (a ``spiral up`` run or PBT member directory), ``checkpoint`` (one learner
            checkpoint file) or ``export`` (a ``spiral export`` directory).
        path: The local path.
    """

    kind: str
    path: Path


def locate_agent(source: str | Path) -> AgentLocation:
    """Classify the path ``spiral sample`` and ``spiral export`` are given: the one place that reads it.

    Raises:
        SampleError: no such path, or a directory that is neither a run nor an export.
    """
    path = Path(source)
    if not path.exists():
        raise SampleError(f"{path}: no such run directory, checkpoint file or export directory")
    if not path.is_dir():
        return AgentLocation("checkpoint", path)
    if is_export(path):
        return AgentLocation("export", path)
    if (path / "learner").is_dir():
        return AgentLocation("run", path)
    members = sorted(p.name for p in path.glob("member-*") if p.is_dir())
    hint = f" (a population run: name one member, e.g. {path / members[0]})" if members else ""
    raise SampleError(f"{path}: neither a run directory (it has no learner/ checkpoints) nor an export "
                      f"(no {MANIFEST_NAME}){hint}")


@dataclass(frozen=True)
class ResolvedRun:
    """An experiment and one trained policy's weights: what ``spiral sample`` paints and ``spiral export`` packs."""

    cfg: ExperimentConfig
    config_path: Path
    version: int
    weights: Mapping[str, Mapping[str, torch.Tensor]]
    """``policy`` and, where the run kept one, ``policy_average`` (:func:`checkpoint_weights`)."""
    checkpoint: str
    """Where the weights came from: a file, ``DIR (newest)`` for a run directory, or ``export DIR``."""
    kind: str
    """The :class:`AgentLocation` kind: ``run``, ``checkpoint`` or ``export``."""
    training: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """The checkpoint's ``frames`` and ``updates`` where it records them."""

    @property
    def has_average(self) -> bool:
        """Whether the weights' moving average is here (``--average``)."""
        return "policy_average" in self.weights

    def policy(self, average: bool = False) -> SpiralPolicy:
        """A policy holding the trained weights or, with ``average``, their moving average.

        Raises:
            SampleError: no average, or weights that do not fit :attr:`cfg`'s policy.
        """
        if average and not self.has_average:
            raise SampleError(f"{self.checkpoint}: --average, but it holds no averaged policy "
                              "(its run had learner.policy_average_decay 0)")
        try:
            return policy_from_weights(self.cfg, self.weights, average)
        except (KeyError, ValueError, RuntimeError) as exc:
            what = "an exported policy" if self.kind == "export" else "a learner checkpoint"
            raise SampleError(f"{self.checkpoint}: not {what} of {self.config_path}: "
                              f"{type(exc).__name__}: {exc}") from exc


def resolve_run(path: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()) -> ResolvedRun:
    """Find the config and policy weights a run directory, checkpoint file or export names.

    Args:
        path: A ``spiral up`` run directory (``config.yaml`` and ``learner/ckpt-*.pt``; the
            newest loadable checkpoint is used), a PBT member directory (``member-K``, its
            config one level up), a checkpoint file (its config at ``<dir>/../config.yaml``),
            or a ``spiral export`` directory (its ``experiment.yaml``); see :func:`locate_agent`.
        config: An experiment YAML that overrides the one found next to the run.
        overrides: ``FIELD=VALUE`` items applied over the config (``spiral sample --set``; see
            :func:`spiral.config.parse_overrides`), e.g. another brush to paint the same programs with.

        A store URI (``s3://``, ``gs://``, ``file://``; ``run.artifact_uri/RUN``, a member of it, a
            checkpoint in it or an export) is fetched first: :func:`spiral.runtime.artifact_store.fetch_run`.

    Raises:
        SampleError: no such path, no config, no loadable checkpoint, a broken export.
    """
    if is_remote_uri(path):
        return _resolve_remote_run(str(path), config, overrides)
    location = locate_agent(path)
    path = location.path
    export = None
    if location.kind == "export":
        try:
            export = read_export(path)
        except ExportError as exc:
            raise SampleError(str(exc)) from exc
        candidates = [export.experiment_path]
    elif location.kind == "run":
        candidates = [path / "config.yaml", path.parent / "config.yaml"]
    else:
        candidates = [path.parent.parent / "config.yaml"]
    config_path = Path(config) if config is not None else next((c for c in candidates if c.is_file()), candidates[0])
    if not config_path.is_file():
        raise SampleError(f"{config_path}: no experiment config (pass --config FILE.yaml)")
    try:
        cfg = resolve_experiment(config_path, overrides).config
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError and names the file or the --set item
        raise SampleError(f"bad experiment config: {exc}") from exc
    if export is not None:
        try:
            weights = {name: export.weights(name) for name in export.weight_sets}
        except ExportError as exc:
            raise SampleError(str(exc)) from exc
        return ResolvedRun(cfg=cfg, config_path=config_path, version=export.policy_version, weights=weights,
                           checkpoint=f"export {path}", kind=location.kind)
    if location.kind == "run":
        latest = latest_checkpoint(path / "learner")
        if latest is None:
            raise SampleError(f"{path / 'learner'}: no checkpoint (ckpt-VERSION.pt) yet; has the learner run long enough?")
        version, state = latest
        where = f"{path / 'learner'} (newest)"
    else:
        try:
            version, state = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is no checkpoint
            raise SampleError(f"{path}: not a readable checkpoint: {exc}") from exc
        where = str(path)
    try:
        weights = checkpoint_weights(state)
    except (KeyError, TypeError) as exc:
        raise SampleError(f"{where}: not a learner checkpoint ({exc})") from exc
    training = {key: int(state[key]) for key in ("frames", "updates") if key in state}
    return ResolvedRun(cfg=cfg, config_path=config_path, version=version, weights=weights, checkpoint=where,
                       kind=location.kind, training=training)


def _resolve_remote_run(uri: str, config: str | Path | None, overrides: Sequence[str]) -> ResolvedRun:
    """:func:`resolve_run` of a run in a store, fetched into a temporary directory (removed after)."""
    with tempfile.TemporaryDirectory(prefix="spiral-run-") as local:
        try:
            fetched = fetch_run(uri, Path(local))
        except (OSError, ImportError, ValueError) as exc:  # FileNotFoundError: nothing there; backend errors
            raise SampleError(f"{uri}: cannot fetch the run: {exc}") from exc
        resolved = resolve_run(fetched, config, overrides)
    where = f"{uri}" + (f" (newest: version {resolved.version})" if resolved.kind == "run" else "")
    return dataclasses.replace(resolved, checkpoint=where)


def load_targets(path: str | Path, cfg: ExperimentConfig) -> np.ndarray:
    """Target images from an ``.npz`` file, checked against the experiment.

    The file holds one uint8 ``[N, H, W, C]`` array: under the key ``targets``, or as its only
    array. ``H = W = env.image_size`` and ``C`` is the experiment's image channels.

    Raises:
        SampleError: the file is missing, not an npz, or its array has the wrong dtype or shape.
    """
    path = Path(path)
    expected = f"uint8 [N, {cfg.env.image_size}, {cfg.env.image_size}, {cfg.image_channels}]"
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise SampleError(f"{path}: no such targets file") from exc
    except IsADirectoryError as exc:
        raise SampleError(f"{path}: is a directory, not a targets .npz file") from exc
    except (OSError, ValueError, EOFError) as exc:
        raise SampleError(f"{path}: not an .npz file of {expected}: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise SampleError(f"{path}: not an .npz archive (expected an .npz holding {expected})")
    with loaded as archive:
        keys = list(archive.keys())
        if "targets" in keys:
            key = "targets"
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise SampleError(f"{path}: expected a 'targets' array (or a single array) of {expected}, "
                              f"found arrays {keys}")
        try:
            targets = archive[key]
        except (OSError, ValueError, EOFError) as exc:
            raise SampleError(f"{path}: array {key!r} is unreadable: {exc}") from exc
    return check_targets(targets, cfg, source=str(path))


def check_targets(targets: np.ndarray, cfg: ExperimentConfig, source: str = "targets") -> np.ndarray:
    """``targets`` if they are uint8 ``[N >= 1, H, W, C]`` images of the experiment's size.

    Raises:
        SampleError: naming ``source`` and the expected shape.
    """
    size, channels = cfg.env.image_size, cfg.image_channels
    expected = f"uint8 [N, {size}, {size}, {channels}]"
    if targets.dtype != np.uint8:
        raise SampleError(f"{source}: targets must be {expected}, got dtype {targets.dtype}")
    if targets.ndim != 4 or tuple(targets.shape[1:]) != (size, size, channels):
        raise SampleError(f"{source}: targets must be {expected}, got shape {list(targets.shape)}")
    if len(targets) == 0:
        raise SampleError(f"{source}: no target images (expected {expected} with N >= 1)")
    return targets


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def with_backend(cfg: ExperimentConfig, backend: str | None) -> ExperimentConfig:
    """``cfg`` with its paint renderer set to ``backend`` (unchanged when None).

    Raises:
        SampleError: a backend for a MuJoCo experiment, or an unknown one.
    """
    if backend is None:
        return cfg
    if cfg.env.kind != "paint":
        raise SampleError(f"backend {backend!r} is a paint renderer; {cfg.env.kind} experiments render with MuJoCo")
    if backend not in ("libmypaint", "fast"):
        raise SampleError(f"unknown paint backend {backend!r} (libmypaint, fast)")
    paint = dataclasses.replace(cfg.env.paint, backend=backend)
    return dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, paint=paint))


def sample_policy(cfg: ExperimentConfig, policy: SpiralPolicy, num: int, seed: int = 0,
                  targets: np.ndarray | None = None, greedy: bool = False, backend: str | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, keep_steps: bool = False) -> SampleResult:
    """Paint ``num`` episodes with ``policy`` using the actor's episode loop.

    Args:
        cfg: The experiment the policy was trained for.
        policy: The acting policy (CPU); it is put in eval mode.
        num: Episodes to paint (>= 1).
        seed: Seed of environments, noise and action sampling; the same seed paints the same
            episodes.
        targets: Conditional runs: the pool of target images (uint8 ``[M, H, W, C]``), cycled
            so that episode ``i`` paints ``targets[i % M]``; default the experiment's held-out
            images. Unconditional runs take None.
        greedy: Each head takes its most likely value instead of a sample.
        backend: Paint renderer override (``libmypaint`` or ``fast``); default the experiment's.
        chunk_size: Episodes run side by side in one batched environment.
        keep_steps: Keep every intermediate canvas (:attr:`SampleResult.canvas_steps`, for
            :func:`write_animations`), not only the final ones.

    Raises:
        SampleError: ``num`` < 1, targets for an unconditional run, malformed targets, or a
            backend that does not apply.
    """
    if num < 1:
        raise SampleError(f"--num must be >= 1, got {num}")
    if chunk_size < 1:
        raise SampleError(f"chunk_size must be >= 1, got {chunk_size}")
    cfg = with_backend(cfg, backend)
    episode_targets = None
    if cfg.env.conditional:
        if targets is None:
            from spiral.data import for_experiment

            targets = check_targets(for_experiment(cfg).holdout, cfg, source=f"dataset {cfg.dataset.name!r} holdout")
        else:
            targets = check_targets(np.asarray(targets), cfg)
        episode_targets = targets[np.arange(num) % len(targets)]
    elif targets is not None:
        raise SampleError("targets given for an unconditional experiment (env.conditional: false)")

    canvases, actions, steps = [], [], []
    for index, start in enumerate(range(0, num, chunk_size)):
        stop = min(start + chunk_size, num)
        chunk_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        env = make_env(cfg, stop - start, seed=chunk_seed)
        try:
            runner = EpisodeRunner(cfg, env, policy, None, seed=chunk_seed, greedy=greedy)
            unroll = runner.run_episode(None if episode_targets is None else episode_targets[start:stop])
        finally:
            env.close()
        canvases.append(unroll.final_canvases)
        if keep_steps:
            steps.append(unroll.canvases)
        actions.append(np.swapaxes(unroll.actions, 0, 1))  # [T, n, K] -> [n, T, K]
    final = np.concatenate(canvases).astype(np.uint8, copy=False)
    l2 = None if episode_targets is None else reconstruction_l2(final, episode_targets)
    return SampleResult(cfg=cfg, canvases=final, actions=np.concatenate(actions).astype(np.int64),
                        targets=episode_targets, l2=l2,
                        canvas_steps=np.concatenate(steps, axis=1).astype(np.uint8, copy=False) if keep_steps else None)


def write_samples(result: SampleResult, out_dir: str | Path, grid_episodes: int = GRID_EPISODES) -> SampleOutputs:
    """Write ``canvases.npz``, ``grid.png`` and ``programs/episode-NNNNN.json`` into ``out_dir``.

    ``canvases.npz`` holds ``canvases`` (uint8 ``[N, H, W, C]``) and, for conditional runs,
    ``targets`` (the same shape, episode by episode). The grid shows the first
    ``grid_episodes`` episodes (target left of render in conditional runs).
    """
    out = Path(out_dir)
    programs = out / "programs"
    programs.mkdir(parents=True, exist_ok=True)
    arrays = {"canvases": result.canvases}
    if result.targets is not None:
        arrays["targets"] = result.targets
    canvases_path = out / "canvases.npz"
    np.savez_compressed(canvases_path, **arrays)
    shown = slice(0, grid_episodes)
    targets = None if result.targets is None else result.targets[shown]
    grid = pair_grid(result.canvases[shown], targets, columns=grid_columns(result))
    grid_path = save_png(grid, out / "grid.png")
    for index in range(len(result)):
        save_program(result.program(index), programs / f"episode-{index:05d}.json")
    return SampleOutputs(canvases=canvases_path, grid=grid_path, programs=programs)


def grid_columns(result: SampleResult) -> int:
    """Cells per row of the sample grids: 4 target-canvas pairs, or 8 canvases."""
    return 4 if result.targets is not None else 8


def write_animations(result: SampleResult, out_dir: str | Path, grid_episodes: int = GRID_EPISODES,
                     scale: int = 2) -> AnimationOutputs:
    """Write the stroke animations of a ``keep_steps`` result into ``out_dir``.

    ``animation.gif`` is the grid of the first ``grid_episodes`` episodes, frame ``i`` every
    episode's canvas after ``i`` actions (target left of it in conditional runs), laid out as
    ``grid.png``; ``animations/episode-NNNNN.gif`` is one episode alone (beside its target).
    Frames are upscaled by ``scale``.

    Raises:
        ValueError: the result kept no intermediate canvases.
    """
    steps = result.canvas_steps
    if steps is None:
        raise ValueError("the samples kept no intermediate canvases: sample with keep_steps=True")
    out = Path(out_dir)
    episodes = out / "animations"
    episodes.mkdir(parents=True, exist_ok=True)
    shown = slice(0, grid_episodes)
    targets = None if result.targets is None else result.targets[shown]
    grid_path = out / "animation.gif"
    atomic_write_bytes(grid_path, encode_gif(step_frames(steps[:, shown], targets, grid_columns(result)), scale))
    for index in range(len(result)):
        target = None if result.targets is None else result.targets[index:index + 1]
        frames = step_frames(steps[:, index:index + 1], target, columns=1)
        atomic_write_bytes(episodes / f"episode-{index:05d}.gif", encode_gif(frames, scale))
    return AnimationOutputs(grid=grid_path, episodes=episodes)
