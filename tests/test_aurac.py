"""AURAC and log-AURAC (DESIGN §3): the worked example and the properties that make them means."""

from __future__ import annotations

import math

import pytest

from trainer.aurac import aurac, log_aurac

R = [1, 2, 4, 8, 16, 32]


def test_design_worked_example():
    a = [30, 35, 40, 42, 44, 45]
    assert aurac(R, a) == pytest.approx(1327.5 / 31) and round(aurac(R, a), 3) == 42.823
    assert log_aurac(R, a) == pytest.approx(39.7)


@pytest.mark.parametrize("ranks", [[1], [8], R, [2, 8, 64]])
def test_a_flat_curve_gives_its_level(ranks):
    """Both are normalised means: a constant accuracy is returned unchanged (one rank: a_1)."""
    assert aurac(ranks, [0.37] * len(ranks)) == pytest.approx(0.37)
    assert log_aurac(ranks, [0.37] * len(ranks)) == pytest.approx(0.37)


def test_trapezoids_are_exact_for_straight_lines_on_their_axis():
    # a = r is linear on the rank axis: its mean over [1, 32] is (1 + 32) / 2, whatever the grid
    assert aurac(R, [float(r) for r in R]) == pytest.approx(16.5)
    # a = log2 r is linear on the log axis: mean (0 + 5) / 2
    assert log_aurac(R, [math.log2(r) for r in R]) == pytest.approx(2.5)


def test_aurac_weighs_the_top_interval_and_log_aurac_weighs_all_alike():
    """A dip at rank 1 only: the linear axis barely sees it, the log axis sees one fifth of it."""
    dip = [0.0] + [1.0] * 5
    assert aurac(R, dip) == pytest.approx(1 - 0.5 / 31)
    assert log_aurac(R, dip) == pytest.approx(1 - 0.5 / 5)


@pytest.mark.parametrize("ranks, values, message", [
    ([], [], "at least one rank"),
    ([1, 2], [0.1], "one value per rank"),
    ([2, 1], [0.1, 0.2], "strictly increasing"),
    ([1, 1], [0.1, 0.2], "strictly increasing"),
    ([0, 1, 2], [0.1, 0.2, 0.3], "rank 0 is the base model"),
])
def test_bad_curves_are_refused_saying_what_was_given(ranks, values, message):
    for f in (aurac, log_aurac):
        with pytest.raises(ValueError, match=message):
            f(ranks, values)
