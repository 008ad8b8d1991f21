"""The load-adaptive rank controller: a pure function of observed stats and time → a rank.

:func:`decide` does no I/O and keeps no hidden state: give it an :class:`Observation`, the
previous :class:`ControllerState` and the :class:`ControllerConfig`, and it returns a
:class:`Decision` (the new state and a reason from :data:`REASONS`). The engine calls it from
its loop; tests call it on made-up traces.

Policies:

* ``threshold`` — levels of the queue depth, smoothed (EWMA, time constant ``smooth_s``), with
  hysteresis: one rung down when it reaches ``down_queue``, one rung up when it is at or below
  ``up_queue``. Between the levels nothing changes, so a noisy steady load does not oscillate.
* ``slo`` — the most accurate rank whose measured throughput sustains the observed demand
  (``tokens/s needed × headroom``); if p95 latency exceeds ``slo_p95_s`` anyway, one rung down.
* ``off`` — always the largest allowed rank.

Dwell (both policies; see :func:`_dwell`): a move waits until the rank has been held long enough.
Down: ``dwell_s`` divided by how many times deeper than ``down_queue`` the smoothed queue is
(``slo``: how many times the p95 exceeds its target), at most ``max_urgency``, so an overload
walks down the ladder fast and a marginal one slowly. Up: ``up_dwell_factor × dwell_s`` (quicker
down than up), except while at most half the engine's rows are busy (``batch_size``), when the
load is far inside capacity and ``dwell_s`` suffices: the way back to the top rank after a burst
is short. ``benchmarks/controller_sim.py`` measures these rules against fixed dwells
(docs/controller.md has the figures).

Both policies move only between rungs that buy something (:func:`rungs`): on the measured
cost curve (decode tokens/s per rank at a full batch), a rank is a rung only if it is more than
``min_gain`` faster than the next higher rung kept, so a rank that costs what the one above it
costs is never taken: a down-move goes straight to the next rung that buys throughput, an up-move
straight to the most accurate rank at that cost. Unmerged on a CPU, ranks 1…r cost about the
same and rank 0 (no adapter) ~15% less, so the ladder {0, 1, 2, 4, 8, 16} acts as {0, 16}.
Where no rung below buys anything the rank holds (reason ``no_gain``); with ``equal_costs`` (the
server sets it under ``--merge-rank auto``, where a batch at any rank runs at the base model's
cost) that is every rank: the most accurate rank is free. Without a measurement (no table), or
with ``min_gain`` None or 0, every rank of the ladder is a rung.

The ladder is ``{0} ∪ R`` limited to ``[min_rank, max_rank]``; rank 0 (the base model) is the
last rung when ``min_rank`` is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

REASONS = ("hold", "dwell", "queue_high", "queue_low", "slo_violation", "capacity_short", "capacity_ok", "no_gain",
           "off")


@dataclass(frozen=True)
class ControllerConfig:
    policy: Literal["threshold", "slo", "off"] = "threshold"
    ladder: tuple[int, ...] = (0,)  # allowed ranks, ascending
    dwell_s: float = 3.0  # seconds a rank is held before a move (see _dwell)
    up_dwell_factor: float = 3.0  # up-moves wait this × dwell_s (1× while half the batch is free)
    down_queue: float = 2.0  # threshold: smoothed queue depth that triggers a downshift
    up_queue: float = 0.5  # smoothed queue depth at or below which an upshift may happen
    smooth_s: float = 3.0  # time constant of the queue-depth EWMA
    slo_p95_s: float = 10.0  # slo: target p95 end-to-end latency
    headroom: float = 1.2  # slo: capacity must exceed demand by this factor
    min_gain: float | None = 0.03  # a rank is a rung if measured this much faster than the rung above
    equal_costs: bool = False  # every rank costs the same (auto merge): never lower
    max_urgency: float = 4.0  # a queue k × down_queue deep shortens the down-dwell k-fold, up to this
    batch_size: int = 0  # engine rows; with it, an up-move waits only dwell_s while half the rows are free

    @classmethod
    def build(cls, ranks: list[int], min_rank: int | None = None, max_rank: int | None = None,
              **kw) -> "ControllerConfig":
        full = [0, *ranks]
        lo = full[0] if min_rank is None else min_rank
        hi = full[-1] if max_rank is None else max_rank
        ladder = tuple(k for k in full if lo <= k <= hi)
        if not ladder:
            raise ValueError(f"--min-rank {lo} / --max-rank {hi} leave no rank of {full} to serve")
        return cls(ladder=ladder, **kw)


@dataclass(frozen=True)
class Observation:
    """What the controller sees at time ``t`` (seconds, monotonic)."""

    t: float
    queue_depth: float = 0.0  # waiting requests (cluster-wide when read through PromQL)
    running: float = 0.0
    arrival_rate: float = 0.0  # requests/s over the recent window
    tokens_per_request: float = 0.0  # mean generated tokens per finished request (recent)
    p95_e2e_s: float | None = None
    p50_e2e_s: float | None = None
    p95_queue_wait_s: float | None = None
    p95_ttft_s: float | None = None
    tokens_per_s: float = 0.0


@dataclass(frozen=True)
class ControllerState:
    rank: int
    since: float = 0.0  # when the rank was last changed
    queue_avg: float = 0.0  # EWMA of the queue depth
    busy_avg: float = 0.0  # EWMA of running + waiting requests
    t: float | None = None  # time of the last observation


@dataclass(frozen=True)
class Decision:
    state: ControllerState
    reason: str
    changed: int = 0  # -1 down, +1 up, 0 none

    @property
    def rank(self) -> int:
        return self.state.rank


def initial_state(cfg: ControllerConfig, t: float = 0.0) -> ControllerState:
    return ControllerState(rank=cfg.ladder[-1], since=t)


def decide(obs: Observation, state: ControllerState, cfg: ControllerConfig,
           throughput: dict[int, float] | None = None) -> Decision:
    """The next state. ``throughput``: measured tokens/s per rank at a full batch (slo policy)."""
    state = _smooth(state, obs, cfg)
    if cfg.policy == "off":
        return _move(state, cfg.ladder[-1], obs.t, "off")
    rung = cfg.ladder.index(state.rank) if state.rank in cfg.ladder else len(cfg.ladder) - 1
    held = obs.t - state.since
    if cfg.policy == "threshold":
        want, why = _threshold(state, rung, cfg)
    else:
        want, why = _slo(obs, state, rung, cfg, throughput or {})
    if want == rung:
        return Decision(state, why)
    worth = rungs(cfg, throughput or {})
    if want < rung:  # the next rung below that buys throughput, however many ranks down
        below = [k for k in worth if k < state.rank]
        if not below:
            return Decision(state, "no_gain")
        target = below[-1]
    else:  # the next rung above: the most accurate rank at its cost
        target = next((k for k in worth if k > state.rank), cfg.ladder[want])
    if held < _dwell(state, obs, cfg, up=want > rung):
        return Decision(state, "dwell")
    return _move(state, target, obs.t, why)


def rungs(cfg: ControllerConfig, throughput: dict[int, float]) -> tuple[int, ...]:
    """The ranks worth moving between, ascending (see the module docstring): from the top down,
    a rank is kept if it is measured more than ``min_gain`` faster than the last rank kept. The
    top is always kept; an unmeasured rank counts as a gain."""
    if cfg.equal_costs:
        return cfg.ladder[-1:]
    if not cfg.min_gain or not throughput:  # None or 0: every rank is a rung
        return cfg.ladder
    kept = [cfg.ladder[-1]]
    for k in reversed(cfg.ladder[:-1]):
        mine, above = throughput.get(k), throughput.get(kept[-1])
        if mine is None or above is None or mine > above * (1.0 + cfg.min_gain):
            kept.append(k)
    return tuple(reversed(kept))


def _dwell(state: ControllerState, obs: Observation, cfg: ControllerConfig, up: bool) -> float:
    """How long the rank must have been held before this move.

    Down: ``dwell_s`` divided by the urgency, clamped to [1, ``max_urgency``]: ``queue_avg /
    down_queue`` under ``threshold``, ``p95 / slo_p95_s`` under ``slo`` (a deep queue, or a p95
    far over the target, walks down the ladder fast; a marginal one at the normal pace).

    Up: ``up_dwell_factor × dwell_s``, or only ``dwell_s`` while at most half the engine's rows
    are busy (running + waiting, smoothed): the load is then well inside capacity, and the longer
    wait would only keep accuracy down. With ``--prometheus-url`` the waiting count is the
    cluster's queue, so the quick climb needs the whole cluster to be light (conservative)."""
    if not up:
        if cfg.policy == "threshold" and cfg.down_queue > 0:
            urgency = state.queue_avg / cfg.down_queue
        elif cfg.policy == "slo" and obs.p95_e2e_s is not None and cfg.slo_p95_s > 0:
            urgency = obs.p95_e2e_s / cfg.slo_p95_s
        else:
            urgency = 1.0
        return cfg.dwell_s / min(max(urgency, 1.0), max(cfg.max_urgency, 1.0))
    if cfg.batch_size > 0 and state.busy_avg <= cfg.batch_size / 2:
        return cfg.dwell_s
    return cfg.dwell_s * cfg.up_dwell_factor


def _smooth(state: ControllerState, obs: Observation, cfg: ControllerConfig) -> ControllerState:
    """Fold the queue depth, and running + waiting, into their EWMAs: weight 1 − exp(−Δt / smooth_s)."""
    busy = obs.queue_depth + obs.running
    if state.t is None:
        return replace(state, queue_avg=obs.queue_depth, busy_avg=busy, t=obs.t)
    w = 1.0 - math.exp(-max(obs.t - state.t, 0.0) / cfg.smooth_s) if cfg.smooth_s > 0 else 1.0
    return replace(state, queue_avg=state.queue_avg + w * (obs.queue_depth - state.queue_avg),
                   busy_avg=state.busy_avg + w * (busy - state.busy_avg), t=obs.t)


def _threshold(state: ControllerState, rung: int, cfg: ControllerConfig) -> tuple[int, str]:
    if state.queue_avg >= cfg.down_queue and rung > 0:
        return rung - 1, "queue_high"
    if state.queue_avg <= cfg.up_queue and rung < len(cfg.ladder) - 1:
        return rung + 1, "queue_low"
    return rung, "hold"


def _slo(obs: Observation, state: ControllerState, rung: int, cfg: ControllerConfig,
         throughput: dict[int, float]) -> tuple[int, str]:
    if obs.p95_e2e_s is not None and obs.p95_e2e_s > cfg.slo_p95_s and rung > 0:
        return rung - 1, "slo_violation"
    demand = obs.arrival_rate * max(obs.tokens_per_request, 1.0) * cfg.headroom
    fits = [i for i, k in enumerate(cfg.ladder) if throughput.get(k, float("inf")) >= demand]
    best = fits[-1] if fits else 0
    if best < rung:
        return rung - 1, "capacity_short"  # one rung at a time
    if best > rung and state.queue_avg <= cfg.up_queue:
        return rung + 1, "capacity_ok"
    return rung, "hold"


def _move(state: ControllerState, rank: int, t: float, reason: str) -> Decision:
    if rank == state.rank:
        return Decision(state, reason)
    return Decision(replace(state, rank=rank, since=t), reason, 1 if rank > state.rank else -1)


@dataclass
class Trace:
    """Helper for tests and benchmarks: run ``decide`` over a list of observations."""

    cfg: ControllerConfig
    throughput: dict[int, float] | None = None
    decisions: list[Decision] = field(default_factory=list)

    def run(self, observations: list[Observation]) -> list[int]:
        state = initial_state(self.cfg, observations[0].t if observations else 0.0)
        ranks = []
        for obs in observations:
            d = decide(obs, state, self.cfg, self.throughput)
            self.decisions.append(d)
            state = d.state
            ranks.append(state.rank)
        return ranks

    @property
    def switches(self) -> int:
        return sum(1 for d in self.decisions if d.changed)
