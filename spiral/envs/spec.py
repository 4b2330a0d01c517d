"""Action spaces as data: named discrete heads, their order, and which heads matter.

A SPIRAL action is a tuple of discrete choices, one per *head* (``flag``, ``end``, ``control``,
``size``, ...). The policy samples the heads autoregressively in :attr:`ActionSpec.heads` order,
and the first head is always ``flag``: its value decides which of the other heads take effect
(a *move* ignores ink and pressure; a *no-op* scene step ignores everything). That choice is
an *action mask*: 1.0 for a head that matters, 0.0 for one that does not. Log-probabilities and
entropies are summed over the heads that the mask keeps, and the previous action's embedding is
multiplied by its mask, exactly as in DeepMind's released agent.

Spatial heads (locations) are flat indices ``row * grid_size + col`` on a square grid; the
policy decodes them from a 4x4 feature map with a transposed-conv decoder.

Every environment (libmypaint, the fast rasterizer, MuJoCo) describes itself with one
:class:`ActionSpec`; networks, losses, wire validation and programs are written against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ActionHead:
    """One discrete component of an action.

    Attributes:
        name: Head name, e.g. ``"end"``.
        num_values: Number of discrete values (for spatial heads, ``grid_size ** 2``).
        spatial: Whether the value is a flat location on a ``grid_size`` x ``grid_size`` grid.
        grid_size: Side of that grid (0 for non-spatial heads).
    """

    name: str
    num_values: int
    spatial: bool = False
    grid_size: int = 0


@dataclass(frozen=True)
class ActionSpec:
    """The heads of an action space and the mask each ``flag`` value implies.

    Attributes:
        heads: Heads in autoregressive sampling order; ``heads[0]`` is ``flag``.
        flag_masks: ``flag_masks[f][k]`` is 1.0 when head ``k`` matters for ``flag == f``.
    """

    heads: tuple[ActionHead, ...]
    flag_masks: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not self.heads or self.heads[0].name != "flag":
            raise ValueError("the first head of an ActionSpec must be 'flag'")
        if len(self.flag_masks) != self.heads[0].num_values:
            raise ValueError("one mask per flag value is required")
        for mask in self.flag_masks:
            if len(mask) != len(self.heads) or mask[0] != 1.0:
                raise ValueError("each mask covers every head and always keeps 'flag'")
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate head names: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(h.num_values for h in self.heads)

    def index(self, name: str) -> int:
        """Position of head ``name`` in :attr:`heads`; KeyError names the known heads."""
        for i, head in enumerate(self.heads):
            if head.name == name:
                return i
        raise KeyError(f"unknown action head {name!r}; heads are {list(self.names)}")

    def mask_table(self) -> np.ndarray:
        """``[num_flag_values, num_heads]`` float32 table of masks, indexable by flag."""
        return np.asarray(self.flag_masks, dtype=np.float32)

    def masks_for(self, flags: np.ndarray) -> np.ndarray:
        """Masks for a batch of flag values: ``[..., num_heads]`` float32."""
        return self.mask_table()[np.asarray(flags, dtype=np.int64)]

    def validate_actions(self, actions: np.ndarray) -> None:
        """Raise ValueError unless ``actions`` is ``[..., num_heads]`` ints within each head's range."""
        actions = np.asarray(actions)
        if actions.ndim < 1 or actions.shape[-1] != self.num_heads:
            raise ValueError(f"actions must have a last axis of {self.num_heads} heads {list(self.names)}, "
                             f"got shape {actions.shape}")
        if not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions must be integers, got {actions.dtype}")
        if actions.size == 0:
            return
        # One pass for every head (a step validates each batch); the message names the first bad one.
        flat = actions.reshape(-1, self.num_heads)
        lows, highs = flat.min(axis=0), flat.max(axis=0)
        if (lows >= 0).all() and (highs < np.asarray(self.sizes)).all():
            return
        for k, head in enumerate(self.heads):
            if lows[k] < 0 or highs[k] >= head.num_values:
                raise ValueError(f"head {head.name!r} takes values in [0, {head.num_values}), "
                                 f"got [{lows[k]}, {highs[k]}]")

    def to_dicts(self, actions: np.ndarray) -> list[dict[str, int]]:
        """``[N, num_heads]`` array to a list of ``{head: value}`` dicts (for programs)."""
        return [{h.name: int(v) for h, v in zip(self.heads, row)} for row in np.asarray(actions).reshape(-1, self.num_heads)]

    def from_dicts(self, steps: list[dict[str, int]]) -> np.ndarray:
        """Inverse of :meth:`to_dicts`; heads missing from a step default to 0, unknown heads raise."""
        out = np.zeros((len(steps), self.num_heads), dtype=np.int64)
        for i, step in enumerate(steps):
            for name, value in step.items():
                out[i, self.index(name)] = int(value)
        self.validate_actions(out)
        return out


# ---------------------------------------------------------------------------------------------
# The painting action space (DeepMind's libmypaint environment)
# ---------------------------------------------------------------------------------------------

PRESSURE_VALUES = np.linspace(0.1, 1.0, 10)
"""Brush pressures the ``pressure`` head indexes."""
COLOR_VALUES = np.linspace(0.0, 1.0, 20)
"""Channel intensities the ``red``/``green``/``blue`` heads index."""
PAINT_HEAD_ORDER = ("flag", "end", "control", "size", "pressure", "gray", "red", "green", "blue")
"""Autoregressive order of DeepMind's agent; ``gray`` (ours, never with the colour heads) takes
the colour heads' place."""
FLAG_MOVE = 0
FLAG_PAINT = 1


def gray_values(levels: int) -> np.ndarray:
    """Ink intensities the ``gray`` head indexes: ``levels`` values from 0 (black) to 1 (white)."""
    return np.linspace(0.0, 1.0, levels)


def paint_action_spec(grid_size: int, num_sizes: int, use_pressure: bool, use_color: bool,
                      gray_levels: int = 0) -> ActionSpec:
    """The painting action space; heads that cannot vary are dropped.

    A move (flag 0) uses only ``flag`` and ``end``; a paint step (flag 1) uses every head.
    With ``gray_levels`` > 0 a ``gray`` head picks each stroke's ink among
    :func:`gray_values` on the one-channel canvas (``use_color`` must then be False).
    """
    if use_color and gray_levels:
        raise ValueError("a paint action space has colour heads or a gray head, not both")
    heads: list[ActionHead] = []
    for name in PAINT_HEAD_ORDER:
        if name == "flag":
            heads.append(ActionHead("flag", 2))
        elif name in ("end", "control"):
            heads.append(ActionHead(name, grid_size * grid_size, spatial=True, grid_size=grid_size))
        elif name == "size" and num_sizes > 1:
            heads.append(ActionHead("size", num_sizes))
        elif name == "pressure" and use_pressure:
            heads.append(ActionHead("pressure", len(PRESSURE_VALUES)))
        elif name == "gray" and gray_levels > 0:
            heads.append(ActionHead("gray", gray_levels))
        elif name in ("red", "green", "blue") and use_color:
            heads.append(ActionHead(name, len(COLOR_VALUES)))
    move = tuple(1.0 if h.name in ("flag", "end") else 0.0 for h in heads)
    paint = tuple(1.0 for _ in heads)
    return ActionSpec(heads=tuple(heads), flag_masks=(move, paint))


# ---------------------------------------------------------------------------------------------
# The MuJoCo scene action space
# ---------------------------------------------------------------------------------------------

SCENE_SHAPES = ("box", "sphere", "cylinder", "capsule")
"""Primitive kinds the ``shape`` head indexes."""
FLAG_SKIP = 0
FLAG_PLACE = 1


def scene_action_spec(grid_size: int, num_sizes: int, color_bins: int) -> ActionSpec:
    """The scene action space: flag (0 = place nothing, 1 = place), location, shape, size, colour."""
    heads = (
        ActionHead("flag", 2),
        ActionHead("location", grid_size * grid_size, spatial=True, grid_size=grid_size),
        ActionHead("shape", len(SCENE_SHAPES)),
        ActionHead("size", num_sizes),
        ActionHead("red", color_bins),
        ActionHead("green", color_bins),
        ActionHead("blue", color_bins),
    )
    skip = tuple(1.0 if h.name == "flag" else 0.0 for h in heads)
    place = tuple(1.0 for _ in heads)
    return ActionSpec(heads=heads, flag_masks=(skip, place))
