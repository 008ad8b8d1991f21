"""``client bench``: an open-loop Poisson load that shows the rank/latency/throughput trade-off.

``--schedule "2:30,8:30,2:30"`` = 2 requests/s for 30 s, then 8/s for 30 s, then 2/s for 30 s.
Arrival times are drawn up front (seeded), so the offered load never depends on how fast the
server answers. Every second the server's ``/metrics`` are scraped (queue depth, auto rank,
generated tokens). Writes ``report.json`` (per request and per second), ``report.png``, and
prints a summary per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from client.api import AsyncClient
from client.errors import ClientError

DEMO_PROMPTS = [
    "Question: Ada has 12 apples and gets 7 more. How many apples does she have now?\nAnswer: ",
    "Question: Ben had 40 coins and gave away 15. How many coins are left?\nAnswer: ",
    "Question: A box holds 6 pencils. How many pencils are in 9 boxes?\nAnswer: ",
    "Question: Chen shares 36 stamps equally among 4 friends. How many does each friend get?\nAnswer: ",
    "Question: Dara reads 12 pages a day. How many pages does she read in a week?\nAnswer: ",
    "Question: A farmer has 3 fields with 25 cows each. How many cows are there?\nAnswer: ",
]


@dataclass
class Phase:
    rate: float  # requests per second
    seconds: float


@dataclass
class RequestRecord:
    sent_s: float  # offset from the start of the run
    phase: int
    status: str = "pending"  # ok | overloaded | timeout | error
    rank: int | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    queue_s: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class SecondRecord:
    t: int
    offered: int = 0  # requests sent in this second
    completed: int = 0
    queue_depth: float | None = None
    running: float | None = None
    auto_rank: float | None = None
    tokens_per_s: float | None = None
    p50_s: float | None = None
    p95_s: float | None = None


@dataclass
class Report:
    url: str
    schedule: list[Phase]
    rank: str
    max_new_tokens: int
    requests: list[RequestRecord] = field(default_factory=list)
    seconds: list[SecondRecord] = field(default_factory=list)


def parse_schedule(text: str) -> list[Phase]:
    phases = []
    for part in text.split(","):
        try:
            rate, secs = part.split(":")
            phases.append(Phase(float(rate), float(secs)))
        except ValueError:
            raise ValueError(f"--schedule takes RATE:SECONDS pairs like 2:30,8:30; got {part!r}") from None
        if phases[-1].rate < 0 or phases[-1].seconds <= 0:
            raise ValueError(f"--schedule: rate must be ≥ 0 and seconds > 0; got {part!r}")
    return phases


def arrivals(phases: list[Phase], seed: int) -> list[tuple[float, int]]:
    """(send time, phase index) for a Poisson process with each phase's rate."""
    rng, out, start = random.Random(seed), [], 0.0
    for i, ph in enumerate(phases):
        t = start
        while ph.rate > 0:
            t += rng.expovariate(ph.rate)
            if t >= start + ph.seconds:
                break
            out.append((t, i))
        start += ph.seconds
    return out


def load_prompts(path: str | None) -> list[str]:
    if not path:
        return DEMO_PROMPTS
    prompts = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            prompts.append(line)
            continue
        if isinstance(rec, dict) and "question" in rec:
            prompts.append(f"Question: {rec['question']}\nAnswer: ")
        elif isinstance(rec, dict) and "prompt" in rec:
            prompts.append(rec["prompt"])
        else:
            prompts.append(str(rec))
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts")
    return prompts


def scrape(text: str) -> dict[str, float]:
    """The unlabelled and summed-over-labels values of the series the report needs."""
    want = {"mlora_queue_depth", "mlora_running_requests", "mlora_current_auto_rank", "mlora_generated_tokens_total"}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{")[0]
        if name in want:
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def run(url: str, phases: list[Phase], prompts: list[str], rank: str, max_new_tokens: int,
              api_key: str | None, seed: int, progress: bool = True) -> Report:
    report = Report(url, phases, rank, max_new_tokens)
    plan = arrivals(phases, seed)
    total = sum(p.seconds for p in phases)
    rank_value: int | str = rank if rank == "auto" else int(rank)
    async with AsyncClient(url, api_key=api_key, timeout=600) as client, \
            httpx.AsyncClient(base_url=url, timeout=5) as http:
        t0 = time.monotonic()

        async def one(i: int, at: float, phase: int) -> None:
            rec = RequestRecord(sent_s=round(at, 4), phase=phase)
            report.requests.append(rec)
            sent = time.monotonic()
            try:
                res = await client.generate(prompts[i % len(prompts)], rank=rank_value,
                                            max_new_tokens=max_new_tokens, ignore_eos=True)
                rec.status, rec.rank = "ok", res.rank
                rec.ttft_s, rec.queue_s = res.timings.ttft_s, res.timings.queue_s
                rec.completion_tokens = res.usage.completion_tokens
            except ClientError as e:
                rec.status = {429: "overloaded", 504: "timeout"}.get(e.status, "error")
                rec.error = e.message[:200]
            except httpx.HTTPError as e:
                rec.status, rec.error = "error", str(e)[:200]
            rec.latency_s = round(time.monotonic() - sent, 4)

        async def sender() -> None:
            tasks = []
            for i, (at, phase) in enumerate(plan):
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                tasks.append(asyncio.create_task(one(i, at, phase)))
            await asyncio.gather(*tasks)

        async def sampler() -> None:
            prev_tokens = None
            sec = 0
            while True:
                await asyncio.sleep(max(0.0, t0 + sec + 1 - time.monotonic()))
                sec += 1
                try:
                    m = scrape((await http.get("/metrics")).text)
                except httpx.HTTPError:
                    m = {}
                tokens = m.get("mlora_generated_tokens_total")
                done = [r for r in report.requests if r.latency_s is not None and sec - 1 <= r.sent_s + r.latency_s < sec]
                lat = sorted(r.latency_s for r in done if r.status == "ok")
                report.seconds.append(SecondRecord(
                    t=sec, offered=sum(1 for at, _ in plan if sec - 1 <= at < sec), completed=len(lat),
                    queue_depth=m.get("mlora_queue_depth"), running=m.get("mlora_running_requests"),
                    auto_rank=m.get("mlora_current_auto_rank"),
                    tokens_per_s=None if tokens is None or prev_tokens is None else tokens - prev_tokens,
                    p50_s=percentile(lat, 0.5), p95_s=percentile(lat, 0.95)))
                prev_tokens = tokens
                if progress:
                    s = report.seconds[-1]
                    print(f"\r  t={sec:4d}/{total:.0f}s  sent {sum(1 for r in report.requests):5d}  "
                          f"queue {s.queue_depth or 0:4.0f}  auto rank {s.auto_rank if s.auto_rank is not None else '-':>4}"
                          f"  tok/s {s.tokens_per_s or 0:6.1f}  ", end="", file=sys.stderr, flush=True)

        sampling = asyncio.create_task(sampler())
        await sender()
        await asyncio.sleep(1.1)  # one last sample after the final answer
        sampling.cancel()
        if progress:
            print(file=sys.stderr)
    report.requests.sort(key=lambda r: r.sent_s)
    return report


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-quantile of already sorted values (nearest rank); None when there are none."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarise(report: Report) -> list[dict]:
    """Per phase: offered and completed rates, latency percentiles, ranks served, failures."""
    rows, start = [], 0.0
    for i, ph in enumerate(report.schedule):
        reqs = [r for r in report.requests if r.phase == i]
        ok = sorted(r.latency_s for r in reqs if r.status == "ok")
        ranks = [r.rank for r in reqs if r.rank is not None]
        done_in = [r for r in report.requests if r.status == "ok" and start <= r.sent_s + r.latency_s < start + ph.seconds]
        rows.append({"phase": i, "offered_rps": ph.rate, "seconds": ph.seconds, "sent": len(reqs),
                     "ok": len(ok), "completed_rps": round(len(done_in) / ph.seconds, 3),
                     "p50_s": percentile(ok, 0.5), "p95_s": percentile(ok, 0.95),
                     "mean_rank": round(statistics.mean(ranks), 2) if ranks else None,
                     "overloaded": sum(r.status == "overloaded" for r in reqs),
                     "failed": sum(r.status in ("error", "timeout") for r in reqs)})
        start += ph.seconds
    return rows


def write_report(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"url": report.url, "schedule": [asdict(p) for p in report.schedule], "rank": report.rank,
           "max_new_tokens": report.max_new_tokens, "summary": summarise(report),
           "requests": [asdict(r) for r in report.requests], "seconds": [asdict(s) for s in report.seconds]}
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "report.json")
    plot(report, out / "report.png")


def load_report(path: Path) -> Report:
    """A ``report.json`` written by :func:`write_report`, back as a :class:`Report`."""
    doc = json.loads(Path(path).read_text())
    return Report(url=doc["url"], schedule=[Phase(**p) for p in doc["schedule"]], rank=doc["rank"],
                  max_new_tokens=doc["max_new_tokens"], requests=[RequestRecord(**r) for r in doc["requests"]],
                  seconds=[SecondRecord(**x) for x in doc["seconds"]])


def _completions(report: Report) -> list[tuple[float, float, int | None]]:
    """(completion time, latency, rank) of every successful request, in completion order."""
    return sorted((r.sent_s + r.latency_s, r.latency_s, r.rank) for r in report.requests
                  if r.status == "ok" and r.latency_s is not None)


def rolling_p95(report: Report, window_s: float = 10.0) -> tuple[list[float], list[float]]:
    """(completion times, p95 latency of the completions in the ``window_s`` seconds up to each)."""
    done = _completions(report)
    return [d[0] for d in done], [percentile(sorted(x[1] for x in done if end - window_s < x[0] <= end), 0.95)
                                  for end, _, _ in done]


def plot(report: Report, path: Path, window_s: float = 10.0) -> None:
    """Four panels over time: load and queue, the auto rank, every request's latency (a dot at
    its completion, coloured by its rank) with the p95 of the last ``window_s`` seconds of
    completions, and the server's tokens/s. Dashed lines mark the phase boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report.seconds
    t = [x.t for x in s]
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True, layout="constrained")
    axes[0].step(t, [x.offered for x in s], where="post", label="offered (req/s)")
    axes[0].step(t, [x.completed for x in s], where="post", label="completed (req/s)")
    axes[0].plot(t, [x.queue_depth or 0 for x in s], label="queue depth")
    axes[1].plot(t, [x.auto_rank if x.auto_rank is not None else float("nan") for x in s], color="C3")
    axes[1].set_ylabel("auto rank")
    done = _completions(report)
    if done:
        ranks = [d[2] if d[2] is not None else 0 for d in done]
        dots = axes[2].scatter([d[0] for d in done], [d[1] for d in done], s=9, c=ranks, cmap="viridis",
                               vmin=0, vmax=max(max(ranks), 1))
        fig.colorbar(dots, ax=list(axes), label="rank (latency dots)", pad=0.01, fraction=0.03)
        axes[2].plot(*rolling_p95(report, window_s), color="C1", label=f"p95 of the last {window_s:.0f} s")
        axes[2].legend(loc="upper left")
    axes[2].set_ylabel("latency (s)")
    axes[3].plot(t, [x.tokens_per_s if x.tokens_per_s is not None else float("nan") for x in s], color="C2")
    axes[3].set_ylabel("tokens/s")
    axes[3].set_xlabel("time (s)")
    axes[0].legend(loc="upper left")
    edge = 0.0
    for ph in report.schedule[:-1]:
        edge += ph.seconds
        for ax in axes:
            ax.axvline(edge, color="0.6", linestyle="--", linewidth=0.8)
    fig.suptitle(f"client bench: rank={report.rank}, {report.max_new_tokens} new tokens/request")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_summary(rows: list[dict]) -> None:
    head = f"{'phase':>5} {'offered':>8} {'sent':>5} {'ok':>5} {'done/s':>7} {'p50 s':>7} {'p95 s':>7} " \
           f"{'rank':>5} {'429':>4} {'fail':>4}"
    print(head)
    for r in rows:
        f = (lambda v: f"{v:7.2f}" if v is not None else f"{'-':>7}")
        print(f"{r['phase']:>5} {r['offered_rps']:>8.2f} {r['sent']:>5} {r['ok']:>5} {r['completed_rps']:>7.2f} "
              f"{f(r['p50_s'])} {f(r['p95_s'])} {r['mean_rank'] if r['mean_rank'] is not None else '-':>5} "
              f"{r['overloaded']:>4} {r['failed']:>4}")


def add_parser(sub, parents=()) -> None:
    b = sub.add_parser("bench", help="open-loop Poisson load; writes report.json and report.png", parents=list(parents))
    b.add_argument("--schedule", required=True, help="RATE:SECONDS,... e.g. 2:30,8:30,2:30")
    b.add_argument("--prompts", help="JSONL ({question} or {prompt}) or plain lines; default: built-in")
    b.add_argument("--rank", default="auto", help="rank of every request: an integer or auto")
    b.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (EOS ignored)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="folder for report.json and report.png")
    b.add_argument("--quiet", action="store_true", help="no progress line")


def run_bench(args: argparse.Namespace) -> int:
    try:
        phases = parse_schedule(args.schedule)
        prompts = load_prompts(args.prompts)
        if args.rank != "auto":
            int(args.rank)
    except (ValueError, OSError) as e:
        print(f"client bench: error: {e}", file=sys.stderr)
        return 2
    report = asyncio.run(run(args.url, phases, prompts, args.rank, args.max_new_tokens, args.api_key, args.seed,
                             progress=not args.quiet))
    write_report(report, Path(args.out))
    print_summary(summarise(report))
    print(f"report written to {args.out}/report.json and report.png")
    return 0
