"""The learner's ingest queue: batching, splitting, backpressure, timeouts (pure logic)."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from learner.ingest import IngestQueue, PriorPool, QueueFull
from spiral.agent.trajectory import Unroll


def make_unroll(batch: int, tag: int, steps: int = 3, heads: int = 2) -> Unroll:
    return Unroll(
        canvases=np.full((steps + 1, batch, 4, 4, 1), tag, np.uint8),
        actions=np.full((steps, batch, heads), tag, np.int64),
        masks=np.ones((steps, batch, heads), np.float32),
        behaviour_log_probs=np.zeros((steps, batch), np.float32),
        noise=np.zeros((batch, 2), np.float32),
        targets=None, policy_version=tag, actor_id=f"a{tag}")


def test_batches_join_and_split_in_order() -> None:
    q = IngestQueue(100)
    q.put(make_unroll(3, 1), timeout=1)
    q.put(make_unroll(3, 2), timeout=1)
    batch = q.take_batch(4, timeout=1)
    assert batch is not None and batch.batch_size == 4
    assert batch.actions[0, :, 0].tolist() == [1, 1, 1, 2]
    assert batch.policy_version == 1
    assert q.depth == 2
    rest = q.take_batch(2, timeout=1)
    assert rest is not None and rest.actions[0, :, 0].tolist() == [2, 2]


def test_take_batch_times_out_when_short() -> None:
    q = IngestQueue(10)
    q.put(make_unroll(1, 1), timeout=1)
    assert q.take_batch(2, timeout=0.05) is None
    assert q.depth == 1


def test_full_queue_pushes_back_then_admits_after_a_take() -> None:
    q = IngestQueue(4)
    q.put(make_unroll(4, 1), timeout=1)
    with pytest.raises(QueueFull):
        q.put(make_unroll(2, 2), timeout=0.05)
    done = threading.Event()

    def producer() -> None:
        q.put(make_unroll(2, 3), timeout=5)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    deadline = time.monotonic() + 5
    while q.waiting_submitters == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # until the producer is provably inside put's wait for room
    assert q.waiting_submitters == 1 and not done.is_set()
    assert q.take_batch(4, timeout=1) is not None
    thread.join(timeout=5)
    assert done.is_set() and q.depth == 2 and q.waiting_submitters == 0


def test_oversized_unroll_is_admitted_into_an_empty_queue() -> None:
    q = IngestQueue(2)
    q.put(make_unroll(5, 1), timeout=0.05)
    assert q.depth == 5


def prior(batch: int, tag: int) -> Unroll:
    return dataclasses.replace(make_unroll(batch, tag), prior=True)


def test_the_prior_pool_keeps_the_newest_episodes_up_to_its_capacity() -> None:
    pool = PriorPool(5)
    assert pool.newest() is None
    pool.add(prior(2, 1))
    pool.add(prior(2, 2))
    assert pool.episodes == 4
    pool.add(prior(3, 3))  # the newest five: both of tag 2, all three of tag 3
    newest = pool.newest()
    assert pool.episodes == 5 and newest.prior
    np.testing.assert_array_equal(newest.actions[0, :, 0], [2, 2, 3, 3, 3])
    pool.add(prior(7, 4))  # larger than the pool: its newest five
    assert pool.episodes == 5 and (pool.newest().actions == 4).all()
    with pytest.raises(ValueError, match="prior programs only"):
        pool.add(make_unroll(1, 5))
    empty = PriorPool(0)
    empty.add(prior(2, 1))
    assert empty.newest() is None and empty.episodes == 0


def test_the_queue_does_not_join_prior_episodes_with_the_policy_s() -> None:
    with pytest.raises(ValueError, match="cannot join"):
        Unroll.concatenate([make_unroll(1, 1), prior(1, 2)])
