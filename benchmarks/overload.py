"""Overload: many concurrent connections against a small ``--max-queue`` for a fixed time.

Claims checked (issue 11, item 4): every response is 200 or 429 with ``Retry-After``; every 200
carries its full output; no 5xx and no failed connection; the server's resident memory after
the run is within 10% of what it was after warm-up. Clients honour Retry-After (as the typed
client does), so the offered load stays far above what the engine serves.

Measured beside it, in the same run: the answers/s of exactly as many clients as the server
holds (batch + queue: none is refused), and the CPU seconds per second of the server and of the
load generator in both phases, so that what a flood of refusals costs the engine is a ratio.

    python benchmarks/overload.py [--model smollm2-135m] [--connections 200] [--seconds 60] \\
        [--max-queue 8] [--batch 8] [--new-tokens 16] [--baseline-seconds 30] | tee benchmarks/overload.txt
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cpu_seconds, rss_mib, serve, untrained_adapter  # noqa: E402


async def load(url: str, connections: int, seconds: float, tokens: int) -> tuple[Counter, list[str]]:
    """``connections`` clients, each with its own connection, sending until ``seconds`` pass."""
    statuses, problems = Counter(), []
    end = time.monotonic() + seconds
    body = {"prompt": "Question: Ada has 12 apples and gets 7 more. How many?\nAnswer: ",
            "max_new_tokens": tokens, "ignore_eos": True}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=1)) as c:
            while time.monotonic() < end:
                try:
                    r = await c.post("/generate", json=body)
                except httpx.HTTPError as e:
                    statuses["connection error"] += 1
                    problems.append(repr(e))
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    if r.json()["usage"]["completion_tokens"] != tokens:
                        problems.append(f"short output: {r.json()['usage']}")
                elif r.status_code == 429:
                    after = r.headers.get("retry-after")
                    if after is None or int(after) < 1:
                        problems.append(f"429 without Retry-After: {dict(r.headers)}")
                    await asyncio.sleep(int(after or 1))
                else:
                    problems.append(f"{r.status_code}: {r.text[:200]}")

    await asyncio.gather(*(client() for _ in range(connections)))
    return statuses, problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", help="checkpoint folder (default: an untrained r=16 adapter)")
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--baseline-seconds", type=float, default=30, help="the phase at capacity (none refused)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.adapter) if args.adapter else untrained_adapter(args.model, Path(tmp) / "ckpt")
        procs = []
        with serve(args.model, ckpt, "--max-queue", str(args.max_queue), "--max-batch-size", str(args.batch),
                   "--calibrate-steps", "0", on_start=procs.append) as url:
            pid = procs[0].pid
            warm, _ = asyncio.run(load(url, args.batch, 5, args.new_tokens))  # warm-up: the batch's width
            rss_warm = rss_mib(pid)
            phases = {}
            for name, clients, seconds in [("capacity", args.batch + args.max_queue, args.baseline_seconds),
                                           ("flood", args.connections, args.seconds)]:
                t0, cpu0, own0 = time.monotonic(), cpu_seconds(pid), time.process_time()
                statuses, problems = asyncio.run(load(url, clients, seconds, args.new_tokens))
                took = time.monotonic() - t0
                phases[name] = dict(clients=clients, took=took, answers=statuses[200], refused=statuses[429],
                                    server_cpu=(cpu_seconds(pid) - cpu0) / took,
                                    loadgen_cpu=(time.process_time() - own0) / took)
            time.sleep(1)
            rss_after = rss_mib(pid)
            health = httpx.get(url + "/health").status_code
    print(f"# overload  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# model {args.model}, batch {args.batch}, --max-queue {args.max_queue}, {args.new_tokens} new tokens "
          f"(EOS ignored), cpus {os.cpu_count()}")
    print(f"# {args.connections} connections for {args.seconds:g} s (ran {took:.1f} s); "
          f"warm-up {sum(warm.values())} requests")
    total = sum(statuses.values())
    for k, n in sorted(statuses.items(), key=str):
        print(f"status {k}: {n}  ({100 * n / max(total, 1):.1f}%)")
    print(f"served {statuses[200] * args.new_tokens / took:.1f} tok/s, {statuses[200] / took:.2f} full answers/s")
    print("\nphase      clients  answers/s  refused/s  server CPU s/s  load generator CPU s/s")
    for name, ph in phases.items():
        print(f"{name:<10} {ph['clients']:>7}  {ph['answers'] / ph['took']:>9.2f}  {ph['refused'] / ph['took']:>9.1f}"
              f"  {ph['server_cpu']:>14.2f}  {ph['loadgen_cpu']:>22.2f}")
    cap, flood = phases["capacity"], phases["flood"]
    print(f"answers/s under the flood / at capacity: {flood['answers'] / flood['took'] / (cap['answers'] / cap['took']):.2f}\n")
    growth = rss_after / rss_warm - 1
    print(f"resident memory: {rss_warm:.0f} MiB after warm-up, {rss_after:.0f} MiB after the run "
          f"({100 * growth:+.1f}%)")
    checks = {"only 200 and 429 (with Retry-After), all 200s full": set(statuses) <= {200, 429} and not problems,
              "some requests served, some refused": statuses[200] > 0 and statuses[429] > 0,
              "memory within 10% of after warm-up": abs(growth) <= 0.10, "/health 200 after": health == 200}
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for p in problems[:10]:
        print("problem:", p)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
