"""``spiral up``'s status line: counters are system totals, per-member gauges are not summed.

Pure logic on hand-made snapshots (what :func:`spiral.commands.status.take_snapshot` scrapes): with a
population of K members the reward and the reconstruction L2 are each member's own gauges, so
the line shows their mean over members and the best member, never K times one member's value.
"""

from __future__ import annotations

from spiral.commands.status import StatusSnapshot, format_status


def snapshot(time: float, members: dict[int, dict[str, float]], steps: float) -> StatusSnapshot:
    totals: dict[str, float] = {"spiral_actor_env_steps_total": steps}
    maxima: dict[str, float] = {}
    for gauges in members.values():
        for name, value in gauges.items():
            totals[name] = totals.get(name, 0.0) + value
            maxima[name] = max(maxima.get(name, value), value)
    return StatusSnapshot(time, totals, maxima, members)


def test_one_member_shows_its_own_gauges() -> None:
    gauges = {"spiral_learner_episode_reward": 0.25, "spiral_learner_reconstruction_l2": 0.04,
              "spiral_learner_parameter_version": 7.0}
    line = format_status(snapshot(0.0, {0: gauges}, 0.0), snapshot(2.0, {0: gauges}, 1000.0), 2.0)
    assert "env     500 steps/s" in line and "(v7)" in line
    assert "reward +0.250" in line and "l2 0.0400" in line and "mean of" not in line


def test_a_population_shows_the_mean_and_best_member_not_the_sum() -> None:
    members = {m: {"spiral_learner_episode_reward": r, "spiral_learner_reconstruction_l2": l2,
                   "spiral_learner_parameter_version": float(v)}
               for m, (r, l2, v) in enumerate([(0.1, 0.05, 3), (0.3, 0.03, 9), (0.2, 0.04, 5), (0.2, 0.04, 4)])}
    line = format_status(snapshot(0.0, members, 0.0), snapshot(1.0, members, 400.0), 1.0)
    assert "reward +0.200 (mean of 4, best +0.300)" in line
    assert "l2 0.0400 (mean of 4, best 0.0300)" in line  # lower L2 is better
    assert "(v9)" in line and "env     400 steps/s" in line


def test_members_whose_learner_is_down_are_left_out() -> None:
    members = {0: {"spiral_learner_episode_reward": 0.5}, 2: {"spiral_learner_episode_reward": 0.1}}
    line = format_status(snapshot(0.0, members, 0.0), snapshot(1.0, members, 0.0), 1.0)
    assert "reward +0.300 (mean of 2, best +0.500)" in line
    assert "reward" not in format_status(snapshot(0.0, {}, 0.0), snapshot(1.0, {}, 0.0), 1.0)
