"""Automatic merging: the policy on made-up traffic, and an engine that re-merges as traffic shifts."""

from __future__ import annotations

from server.merging import AutoMerge


def run(policy: AutoMerge, trace: list[tuple[float, list[int]]]) -> list[tuple[float, int]]:
    """(time, new merged rank) for every switch the policy makes over ``trace``."""
    return [(t, k) for t, ranks in trace if (k := policy.observe(ranks, t)) is not None]


def steps(t0: float, t1: float, ranks: list[int], dt: float = 0.1) -> list[tuple[float, list[int]]]:
    n = round((t1 - t0) / dt)
    return [(t0 + i * dt, ranks) for i in range(n)]


def test_merges_the_rank_that_takes_over_the_traffic_after_the_dwell():
    policy = AutoMerge(merged=64, dwell_s=2.0, half_life_s=1.0)
    switches = run(policy, steps(0, 5, [64] * 8) + steps(5, 15, [8] * 8))
    assert len(switches) == 1 and switches[0][1] == 8
    assert 5 + 2.0 <= switches[0][0] < 5 + 4.0  # leads after ~1 half-life, then waits the dwell
    assert policy.merged == 8


def test_a_short_burst_of_another_rank_does_not_switch():
    policy = AutoMerge(merged=16, dwell_s=2.0, half_life_s=2.0)
    trace = steps(0, 10, [16] * 4) + steps(10, 11, [1] * 8) + steps(11, 20, [16] * 4)
    assert run(policy, trace) == []


def test_the_majority_of_a_mixed_batch_wins_and_ties_keep_what_is_merged():
    policy = AutoMerge(merged=0, dwell_s=0.5, half_life_s=1.0)
    assert run(policy, steps(0, 5, [4, 4, 4, 32])) [-1][1] == 4
    tie = AutoMerge(merged=4, dwell_s=0.5, half_life_s=1.0)
    assert run(tie, steps(0, 5, [4, 4, 32, 32])) == []


def test_flipping_leaders_switch_at_most_once_per_dwell():
    fast = AutoMerge(merged=1, dwell_s=3.0, half_life_s=0.2)
    flips = [s for i in range(20) for s in steps(i * 1.5, (i + 1) * 1.5, [[1], [8]][i % 2] * 4)]
    assert run(fast, flips) == []  # no leader holds for the dwell: never re-merged
    slow = AutoMerge(merged=1, dwell_s=3.0, half_life_s=0.2)
    flips = [s for i in range(10) for s in steps(i * 4.0, (i + 1) * 4.0, [[1], [8]][i % 2] * 4)]
    switches = run(slow, flips)
    times = [t for t, _ in switches]
    assert [k for _, k in switches] == [(8, 1)[i % 2] for i in range(len(switches))] and len(switches) >= 4
    assert all(b - a >= 3.0 for a, b in zip(times, times[1:]))
