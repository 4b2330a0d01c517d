"""``spiral up``'s defaults when a flag is left out: how many actors a member gets."""

from __future__ import annotations

import argparse

from spiral.commands.up import default_actors, register


def test_half_the_cores_go_to_actors_and_never_none() -> None:
    # 2 cores: one actor, the other core for the learner and the critic (bench/RESULTS.md).
    assert [default_actors(n) for n in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 8]


def test_this_machines_default_is_used_only_when_actors_is_not_given() -> None:
    parser = argparse.ArgumentParser()
    register(parser)
    assert parser.parse_args([]).actors is None
    assert parser.parse_args(["--actors", "3"]).actors == 3
    assert default_actors() >= 1
