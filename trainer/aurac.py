"""AURAC: one number for a whole rank–metric curve (DESIGN §3, the MatryoshkaLoRA paper).

For values ``a_i`` measured at sorted ranks ``r_i`` (i = 1..n), trapezoids on the rank axis,
normalised by its range::

    AURAC     = Σ_{i<n} (r_{i+1} − r_i) · (a_i + a_{i+1}) / 2  /  (r_n − r_1)
    log-AURAC = the same with log2 r_i in place of r_i

AURAC is dominated by the widest (top) interval; log-AURAC weighs every power-of-two interval
the same. With one rank both equal ``a_1``; a constant curve gives that constant. The scale of
``a`` is kept (fractions in, fraction out; percentages in, percentage out).

Worked example: R = {1, 2, 4, 8, 16, 32}, a = [30, 35, 40, 42, 44, 45]
→ AURAC = 1327.5 / 31 = 42.823, log-AURAC = 198.5 / 5 = 39.7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def trapezoid_mean(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Σ (x_{i+1} − x_i)(y_i + y_{i+1})/2 / (x_n − x_1): the mean of the piecewise-linear curve."""
    if len(xs) == 1:
        return float(ys[0])
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    return area / (xs[-1] - xs[0])


def aurac(ranks: Sequence[int], values: Sequence[float]) -> float:
    """AURAC over ``ranks`` (strictly increasing, ≥ 1; rank 0, the base model, is not on the curve)."""
    _check(ranks, values)
    return trapezoid_mean(ranks, values)


def log_aurac(ranks: Sequence[int], values: Sequence[float]) -> float:
    """log-AURAC: trapezoids on log2(rank)."""
    _check(ranks, values)
    return trapezoid_mean([math.log2(r) for r in ranks], values)


def _check(ranks: Sequence[int], values: Sequence[float]) -> None:
    if not ranks or len(ranks) != len(values):
        raise ValueError(f"AURAC needs one value per rank and at least one rank; got {len(ranks)} "
                         f"ranks {list(ranks)} and {len(values)} values")
    if any(r < 1 for r in ranks):
        raise ValueError(f"AURAC is over the adapter's ranks (>= 1; rank 0 is the base model, "
                         f"reported separately); got {list(ranks)}")
    if any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise ValueError(f"AURAC needs strictly increasing ranks; got {list(ranks)}")
