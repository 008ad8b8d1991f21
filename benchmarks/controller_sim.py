"""The controller in a simulated engine: the demo's claims over many seeds, in seconds.

``controller_demo.py`` runs real servers for ~17 minutes and gives one noisy sample of each
claim. This script runs the *same* decision function (:func:`server.controller.decide`) in the
loop of a small discrete-event model of the engine, so that a policy or a setting is judged by
its pass rate over many seeded load ramps before a real run confirms it.

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

Compared: the first controller (fixed dwells: ``dwell_s`` down, 3× up) and the current one
(down-dwell shortened by the queue's depth, up-dwell 1× while half the batch is free), each at
a few settings. Printed per configuration: the pass rate of each claim, and medians.

    python benchmarks/controller_sim.py [--seeds 40] | tee benchmarks/controller_sim.txt
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.loadgen import Phase, percentile  # noqa: E402
from server.controller import ControllerConfig, Observation, decide, initial_state  # noqa: E402
from trainer.nested import default_ranks  # noqa: E402


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


CLAIMS = ("c1", "c2", "c3", "c4")


def evaluate(model: Model, name: str, cfg: ControllerConfig, seeds: int, overload_at: float,
             slo_factor: float) -> str:
    rows = [claims(model, cfg, s, slo_factor, overload_at) for s in range(seeds)]
    rate = {c: sum(r[c] for r in rows) / len(rows) for c in CLAIMS}
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k not in CLAIMS}
    return (f"{name:<30}" + "".join(f"{rate[c]:>6.0%}" for c in CLAIMS)
            + f"  {med['p95_auto']:5.1f} {med['p95_max']:5.1f} {med['p95_rank0']:5.1f} {med['slo']:5.1f}"
            + f"  {med['rate_ratio']:5.2f}  {med['back_s']:5.1f} ≤ {med['recover_limit']:3.0f}"
            + f"  {med['switches_per_min']:3.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--r", type=int, default=256, help="the adapter's rank (a power of two)")
    ap.add_argument("--cap0", type=float, default=1.553, help="rank 0, closed loop, requests/s (run 5's probe)")
    ap.add_argument("--cap-top", type=float, default=0.951, help="rank r, closed loop, requests/s (run 5's probe)")
    ap.add_argument("--batch", type=int, default=8, help="engine rows (--max-batch-size)")
    ap.add_argument("--overhead", type=float, default=0.3)
    ap.add_argument("--prefill", type=float, default=1.5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--slo-factor", type=float, default=2.0,
                    help="SLO: this × a request's latency at a full batch of the max rank (batch / cap-top)")
    ap.add_argument("--overload-at", type=float, default=1 / 3,
                    help="overload rate: this far from the top rank's capacity to rank 0's")
    args = ap.parse_args()
    model = Model(cap0=args.cap0, cap_top=args.cap_top, overhead=args.overhead, prefill=args.prefill,
                  new_tokens=args.new_tokens, r=args.r, batch=args.batch)
    ladder = (0, *model.ranks)
    fixed = {"max_urgency": 1.0, "batch_size": 0}  # the first controller: fixed dwells
    configs = {}
    for d, q, sm in [(3, 2, 3), (2, 2, 2), (2, 3, 2), (5, 4, 5)]:
        base = {"dwell_s": float(d), "down_queue": float(q), "smooth_s": float(sm)}
        configs[f"fixed    dwell {d} down {q} smooth {sm}"] = {**base, **fixed}
        configs[f"adaptive dwell {d} down {q} smooth {sm}"] = {**base, "batch_size": model.batch}
    print(f"model: r={model.r}, closed-loop capacity rank 0 {model.cap0} / rank {model.r} {model.cap_top} req/s, "
          f"overhead {model.overhead}, prefill {model.prefill} steps, batch {model.batch}, "
          f"{model.new_tokens} tokens/request; overload {args.overload_at:.2f} of the way to rank 0's capacity; "
          f"SLO {args.slo_factor:g}× batch / capacity of the max rank; {args.seeds} seeds")
    print("claims: c1 auto p95 ≤ SLO < max p95 · c2 auto done ≥ 0.95× rank 0 · c3 back at top in time · "
          "c4 ≤ 2 switches/min steady")
    print(f"{'controller':<30}{'c1':>6}{'c2':>6}{'c3':>6}{'c4':>6}  medians: p95 auto / max / rank 0 / SLO (s),"
          " auto ÷ rank 0 done, back (s) ≤ bound, switches/min")
    for name, kw in configs.items():
        print(evaluate(model, name, ControllerConfig(ladder=ladder, **kw), args.seeds, args.overload_at,
                       args.slo_factor))


if __name__ == "__main__":
    main()
