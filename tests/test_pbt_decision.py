"""PBT's pure decision rule: sampling, explore, ready criterion, truncation selection, ties."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

import pytest

from pbt_controller.decision import (CONTINUE, EXPLOIT, MemberRecord, decide, explore, rank, ready,
                                     sample_hyperparameters, truncation_size)
from spiral.config import PBTConfig

CFG = PBTConfig(population_size=5, ready_updates=100, truncation_fraction=0.2, resample_probability=0.25)
HP = {"learning_rate": 1e-4, "entropy_cost": 1e-2}


def population(fitnesses: list[float], updates: int = 200) -> dict[int, MemberRecord]:
    return {i: MemberRecord(member=i, hyperparameters={"learning_rate": 1e-5 * (i + 1), "entropy_cost": 0.01},
                            fitness=f, reported=True, updates=updates) for i, f in enumerate(fitnesses)}


def test_sampled_hyperparameters_are_log_uniform_within_ranges() -> None:
    rng = random.Random(0)
    samples = [sample_hyperparameters(CFG, rng) for _ in range(4000)]
    lrs = [s["learning_rate"] for s in samples]
    assert set(samples[0]) == {"learning_rate", "entropy_cost"}
    assert all(1e-5 <= v <= 3e-4 for v in lrs)
    assert all(2e-3 <= s["entropy_cost"] <= 1e-1 for s in samples)
    # Log-uniform: the log-midpoint splits the samples in half (a uniform draw would put ~90% above).
    midpoint = math.sqrt(1e-5 * 3e-4)
    assert 0.45 < sum(v < midpoint for v in lrs) / len(lrs) < 0.55


def test_explore_multiplies_by_a_factor_or_resamples_and_clips() -> None:
    no_resample = replace(CFG, resample_probability=0.0)
    rng = random.Random(1)
    ratios = Counter()
    for _ in range(200):
        out = explore(HP, no_resample, rng)
        for name in HP:
            ratios[round(out[name] / HP[name], 6)] += 1
    assert set(ratios) == {0.8, 1.2} and min(ratios.values()) > 100
    # Clipped to the range: the top of the range times 1.2 stays at the top.
    top = {"learning_rate": 3e-4, "entropy_cost": 1e-1}
    up = replace(CFG, resample_probability=0.0, perturb_factors=(1.2, 1.2))
    assert explore(top, up, rng) == top
    # Always resampling: values are no longer factor multiples and stay in range.
    always = replace(CFG, resample_probability=1.0)
    outs = [explore(HP, always, rng) for _ in range(50)]
    assert all(1e-5 <= o["learning_rate"] <= 3e-4 for o in outs)
    assert sum(round(o["learning_rate"] / HP["learning_rate"], 6) not in (0.8, 1.2) for o in outs) == 50
    # Roughly a quarter resampled with the default probability.
    rng = random.Random(2)
    resampled = sum(round(explore(HP, CFG, rng)["learning_rate"] / 1e-4, 6) not in (0.8, 1.2) for _ in range(2000))
    assert 0.2 < resampled / 2000 < 0.3


def test_ready_needs_a_report_and_enough_updates_since_the_last_change() -> None:
    record = MemberRecord(member=0, hyperparameters=HP, updates=150, updates_at_last_change=50)
    assert not ready(record, CFG)  # never reported
    record.reported = True
    assert ready(record, CFG)      # 100 updates since the change
    record.updates_at_last_change = 51
    assert not ready(record, CFG)


def test_truncation_size() -> None:
    assert [truncation_size(n, 0.2) for n in (0, 1, 2, 4, 5, 9, 10, 12)] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert truncation_size(2, 0.5) == 1 and truncation_size(7, 0.5) == 3


def test_bottom_member_copies_a_donor_from_the_top() -> None:
    records = population([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4, 0.0])  # n=10, k=2
    rng = random.Random(0)
    donors = Counter()
    for _ in range(200):
        d = decide(records, 9, CFG, rng)  # the worst
        assert d.action == EXPLOIT
        donors[d.donor] += 1
        assert d.donor_hyperparameters == records[d.donor].hyperparameters
        for name, value in d.hyperparameters.items():
            low, high = (1e-5, 3e-4) if name == "learning_rate" else (2e-3, 1e-1)
            assert low <= value <= high
    assert set(donors) == {1, 6} and min(donors.values()) > 60  # uniform over the top two
    assert decide(records, 0, CFG, rng).action == EXPLOIT      # second worst (k=2)
    for middle in (2, 3, 4, 5, 7, 8, 1, 6):
        assert decide(records, middle, CFG, rng).action == CONTINUE


def test_unready_members_neither_decide_nor_count() -> None:
    records = population([0.9, 0.8, 0.7, 0.6, 0.1])
    records[4].updates_at_last_change = 150  # worst, but changed 50 updates ago
    assert decide(records, 4, CFG, random.Random(0)).action == CONTINUE
    assert "not ready" in decide(records, 4, CFG, random.Random(0)).reason
    # Member 3 is now the worst ready member.
    assert decide(records, 3, CFG, random.Random(0)).action == EXPLOIT
    # An unready top member is no donor.
    records[0].updates_at_last_change = 199
    assert decide(records, 3, CFG, random.Random(0)).donor == 1
    # Fewer than two ready members: nobody exploits.
    for i in (1, 2):
        records[i].reported = False
    assert decide(records, 3, CFG, random.Random(0)).action == CONTINUE


def test_ties_are_broken_by_member_index() -> None:
    records = population([0.5, 0.5, 0.5, 0.5, 0.5])
    assert [r.member for r in rank(list(records.values()))] == [0, 1, 2, 3, 4]
    d = decide(records, 4, CFG, random.Random(0))
    assert d.action == EXPLOIT and d.donor == 0
    assert all(decide(records, m, CFG, random.Random(0)).action == CONTINUE for m in range(4))


def test_population_of_one_always_continues() -> None:
    records = population([-100.0])
    d = decide(records, 0, CFG, random.Random(0))
    assert d.action == CONTINUE and d.donor is None and d.hyperparameters == records[0].hyperparameters


def test_two_members_the_worse_copies_the_better() -> None:
    records = population([1.0, 2.0])
    assert decide(records, 0, CFG, random.Random(0)).donor == 1
    assert decide(records, 1, CFG, random.Random(0)).action == CONTINUE


def test_deterministic_under_a_seed_and_pure() -> None:
    records = population([0.3, 0.9, 0.5, 0.7, 0.1, 0.2, 0.8, 0.6, 0.4, 0.0])
    before = {m: replace(r, hyperparameters=dict(r.hyperparameters)) for m, r in records.items()}
    first = [decide(records, 9, CFG, random.Random(42)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert records == before  # decide mutates nothing
    runs = {tuple(sorted(decide(records, 9, CFG, random.Random(seed)).hyperparameters.items())) for seed in range(20)}
    assert len(runs) > 1      # different seeds explore differently
    assert sample_hyperparameters(CFG, random.Random(7)) == sample_hyperparameters(CFG, random.Random(7))


def test_unknown_reporter_raises() -> None:
    with pytest.raises(KeyError):
        decide(population([1.0, 2.0]), 5, CFG, random.Random(0))
