"""Programs as data: what an agent drew, as JSON that any backend can re-execute.

A SPIRAL agent writes a *program*: the sequence of discrete actions its environment executed.
:class:`Program` stores it as plain data, independent of the policy that wrote it and of the
renderer that ran it:

* ``env``: the environment the program is meant for, as a plain dict built from an
  experiment's ``env`` section: ``kind``, ``episode_length`` and the section of that kind
  (``paint`` or ``mujoco``), e.g. ``{"kind": "paint", "episode_length": 20, "paint": {...}}``.
* ``steps``: one ``{head: index}`` dict per action, the discrete values the environment
  takes by head name, e.g. ``{"flag": 1, "end": 812, "control": 300, "size": 1,
  "pressure": 4}``. Heads the step's flag ignores (a move's ``control``) may be left out.

The JSON form is ``{"env": {...}, "steps": [...]}``. Reading it is strict: unknown head names,
out-of-range values, missing heads and unknown environment fields raise :class:`ValueError`
naming the offending entry (``steps[3].size``, ``env.paint.brush_szes``).

Programs can be re-executed on a backend (:func:`execute`; libmypaint reproduces an episode's
canvas pixel for pixel, the fast rasterizer draws the same geometry with smooth capsules) and
drawn as SVG (:func:`to_svg`) for resolution-independent figures.

Example::

    program = program_from_actions(cfg.env, unroll.actions[:, 0], action_spec_for(cfg))
    Path("episode.json").write_text(to_json(program))
    canvas = execute(load_program("episode.json"), backend="fast")   # [H, W, C] uint8
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from xml.sax.saxutils import quoteattr

import numpy as np

from spiral.config import EnvConfig, ExperimentConfig, from_dict
from spiral.envs import action_spec_for
from spiral.envs.spec import FLAG_PLACE, SCENE_SHAPES, ActionSpec

PROGRAM_FIELDS = ("env", "steps")
"""Top-level keys of a program's JSON object."""
ENV_FIELDS = ("kind", "episode_length")
"""Keys of ``env`` besides the section named by ``kind`` (``paint`` or ``mujoco``)."""


@dataclass
class Program:
    """A sequence of actions and the environment that executes them.

    Attributes:
        env: Plain-data environment: ``kind``, ``episode_length`` and the ``paint`` or
            ``mujoco`` section (fields of :class:`spiral.config.PaintConfig` or
            :class:`spiral.config.SceneConfig`; missing fields take their defaults).
        steps: One ``{head name: discrete index}`` dict per action, in execution order.
    """

    env: dict[str, Any]
    steps: list[dict[str, int]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.env.get("kind", ""))

    def experiment_config(self) -> ExperimentConfig:
        """An experiment whose ``env`` is this program's (validated; ConfigError names fields)."""
        return _experiment_for(self.env)

    def action_spec(self) -> ActionSpec:
        """The action space of the program's environment."""
        return _spec_for(self.experiment_config().env)

    def actions(self) -> np.ndarray:
        """The steps as a ``[T, K]`` int64 array in head order (omitted heads are 0)."""
        validate(self)
        spec = self.action_spec()
        return spec.from_dicts(self.steps) if self.steps else np.zeros((0, spec.num_heads), np.int64)


# ---------------------------------------------------------------------------------------------
# Building programs
# ---------------------------------------------------------------------------------------------


def env_section(env: EnvConfig) -> dict[str, Any]:
    """The plain-data ``env`` of a program from an experiment's ``env`` config."""
    section = env.paint if env.kind == "paint" else env.mujoco
    return {"kind": env.kind, "episode_length": env.episode_length, env.kind: _plain(dataclasses.asdict(section))}


def program_from_actions(env: EnvConfig, actions: np.ndarray, spec: ActionSpec) -> Program:
    """The program of one episode.

    Args:
        env: The experiment's ``env`` config the episode ran in.
        actions: ``[T, K]`` integer actions in ``spec`` head order (T <= episode_length - 1).
        spec: The action spec the actions follow; it must be the one ``env`` describes.
    """
    expected = _spec_for(env)
    if spec.names != expected.names or spec.sizes != expected.sizes:
        raise ValueError(f"spec heads {dict(zip(spec.names, spec.sizes))} do not match the environment's "
                         f"{dict(zip(expected.names, expected.sizes))}")
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != spec.num_heads:
        raise ValueError(f"actions must be [T, {spec.num_heads}] (heads {list(spec.names)}), got {actions.shape}")
    spec.validate_actions(actions)
    program = Program(env=env_section(env), steps=spec.to_dicts(actions))
    validate(program)
    return program


# ---------------------------------------------------------------------------------------------
# Validation and JSON
# ---------------------------------------------------------------------------------------------


def validate(program: Program) -> None:
    """Raise ValueError naming the first unknown, missing or out-of-range entry of a program."""
    cfg = _experiment_for(program.env)
    spec = _spec_for(cfg.env)
    steps = program.steps
    if not isinstance(steps, list):
        raise ValueError(f"steps: expected a list of {{head: index}} objects, got {type(steps).__name__}")
    limit = cfg.env.episode_length - 1
    if len(steps) > limit:
        raise ValueError(f"steps: {len(steps)} steps do not fit an episode of episode_length "
                         f"{cfg.env.episode_length} (at most {limit} actions)")
    sizes = dict(zip(spec.names, spec.sizes))
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(step, Mapping):
            raise ValueError(f"{where}: expected a {{head: index}} object, got {type(step).__name__}")
        for name, value in step.items():
            if name not in sizes:
                raise ValueError(f"{where}: unknown head {name!r} (heads: {', '.join(spec.names)})")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{where}.{name}: expected an integer index, got {value!r}")
            if not 0 <= value < sizes[name]:
                raise ValueError(f"{where}.{name}: {value} is out of range [0, {sizes[name]})")
        if "flag" not in step:
            raise ValueError(f"{where}: missing head 'flag'")
        mask = spec.flag_masks[int(step["flag"])]
        for head, used in zip(spec.heads, mask):
            if used and head.name not in step:
                raise ValueError(f"{where}: missing head {head.name!r} (flag {step['flag']} uses it)")


def to_json(program: Program) -> str:
    """The program as JSON text (validated first): the env indented, one line per step."""
    validate(program)
    env = json.dumps(_plain(program.env), indent=2).replace("\n", "\n  ")
    steps = [json.dumps({name: int(value) for name, value in step.items()}) for step in program.steps]
    steps_text = "[\n" + ",\n".join("    " + s for s in steps) + "\n  ]" if steps else "[]"
    return f'{{\n  "env": {env},\n  "steps": {steps_text}\n}}'


def from_json(text: str) -> Program:
    """Parse and validate a program's JSON text; ValueError names what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from exc
    return from_dict_data(data)


def from_dict_data(data: Any) -> Program:
    """Build and validate a program from parsed JSON (``{"env": ..., "steps": ...}``)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a program is a JSON object with keys {list(PROGRAM_FIELDS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(PROGRAM_FIELDS))
    if unknown:
        raise ValueError(f"unknown program field(s) {unknown} (known: {list(PROGRAM_FIELDS)})")
    for key in PROGRAM_FIELDS:
        if key not in data:
            raise ValueError(f"missing program field {key!r}")
    if not isinstance(data["env"], Mapping):
        raise ValueError(f"env: expected an object, got {type(data['env']).__name__}")
    program = Program(env=dict(data["env"]), steps=data["steps"])
    validate(program)
    return program


def save_program(program: Program, path: str | os.PathLike[str]) -> None:
    """Write a program as JSON."""
    Path(path).write_text(to_json(program) + "\n")


def load_program(path: str | os.PathLike[str]) -> Program:
    """Read a program's JSON file; FileNotFoundError if absent, ValueError if malformed."""
    return from_json(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------


def execute(program: Program, backend: str | None = None, seed: int = 0) -> np.ndarray:
    """Run a program in a fresh one-environment batch and return the final canvas.

    Args:
        program: The program (validated here).
        backend: Paint renderer, ``libmypaint`` or ``fast``; default the program's
            ``env.paint.backend``. Scene programs take None (or ``mujoco``).
        seed: Seed of the environment (renderer randomness, if any).

    Returns:
        ``[H, W, C]`` uint8 canvas after the program's last step.
    """
    cfg = program.experiment_config()
    if cfg.env.kind == "mujoco":
        if backend not in (None, "mujoco"):
            raise ValueError(f"backend {backend!r} is a paint renderer; scene programs run on MuJoCo")
        backend = None
    return execute_actions(cfg, program.actions()[None], backend=backend, seed=seed)[0]


def execute_actions(cfg: ExperimentConfig, actions: np.ndarray, backend: str | None = None,
                    seed: int = 0) -> np.ndarray:
    """Run N episodes' actions side by side in one fresh batched environment of ``cfg``.

    This re-renders programs under another renderer or brush: the episodes' canvases depend
    only on their actions (see :mod:`spiral.envs.libmypaint_env`), so the same actions in a
    ``cfg`` that differs only in ``env.paint`` draw the same strokes with other ink.

    Args:
        cfg: The experiment whose environment executes the actions.
        actions: int ``[N, T, K]``: each episode's actions in ``cfg``'s action-spec head order.
        backend: Paint renderer override, as :func:`spiral.envs.make_env` takes it.
        seed: Seed of the environment (renderer randomness, if any).

    Returns:
        ``[N, H, W, C]`` uint8 canvases after each episode's last step.
    """
    from spiral.envs import make_env

    if actions.ndim != 3 or len(actions) < 1:
        raise ValueError(f"actions must be [N >= 1, T, K], got shape {actions.shape}")
    env = make_env(cfg, num_envs=len(actions), seed=seed, backend=backend)
    try:
        env.reset()
        for step in np.swapaxes(actions, 0, 1):
            env.step(step)
        return env.canvases()
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------


def to_svg(program: Program) -> str:
    """The program as an SVG document (paint: the strokes; scenes: a top-down schematic).

    Paint programs: one ``<path>`` per paint step, in execution order: the quadratic Bezier
    ``M start Q control end`` in canvas pixels (SVG is x first), stroked with width
    ``2 * radius``, the step's colour and an opacity from its pressure (radius and opacity as
    the fast backend maps them), with round caps so that continued strokes join smoothly.
    Moves draw nothing. Each path carries ``data-step``, the index of its step in the program.

    Scene programs: a top-down schematic of the floor's location grid with each placed object
    drawn at its grid cell in its colour: a box as a square, a sphere as a circle, a cylinder
    as a ringed circle, a capsule as a rounded bar; its size scales the shape.
    """
    validate(program)
    cfg = program.experiment_config()
    if cfg.env.kind == "paint":
        return _paint_svg(program, cfg)
    return _scene_svg(program, cfg)


def _paint_svg(program: Program, cfg: ExperimentConfig) -> str:
    from spiral.envs.fast_paint import stroke_opacity, stroke_radius_scale
    from spiral.envs.paint_strokes import StrokeDecoder, grid_to_canvas

    paint = cfg.env.paint
    spec = _spec_for(cfg.env)
    decoder = StrokeDecoder(spec, paint.canvas_size, paint.brush_sizes, 1)
    control_col = spec.index("control")
    size = paint.canvas_size
    body = [f'<rect x="0" y="0" width="{size}" height="{size}" fill="#ffffff"/>']
    for index, action in enumerate(program.actions()):
        strokes = decoder.decode(action[None, :])
        if not strokes.paint[0]:
            continue
        pressure = float(strokes.pressures[0, -1])
        width = 2.0 * float(strokes.radius[0]) * float(stroke_radius_scale(pressure))
        (sy, sx), (ey, ex) = strokes.points[0, 0], strokes.points[0, -1]
        cy, cx = grid_to_canvas(action[None, control_col], paint.grid_size, size)[0]
        commands = f"M {_num(sx)} {_num(sy)} Q {_num(cx)} {_num(cy)} {_num(ex)} {_num(ey)}"
        body.append(f'<path data-step="{index}" d={quoteattr(commands)} fill="none" '
                    f'stroke="{_hex_colour(strokes.rgb[0])}" stroke-width="{_num(width)}" '
                    f'stroke-opacity="{_num(float(stroke_opacity(pressure)))}" '
                    f'stroke-linecap="round" stroke-linejoin="round"/>')
    return _svg_document(size, size, body)


def _scene_svg(program: Program, cfg: ExperimentConfig) -> str:
    from spiral.envs import scene_model

    scene = cfg.env.mujoco
    size = scene.image_size
    extent = scene_model.FLOOR_HALF_EXTENT
    scale = size / (2.0 * extent)                       # SVG pixels per metre of floor
    cell = size / scene.grid_size
    body = [f'<rect x="0" y="0" width="{size}" height="{size}" fill="{_hex_colour(np.array(scene_model.FLOOR_RGB))}"/>']
    grid_lines = " ".join(f"M {_num(k * cell)} 0 V {size} M 0 {_num(k * cell)} H {size}"
                          for k in range(1, scene.grid_size))
    if grid_lines:
        body.append(f'<path d="{grid_lines}" fill="none" stroke="#7a7a7a" stroke-width="0.25"/>')
    half_extents = scene_model.size_values(scene.num_sizes)
    levels = scene_model.color_values(scene.color_bins)
    outline = 'stroke="#000000" stroke-width="0.25"'
    for step in program.steps:
        if step["flag"] != FLAG_PLACE:
            continue
        # Top-down view: world x grows to the right, world y upwards (row 0 is the far row).
        wx, wy = scene_model.cell_centers(np.array([step["location"]]), scene.grid_size)[0]
        cx, cy = (wx + extent) * scale, (extent - wy) * scale
        s = half_extents[step["size"]] * scale
        fill = _hex_colour(levels[[step["red"], step["green"], step["blue"]]])
        shape = SCENE_SHAPES[int(step["shape"])]
        if shape == "box":              # a cube of half side s
            body.append(f'<rect x="{_num(cx - s)}" y="{_num(cy - s)}" width="{_num(2 * s)}" '
                        f'height="{_num(2 * s)}" fill="{fill}" {outline}/>')
        elif shape == "sphere":         # radius s
            body.append(f'<circle cx="{_num(cx)}" cy="{_num(cy)}" r="{_num(s)}" fill="{fill}" {outline}/>')
        elif shape == "cylinder":       # radius s, upright: a ringed disc
            body.append(f'<circle cx="{_num(cx)}" cy="{_num(cy)}" r="{_num(s)}" fill="{fill}" '
                        f'stroke="#000000" stroke-width="{_num(0.3 * s)}"/>')
        else:                           # capsule: radius s/2, half-length s, lying along x
            body.append(f'<rect x="{_num(cx - 1.5 * s)}" y="{_num(cy - s / 2)}" width="{_num(3 * s)}" '
                        f'height="{_num(s)}" rx="{_num(s / 2)}" fill="{fill}" {outline}/>')
    return _svg_document(size, size, body)


def _svg_document(width: int, height: int, body: list[str]) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">')
    return "\n".join([head, *("  " + element for element in body), "</svg>"]) + "\n"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _experiment_for(env: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a program's ``env`` dict and wrap it in an experiment config."""
    if not isinstance(env, Mapping):
        raise ValueError(f"env: expected an object, got {type(env).__name__}")
    kind = env.get("kind")
    if kind not in ("paint", "mujoco"):
        raise ValueError(f"env.kind: expected 'paint' or 'mujoco', got {kind!r}")
    known = (*ENV_FIELDS, kind)
    for key in env:
        if key not in known:
            raise ValueError(f"env.{key}: unknown field for a {kind!r} program (known: {', '.join(known)})")
    # Executing a program needs no targets, so the experiment is unconditional.
    return from_dict({"env": {**env, "conditional": False}})


def _spec_for(env: EnvConfig) -> ActionSpec:
    return action_spec_for(ExperimentConfig(env=env))


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so that data compares equal after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _num(value: float) -> str:
    """A coordinate for SVG: at most 3 decimals, no trailing zeros."""
    text = f"{float(value):.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _hex_colour(rgb: np.ndarray) -> str:
    channels = np.clip(np.rint(np.asarray(rgb, np.float64) * 255), 0, 255).astype(int)
    return "#" + "".join(f"{c:02x}" for c in channels)


__all__ = ["Program", "env_section", "execute", "from_dict_data", "from_json", "load_program",
           "program_from_actions", "save_program", "to_json", "to_svg", "validate"]
