"""The capacity model's arithmetic (bench/capacity_model.py); its measured check is bench/capacity.py."""

from __future__ import annotations

import pytest

from bench.capacity_model import Costs, Quotas, SharedCores, _fair_shares, predict, saturating_actors

COSTS = Costs(config="test", actor_cpu_per_frame=1 / 500, learner_cpu_per_frame=1 / 1000, replay_cpu_per_frame=0.0,
              discriminator_cpu_per_frame=1 / 1000, frames_per_update=160, frames_per_unroll=80, episode_length=10,
              unroll_bytes=360_000, renders_bytes=65_000, parameter_bytes=590_000, parameter_refresh_seconds=1.0,
              queue_episodes=32)
QUOTAS = Quotas(actor=0.2, learner=0.8, discriminator=0.3, replay=0.1)


def test_quota_pods_add_frames_until_the_learner_is_full() -> None:
    # An actor pod makes 0.2 * 500 = 100 frames/s; the learner takes at most 0.8 * 1000 = 800.
    assert [predict(COSTS, n, QUOTAS).frames_per_second for n in (1, 2, 4, 8)] == pytest.approx([100, 200, 400, 800])
    ten = predict(COSTS, 10, QUOTAS)
    assert ten.frames_per_second == pytest.approx(800) and ten.bottleneck == "learner"
    assert predict(COSTS, 4, QUOTAS).bottleneck == "actors"
    assert saturating_actors(COSTS, QUOTAS) == 8  # 8 pods make exactly the learner's 800: it bounds from there


def test_a_replay_buffer_without_enough_cpu_bounds_the_system() -> None:
    costly = Costs(**{**COSTS.as_dict(), "replay_cpu_per_frame": 1 / 1000})  # 0.1 core: 100 frames/s at most
    assert predict(costly, 4, QUOTAS).frames_per_second == pytest.approx(100)
    assert predict(costly, 4, QUOTAS).bottleneck == "replay"


def test_fair_shares_give_what_is_asked_below_the_level_and_split_the_rest() -> None:
    assert _fair_shares({"a": 0.2, "b": 1.0, "c": 1.0}, 2.0) == pytest.approx({"a": 0.2, "b": 0.9, "c": 0.9})
    assert _fair_shares({"a": 0.5, "b": 0.5}, 2.0) == pytest.approx({"a": 0.5, "b": 0.5})
    assert _fair_shares({"a": 3.0}, 2.0) == pytest.approx({"a": 1.0})  # one thread: one core at most


def test_shared_cores_one_actor_is_bound_by_its_one_thread_or_the_cores() -> None:
    # One actor, the learner and the discriminator on 2 cores. At F frames/s the actor needs F/500 cores
    # and the learner and discriminator F/1000 each: all fit until the actor's thread is full (F = 500,
    # 1 + 0.5 + 0.5 = 2 cores).
    one = predict(COSTS, 1, SharedCores(2.0))
    assert one.frames_per_second == pytest.approx(500, rel=1e-6)
    assert one.bottleneck == "actors"
    # On 1.5 cores they no longer fit: F/500 + 2F/1000 = 1.5 gives F = 375.
    assert predict(COSTS, 1, SharedCores(1.5)).frames_per_second == pytest.approx(375, rel=1e-6)
    # More actors share the cores left: frames/s rises, but less than in proportion.
    four = predict(COSTS, 4, SharedCores(2.0))
    assert one.frames_per_second < four.frames_per_second < 4 * one.frames_per_second


def test_lag_and_bytes_follow_the_rates() -> None:
    two = predict(COSTS, 2, QUOTAS)  # 200 frames/s: 1.25 updates/s; each actor 100 frames/s, an unroll every 0.8 s
    assert two.learner_updates_per_second == pytest.approx(1.25)
    assert two.policy_lag_versions == pytest.approx(1.25 * (0.5 + 0.8))
    assert two.bytes_per_second_per_actor == pytest.approx(100 / 80 * (360_000 + 65_000) + 590_000)
    assert two.bytes_per_second_total == pytest.approx(2 * two.bytes_per_second_per_actor)
    full = predict(COSTS, 16, QUOTAS)  # learner-bound: a full queue of 32 episodes at 80 episodes/s waits 0.4 s
    assert full.policy_lag_versions == pytest.approx(5.0 * (0.5 + 80 / 50 + 32 / 80))


def test_no_actors_is_an_error() -> None:
    with pytest.raises(ValueError, match="actors must be >= 1"):
        predict(COSTS, 0, QUOTAS)
