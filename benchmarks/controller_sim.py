"""The controller in a simulated engine: the demo's claims over many seeds, in seconds.

``controller_demo.py`` runs real servers for ~17 minutes and gives one noisy sample of each
claim. This script runs the *same* decision function (:func:`server.controller.decide`) in the
loop of a small discrete-event model of the engine, so that a policy or a setting is judged by
its pass rate over many seeded load ramps before a real run confirms it.

The model and the claims: :mod:`server.simulator`.

Compared: the first controller (fixed dwells: ``dwell_s`` down, 3× up) and the current one
(down-dwell shortened by the queue's depth, up-dwell 1× while half the batch is free), each at
a few settings. Printed per configuration: the pass rate of each claim, and medians.

    python benchmarks/controller_sim.py [--seeds 40] | tee benchmarks/controller_sim.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.controller import ControllerConfig  # noqa: E402
from server.simulator import Model, claims  # noqa: E402


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
