"""Per-placement diagnostics of scene reconstruction: where the agent's objects land, and what they are.

A scene agent's held-out error says how far its render is from the target; it does not say
why. Each held-out target of ``mujoco-scenes`` was rendered by a known program (kept beside
its image in the dataset cache, :attr:`spiral.data.ImageDataset.holdout_programs`), so every
object the agent places can be compared with the target's objects:

* **on a target cell**: the share of the agent's placements on a grid cell that some target
  object occupies. A policy that cannot find the objects stays at chance (:attr:`chance`,
  the share of cells a target occupies).
* among the placements on a target cell, the share whose **shape**, **size**, **colour** (all
  three channel bins), and all of them together (**the right object**) match one of the target
  objects on that cell.
* **recall**: the share of the targets' objects that some placement reproduces exactly (cell,
  shape, size and colour).

These figures are for diagnosis only: the programs are never an input to the agent nor a part
of its reward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from spiral.envs.spec import FLAG_PLACE, ActionSpec

COLOR_HEADS = ("red", "green", "blue")


@dataclass(frozen=True)
class PlacementReport:
    """What a batch of scene episodes placed, against their targets' objects (see the module docstring).

    Attributes:
        episodes: Episodes compared.
        placements_per_episode: Mean number of objects an episode placed.
        on_target_cell: Share of placements on a cell that a target object occupies (NaN
            without placements).
        chance: The share of the grid's cells that the targets' objects occupy, averaged over
            episodes: what ``on_target_cell`` is for placements on uniformly random cells.
        right_shape, right_size, right_color, right_object: Among the placements on a target
            cell, the share matching one of that cell's target objects in shape, size, colour
            (all channels), and in all three (NaN when no placement is on a target cell).
        recall: Share of the targets' objects that some placement reproduces exactly.
    """

    episodes: int
    placements_per_episode: float
    on_target_cell: float
    chance: float
    right_shape: float
    right_size: float
    right_color: float
    right_object: float
    recall: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _share(hits: np.ndarray, among: np.ndarray) -> float:
    count = int(among.sum())
    return float((hits & among).sum() / count) if count else float("nan")


def placement_report(spec: ActionSpec, actions: np.ndarray, target_programs: np.ndarray) -> PlacementReport:
    """Compare the objects each episode placed with its target's objects.

    Args:
        spec: The scene action space (heads ``flag``, ``location``, ``shape``, ``size``, ``red``,
            ``green``, ``blue``).
        actions: ``[N, T, K]`` int: the actions of N episodes.
        target_programs: ``[N, S, K]`` int: the program that rendered each episode's target.

    Raises:
        ValueError: when the arrays do not fit ``spec`` or each other.
    """
    actions = np.asarray(actions, dtype=np.int64)
    targets = np.asarray(target_programs, dtype=np.int64)
    if actions.ndim != 3 or targets.ndim != 3 or len(actions) != len(targets):
        raise ValueError(f"actions [N, T, K] and target_programs [N, S, K] must share N, got "
                         f"{list(actions.shape)} and {list(targets.shape)}")
    if actions.shape[2] != spec.num_heads or targets.shape[2] != spec.num_heads:
        raise ValueError(f"both need the spec's {spec.num_heads} heads {list(spec.names)}")
    flag, location = spec.index("flag"), spec.index("location")
    shape, size = spec.index("shape"), spec.index("size")
    colors = [spec.index(c) for c in COLOR_HEADS]

    placed = actions[:, :, flag] == FLAG_PLACE  # [N, T]
    real = targets[:, :, flag] == FLAG_PLACE  # [N, S]
    a, t = actions[:, :, None, :], targets[:, None, :, :]  # [N, T, 1, K], [N, 1, S, K]
    same_cell = (a[..., location] == t[..., location]) & real[:, None, :]  # [N, T, S]
    same_shape = same_cell & (a[..., shape] == t[..., shape])
    same_size = same_cell & (a[..., size] == t[..., size])
    same_color = same_cell & np.all([a[..., c] == t[..., c] for c in colors], axis=0)
    same_object = same_shape & same_size & same_color

    on_cell = placed & same_cell.any(-1)
    cells = spec.heads[location].num_values
    occupied = [len(set(targets[n, real[n], location].tolist())) for n in range(len(targets))]
    reproduced = (same_object & placed[:, :, None]).any(1) & real  # [N, S]
    return PlacementReport(
        episodes=len(actions),
        placements_per_episode=float(placed.sum(1).mean()) if len(actions) else float("nan"),
        on_target_cell=_share(on_cell, placed),
        chance=float(np.mean(occupied) / cells) if len(actions) else float("nan"),
        right_shape=_share(same_shape.any(-1), on_cell),
        right_size=_share(same_size.any(-1), on_cell),
        right_color=_share(same_color.any(-1), on_cell),
        right_object=_share(same_object.any(-1), on_cell),
        recall=_share(reproduced, real),
    )
