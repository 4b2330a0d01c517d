"""Per-placement diagnostics of scene reconstruction, on hand-made programs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spiral.envs.spec import FLAG_PLACE, FLAG_SKIP, scene_action_spec
from spiral.evaluation.placements import placement_report

SPEC = scene_action_spec(grid_size=4, num_sizes=3, color_bins=4)


def place(location: int, shape: int = 0, size: int = 0, rgb: tuple[int, int, int] = (0, 0, 0)) -> list[int]:
    return [FLAG_PLACE, location, shape, size, *rgb]


SKIP = [FLAG_SKIP, 0, 0, 0, 0, 0, 0]


def test_placements_are_scored_against_the_targets_objects_on_their_cells() -> None:
    # Target 0: objects on cells 3 and 5. Target 1: one object on cell 9.
    targets = np.array([[place(3, 1, 2, (1, 2, 3)), place(5, 0, 0, (0, 0, 0)), SKIP],
                        [place(9, 2, 1, (3, 3, 3)), SKIP, SKIP]])
    # Episode 0: the exact object on cell 3, a wrong-coloured one on cell 5, one on an empty cell.
    # Episode 1: nothing placed but one object of the right shape and size on the wrong cell.
    actions = np.array([[place(3, 1, 2, (1, 2, 3)), place(5, 0, 0, (1, 0, 0)), place(0)],
                        [SKIP, place(8, 2, 1, (3, 3, 3)), SKIP]])
    report = placement_report(SPEC, actions, targets)
    assert report.episodes == 2
    assert report.placements_per_episode == 2.0
    assert report.on_target_cell == pytest.approx(2 / 4)
    assert report.chance == pytest.approx((2 / 16 + 1 / 16) / 2)
    assert report.right_shape == 1.0 and report.right_size == 1.0
    assert report.right_color == pytest.approx(1 / 2) and report.right_object == pytest.approx(1 / 2)
    assert report.recall == pytest.approx(1 / 3)


def test_a_target_object_hidden_under_another_counts_for_its_cell() -> None:
    targets = np.array([[place(6, 0, 0), place(6, 3, 2, (2, 2, 2)), SKIP]])
    actions = np.array([[place(6, 3, 2, (2, 2, 2)), SKIP, SKIP]])
    report = placement_report(SPEC, actions, targets)
    assert report.on_target_cell == 1.0 and report.right_object == 1.0
    assert report.recall == pytest.approx(1 / 2)
    assert report.chance == pytest.approx(1 / 16)


def test_episodes_that_place_nothing_leave_the_shares_undefined() -> None:
    targets = np.array([[place(1), SKIP]])
    report = placement_report(SPEC, np.array([[SKIP, SKIP]]), targets)
    assert report.placements_per_episode == 0.0 and report.recall == 0.0
    assert math.isnan(report.on_target_cell) and math.isnan(report.right_object)


def test_arrays_that_do_not_fit_the_spec_are_refused() -> None:
    with pytest.raises(ValueError, match="share N"):
        placement_report(SPEC, np.zeros((2, 3, 7), np.int64), np.zeros((1, 3, 7), np.int64))
    with pytest.raises(ValueError, match="7 heads"):
        placement_report(SPEC, np.zeros((1, 3, 5), np.int64), np.zeros((1, 3, 5), np.int64))
