"""A discrete-event model of the engine, driven by the real controller: judge a setting in seconds.

The same decision function the server runs (:func:`server.controller.decide`) in the loop of a
small simulation, so that a policy or a setting is judged by its pass rate over many seeded load
ramps before a real run confirms it (``benchmarks/controller_sim.py`` prints those rates;
``benchmarks/controller_demo.py`` is the real run).

The model: Poisson arrivals in the demo's four phases (light 0.3×, overload, light 0.3×, steady
0.6× the max rank's capacity); continuous batching with ``batch`` rows; every request generates
``--new-tokens`` tokens, one per engine step; a step that admits prompts also runs a prefill
forward (``--prefill`` rank-0 steps at a full batch of prompts, scaled like a decode step by how
many it admits); the controller sees the queue depth and the running rows
every 0.5 s, as in the server. A decode step's time follows the largest rank in the batch
(unmerged serving computes every row's adapter at that width): rank 0 costs ``tau0``, rank k > 0
``tau0 + (top − tau0) · (overhead + (1 − overhead) · k / r)``, both scaled by the batch fill
(``0.5 + 0.5 · rows / batch``). ``tau0`` and ``top`` are solved from the closed-loop capacities
(``--cap0``, ``--cap-top``: requests/s at a full batch, as controller_demo.py's probe measures).
The claims are computed as in controller_demo.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise

from client.loadgen import Phase, percentile
from server.controller import ControllerConfig, Observation, decide, initial_state
from trainer.nested import default_ranks


# -- the demo's ramp, SLO and recovery bound (controller_demo.py uses these too) ----------------------
def ramp(cap_top: float, cap0: float, overload_at: float = 1 / 3, scale: float = 1.0) -> list[Phase]:
    """Light (0.3× the top rank's capacity), overload (``overload_at`` of the way from the top
    rank's capacity to rank 0's), light again (the quiet phase), steady noisy (0.6×)."""
    light, steady = 0.3 * cap_top, 0.6 * cap_top
    over = cap_top + overload_at * (cap0 - cap_top)
    return [Phase(light, 30 * scale), Phase(over, 90 * scale), Phase(light, 60 * scale), Phase(steady, 60 * scale)]


def declared_slo(batch: int, cap_top: float, factor: float = 2.0) -> float:
    """``factor`` × a request's latency in a full batch at the top rank (batch / capacity)."""
    return factor * batch / cap_top


def recovery_bound(cfg: ControllerConfig, quiet_s: float) -> float:
    """Seconds after the load falls by which the top rank must be back: the smoothed queue decays
    to the up level (≈ 3 time constants), then each rung waits at most ``up_dwell_factor × dwell``;
    and no later than the end of the quiet phase (after it, the steady load has begun)."""
    slow = (len(cfg.ladder) - 1) * cfg.up_dwell_factor * cfg.dwell_s + 3 * cfg.smooth_s
    return min(slow, quiet_s)


@dataclass
class Model:
    cap0: float = 1.90  # requests/s at rank 0, full batch
    cap_top: float = 1.38  # requests/s at the top rank, full batch
    overhead: float = 0.3  # share of the top rank's extra step time that every rank > 0 pays
    prefill: float = 1.0  # a step that admits prompts runs a prefill forward costing this many rank-0 steps
    batch: int = 8
    new_tokens: int = 24
    r: int = 64

    @property
    def ranks(self) -> list[int]:
        return default_ranks(self.r)

    @cached_property
    def tau(self) -> tuple[float, float]:
        """(rank-0, top-rank) decode step time at a full batch, from the closed-loop capacities:
        a round of ``batch`` requests is one prefill plus ``new_tokens`` decode steps."""
        tau0 = self.batch / self.cap0 / (self.new_tokens + self.prefill)
        return tau0, (self.batch / self.cap_top - self.prefill * tau0) / self.new_tokens

    def step_s(self, k: int, rows: int, admitted: int = 0) -> float:
        tau0, top = self.tau
        extra = 0.0 if k == 0 else (top - tau0) * (self.overhead + (1 - self.overhead) * k / self.r)
        prefill = self.prefill * tau0 * (0.5 + 0.5 * admitted / self.batch) if admitted else 0.0
        return (tau0 + extra) * (0.5 + 0.5 * rows / self.batch) + prefill


@dataclass
class Req:
    sent: float
    phase: int
    rank: int = -1
    left: int = 0
    done: float | None = None


@dataclass
class Run:
    requests: list[Req] = field(default_factory=list)
    ranks: list[tuple[float, int]] = field(default_factory=list)  # (t, auto rank) every 0.5 s


def simulate(model: Model, cfg: ControllerConfig, phases: list[Phase], seed: int, policy_on: bool = True) -> Run:
    rng = random.Random(seed)
    arrivals, t0 = [], 0.0
    for i, ph in enumerate(phases):
        t = t0
        while True:
            t += rng.expovariate(ph.rate)
            if t >= t0 + ph.seconds:
                break
            arrivals.append(Req(t, i))
        t0 += ph.seconds
    end = t0
    run = Run(requests=arrivals)
    state, queue, rows, now, tick = initial_state(cfg, 0.0), [], [], 0.0, 0.0
    pending = list(reversed(arrivals))
    while pending or queue or rows or tick <= end:
        while tick <= now:  # the controller's 0.5 s ticks that fell inside the last step (or idle gap)
            while pending and pending[-1].sent <= tick:  # it sees only the arrivals before it
                queue.append(pending.pop())
            obs = Observation(t=tick, queue_depth=len(queue), running=len(rows))
            state = decide(obs, state, cfg).state if policy_on else state
            if tick <= end:
                run.ranks.append((tick, state.rank))
            tick += 0.5
        while pending and pending[-1].sent <= now:
            queue.append(pending.pop())
        admitted = 0
        while queue and len(rows) < model.batch:
            r = queue.pop(0)
            r.rank, r.left = state.rank, model.new_tokens
            rows.append(r)
            admitted += 1
        if not rows:
            now = pending[-1].sent if pending else tick
            continue
        now += model.step_s(max(r.rank for r in rows), len(rows), admitted)
        for r in rows:
            r.left -= 1
            if r.left == 0:
                r.done = now
        rows = [r for r in rows if r.left > 0]
    return run


def claims(model: Model, cfg: ControllerConfig, seed: int, slo_factor: float = 2.0, overload_at: float = 1 / 3) -> dict:
    """The demo's phases and claims 1–4 for one seed (same definitions as controller_demo.py)."""
    phases = ramp(model.cap_top, model.cap0, overload_at)
    top = cfg.ladder[-1]
    runs = {"max": simulate(model, cfg, phases, seed, policy_on=False),
            "auto": simulate(model, cfg, phases, seed),
            "rank0": simulate(model, ControllerConfig(ladder=(0,)), phases[:2], seed, policy_on=False)}
    start, fall = phases[0].seconds, phases[0].seconds + phases[1].seconds
    steady_start = fall + phases[2].seconds

    def overload_p95(run: Run) -> float:
        return percentile(sorted(r.done - r.sent for r in run.requests if r.phase == 1), 0.95) or float("inf")

    def overload_done_rate(run: Run) -> float:  # completions inside the overload window
        return sum(1 for r in run.requests if start <= r.done < fall) / phases[1].seconds

    p95 = {name: overload_p95(run) for name, run in runs.items()}
    done = {name: overload_done_rate(run) for name, run in runs.items()}
    slo = declared_slo(model.batch, model.cap_top, slo_factor)
    back = next((t for t, k in runs["auto"].ranks if t >= fall and k == top), None)
    back_s = back - fall if back is not None else float("inf")
    steady_ranks = [k for t, k in runs["auto"].ranks if t >= steady_start]
    switches = sum(1 for a, b in pairwise(steady_ranks) if a != b)
    per_min = switches / (phases[3].seconds / 60)
    limit = recovery_bound(cfg, phases[2].seconds)
    return {"p95_auto": p95["auto"], "p95_max": p95["max"], "p95_rank0": p95["rank0"], "slo": slo,
            "done_max": done["max"], "done_rank0": done["rank0"], "rate_ratio": done["auto"] / done["rank0"],
            "back_s": back_s, "recover_limit": limit, "switches_per_min": per_min,
            "c1": p95["auto"] <= slo < p95["max"], "c2": done["auto"] >= 0.95 * done["rank0"],
            "c3": back_s <= limit, "c4": per_min <= 2}


