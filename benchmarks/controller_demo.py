"""The controller's trade-off, demonstrated: the same load ramp against three servers, one run.

* ``auto``    ``--controller threshold``, every request ``rank: auto`` (the controller decides);
* ``max``     ``--controller off``: ``auto`` is always the largest rank (what serving without a
              controller does);
* ``rank0``   every request at rank 0 (the base model): the capacity ceiling under overload;
* ``merged``  ``--merge-rank auto`` + ``--controller threshold``: the merged fast path, where every
              rank runs at the base model's cost — the controller should hold the max rank.

Engine mode of the first three: unmerged adapter, so ranks differ in cost. The adapter is r=256 by
default: on this CPU an r=64 adapter costs only ~16% of a decode step, and once prefill and HTTP
are counted rank 0 and rank 64 served almost the same open-loop load (1.30 vs 1.22 requests/s in
the run of 2026-11-29), too little for a controller to show; r=256 decodes at 0.65× rank 0's
tokens/s (decode_ranks_r256.txt). The ramp is sized from a closed-loop capacity probe of the max rank and rank 0 (requests/s, prefill and
HTTP included): a light phase (0.3× the max rank's capacity), an overload phase a third of the
way from the max rank's capacity to rank 0's (open-loop serving reaches less than the probe, so
the midpoint would overload rank 0 too), a light phase (recovery), and a steady, noisy phase at
0.6× the max rank's capacity (oscillation check). It prints the claims with PASS/MISS:

1. auto keeps p95 latency under the SLO in the overload phase where fixed max rank does not;
2. auto's completion rate under overload ≥ 0.95× that of fixed rank 0;
3. auto returns to the max rank within a stated time after the load falls;
4. ≤ 2 rank switches per minute under the steady, noisy load;
5. merged: the controller holds the max rank through the overload (nothing to gain by lowering
   it), and completes ≥ 0.95× what rank 0 completes.

The SLO is declared before the load starts: ``--slo-s``, or by default twice a request's latency
at a full batch of the max rank (``batch / capacity``, from the probe: queueing may at most equal
the service time). Earlier runs derived it from the light phase's p95 (2×, then 3×); that p95
rests on ~10 requests and swung from 6.0 to 8.7 s between runs, and the 3× SLO of the run of
2026-11-29 (26 s) was looser than the max rank's own overload p95 (23.7 s).
``benchmarks/controller_sim.py`` (the same controller in a simulated engine, 40 seeds) chose the
controller settings used here (``--dwell-s 3 --down-queue 2 --smooth-s 3``).

    python benchmarks/controller_demo.py --out docs/controller_demo   [--scale 1.0]
    python benchmarks/controller_demo.py --out docs/controller_demo --replot   # compare.png only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import serve, untrained_adapter  # noqa: E402
from server.simulator import declared_slo, ramp, recovery_bound  # noqa: E402
from client.loadgen import (DEMO_PROMPTS, load_report, print_summary, rolling_p95, run,  # noqa: E402
                            summarise, write_report)
from server.controller import ControllerConfig  # noqa: E402


async def capacity(url: str, rank: int, new_tokens: int, batch: int, rounds: int = 3) -> float:
    """Completed requests/s with ``batch`` clients that each send the next request at once."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def client(i: int) -> None:
            for j in range(rounds):
                r = await http.post("/generate", json={"prompt": DEMO_PROMPTS[(i + j) % len(DEMO_PROMPTS)],
                                                       "rank": rank, "max_new_tokens": new_tokens,
                                                       "ignore_eos": True})
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(batch)))
        return batch * rounds / (time.perf_counter() - t0)


def compare(runs: dict, slo: float, path: Path) -> None:
    """One figure for the four servers: rolling p95 latency against the SLO, and auto's rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, rank) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, layout="constrained",
                                    gridspec_kw={"height_ratios": [2, 1]})
    for name, rep in runs.items():
        lat.plot(*rolling_p95(rep), label=name)
    lat.axhline(slo, color="k", linestyle=":", label=f"SLO {slo:.1f} s")
    lat.set_ylabel("p95 latency, last 10 s (s)")
    lat.legend(loc="upper right")
    auto = runs["auto"].seconds
    rank.plot([x.t for x in auto], [x.auto_rank if x.auto_rank is not None else float("nan") for x in auto],
              color="C1")
    rank.set_ylabel("auto's rank")
    rank.set_xlabel("time (s)")
    edge = 0.0
    for ph in runs["auto"].schedule[:-1]:
        edge += ph.seconds
        for ax in (lat, rank):
            ax.axvline(edge, color="0.6", linestyle="--", linewidth=0.8)
    fig.suptitle("max (controller off) vs auto (threshold controller) vs rank 0 vs merged")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--r", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every phase's duration")
    ap.add_argument("--slo-s", type=float, default=0.0,
                    help="p95 SLO; 0: 2× a request's latency at a full batch of the max rank (batch / capacity)")
    ap.add_argument("--overload-at", type=float, default=1 / 3,
                    help="overload rate: this far from the max rank's capacity to rank 0's")
    ap.add_argument("--dwell-s", type=float, default=3.0)
    ap.add_argument("--smooth-s", type=float, default=3.0)
    ap.add_argument("--out", default="docs/controller_demo")
    ap.add_argument("--replot", action="store_true", help="only redraw compare.png from the reports in --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        runs = {name: load_report(out / name / "report.json") for name in ("max", "auto", "rank0", "merged")}
        compare(runs, json.loads((out / "summary.json").read_text())["slo_s"], out / "compare.png")
        return

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = untrained_adapter(args.model, Path(tmp) / "ckpt", args.r, std=0.002)
        common = ["--max-batch-size", str(args.batch), "--calibrate-steps", "6", "--dwell-s", str(args.dwell_s),
                  "--down-queue", "2", "--smooth-s", str(args.smooth_s)]
        runs = {}
        with serve(args.model, ckpt, *common, "--controller", "off") as url:
            tput = {int(k): v for k, v in httpx.get(url + "/ranks").json()["throughput"].items()}
            top = max(tput)
            # requests/s each end sustains, prefill and HTTP included: a saturating closed-loop probe
            cap = {k: asyncio.run(capacity(url, k, args.new_tokens, args.batch)) for k in (top, 0)}
            print(f"measured capacity (requests/s): {cap}", file=sys.stderr)
            slo = args.slo_s or declared_slo(args.batch, cap[top])
            print(f"declared SLO: overload p95 ≤ {slo:.1f} s", file=sys.stderr)
            phases = ramp(cap[top], cap[0], args.overload_at, args.scale)
            print(f"calibrated decode tokens/s per rank: {tput}", file=sys.stderr)
            print(f"phases (req/s, s): {[(round(p.rate, 3), p.seconds) for p in phases]}", file=sys.stderr)
            runs["max"] = asyncio.run(run(url, phases, DEMO_PROMPTS, "auto", args.new_tokens, None, 0))
        with serve(args.model, ckpt, *common, "--controller", "threshold") as url:
            runs["auto"] = asyncio.run(run(url, phases, DEMO_PROMPTS, "auto", args.new_tokens, None, 0))
        with serve(args.model, ckpt, *common, "--controller", "off") as url:
            runs["rank0"] = asyncio.run(run(url, phases[:2], DEMO_PROMPTS, "0", args.new_tokens, None, 0))
        with serve(args.model, ckpt, *common, "--controller", "threshold", "--merge-rank", "auto") as url:
            runs["merged"] = asyncio.run(run(url, phases[:2], DEMO_PROMPTS, "auto", args.new_tokens, None, 0))
            merged_info = httpx.get(url + "/ranks").json()

    summaries = {name: summarise(rep) for name, rep in runs.items()}
    for name, rep in runs.items():
        write_report(rep, out / name)
        print(f"\n== {name} ==")
        print_summary(summaries[name])
    compare(runs, slo, out / "compare.png")
    p95 = {n: summaries[n][1]["p95_s"] or float("inf") for n in runs}
    rate = {n: summaries[n][1]["completed_rps"] for n in runs}  # completions inside the overload window
    auto = runs["auto"]
    fall = phases[0].seconds + phases[1].seconds
    back = next((x.t for x in auto.seconds if x.t >= fall and x.auto_rank == top), None)
    steady_start = fall + phases[2].seconds
    ranks_steady = [x.auto_rank for x in auto.seconds if x.t >= steady_start and x.auto_rank is not None]
    switches = sum(1 for a, b in pairwise(ranks_steady) if a != b)
    per_min = switches / (phases[3].seconds / 60)
    merged_ranks = {x.auto_rank for x in runs["merged"].seconds if x.auto_rank is not None}
    auto_cfg = ControllerConfig.build(sorted(k for k in tput if k), dwell_s=args.dwell_s, smooth_s=args.smooth_s)
    recover_limit = recovery_bound(auto_cfg, phases[2].seconds)
    claims = [
        (f"1. overload p95: auto {p95['auto']:.1f} s ≤ SLO {slo:.1f} s < max rank {p95['max']:.1f} s",
         p95["auto"] <= slo < p95["max"]),
        (f"2. overload completions: auto {rate['auto']:.3f}/s ≥ 0.95 × rank 0 {rate['rank0']:.3f}/s",
         rate["auto"] >= 0.95 * rate["rank0"]),
        (f"3. back at rank {top} {'%.0f s' % (back - fall) if back else 'never'} after the load fell "
         f"(stated bound {recover_limit:.0f} s)", back is not None and back - fall <= recover_limit),
        (f"4. steady noisy load: {switches} switches in {phases[3].seconds:.0f} s = {per_min:.1f}/min ≤ 2",
         per_min <= 2),
        (f"5. merged (--merge-rank auto): auto rank held at {sorted(merged_ranks)} through the overload "
         f"(merged rank {merged_info['merge']['rank']}); completions {rate['merged']:.3f}/s ≥ 0.95 × rank 0 "
         f"{rate['rank0']:.3f}/s", merged_ranks == {top} and rate["merged"] >= 0.95 * rate["rank0"]),
    ]
    print(f"\nmodel {args.model}, r={args.r} adapter (unmerged; 'merged': --merge-rank auto), batch {args.batch}, "
          f"{args.new_tokens} tokens/request, SLO {slo:.1f} s ({'--slo-s' if args.slo_s else '2x batch / max-rank capacity'})")
    print(f"merged server: calibrated tokens/s {merged_info['throughput']}, controller {merged_info['controller']}")
    print(f"calibrated decode tokens/s per rank (batch {args.batch}): {tput}")
    print(f"measured capacity, requests/s (closed loop, prefill and HTTP included): {cap}")
    print(f"phases (requests/s, seconds): {[(round(p.rate, 3), p.seconds) for p in phases]}")
    for text, ok in claims:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    (out / "summary.json").write_text(json.dumps({"throughput": tput, "capacity_rps": cap, "phases": [p.__dict__ for p in phases],
                                                  "slo_s": slo, "summaries": summaries,
                                                  "claims": [{"claim": t, "pass": ok} for t, ok in claims]}, indent=1))


if __name__ == "__main__":
    main()
