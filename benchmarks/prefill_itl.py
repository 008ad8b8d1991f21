"""Does a long prompt stall the rows that are decoding? Inter-token latency with and without them.

One server per variant (``--variants``: name=server flags; by default whole-prompt prefill,
pieces of a fixed 256 tokens, and the default: pieces of at most 256 tokens sized to add 0.8 of
a decode step), started together and measured in turns. Each measurement runs ``--clients`` streaming
requests (short GSM8K prompts, ``--max-tokens`` each, ``ignore_eos``) to completion and records
every gap between their streamed tokens (ITL). It does so twice per round:

* ``quiet``  the decoding clients alone;
* ``long``   the same, while ``--long-tokens``-token prompts arrive (one every ``--long-every-s``,
             each asking 1 token), as documents to summarise would.

Printed per setting: ITL p50/p95 quiet and long (median over rounds), their ratio, p99 and max
while long prompts arrive (the stall a whole-prompt prefill causes shows there, not at p95), and
the long prompts' time to first token (each awaited to the end, so that the next measurement
starts on an idle server). Goal (issue "Performance against a real peer engine"): ITL p95
long ÷ quiet ≤ 2.

    python benchmarks/prefill_itl.py [--variants 'whole=--prefill-chunk-tokens 0;…'] [--rounds 2] | tee benchmarks/prefill_itl.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import statistics
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line, medians, prompts, q, serve, stream_completion, untrained_adapter  # noqa: E402


async def measure(url: str, texts: list[str], long_text: str | None, args) -> dict:
    async with httpx.AsyncClient(timeout=900) as client:
        decoding = [asyncio.create_task(stream_completion(client, url, f"mlora@{args.rank}", t, args.max_tokens)) for t in texts]
        long_ttfts, done = [], asyncio.Event()

        async def long_arrivals() -> None:  # while the streams run: wait long_every_s, send one, await it
            while not done.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), args.long_every_s)
                if not done.is_set():  # the last one is awaited to its end, not cancelled: the server is idle after
                    long_ttfts.append((await stream_completion(client, url, f"mlora@{args.rank}", long_text, 1))["ttft"])

        arrivals = asyncio.create_task(long_arrivals()) if long_text else None
        results = await asyncio.gather(*decoding)
        done.set()
        if arrivals is not None:
            await asyncio.wait_for(arrivals, 600)
    gaps = sorted(g for r in results for g in r["gaps"])
    return {"p50": q(gaps, 0.5), "p95": q(gaps, 0.95), "p99": q(gaps, 0.99), "max": gaps[-1], "long": len(long_ttfts),
            "long_ttft": statistics.median(long_ttfts) if long_ttfts else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="whole=--prefill-chunk-tokens 0;fixed 256=--prefill-chunk-tokens 256 "
                    "--prefill-piece-budget 0;default=", help="name=server flags, ';'-separated")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--long-tokens", type=int, default=2048)
    ap.add_argument("--long-every-s", type=float, default=3.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import tempfile

    from transformers import AutoTokenizer

    from trainer.models import resolve_model_path

    variants = dict(v.split("=", 1) for v in args.variants.split(";"))
    chunks = list(variants)
    ckpt = untrained_adapter(args.model, Path(tempfile.mkdtemp(prefix="prefill-itl-")) / "nested", r=max(args.rank, 16))
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    texts = prompts(args.clients)
    filler = " ".join(prompts(200))
    long_text = tok.decode(tok(filler)["input_ids"][: args.long_tokens])
    runs: dict[tuple[str, str], list[dict]] = {(c, m): [] for c in chunks for m in ("quiet", "long")}
    with contextlib.ExitStack() as stack:
        urls = {c: stack.enter_context(serve(args.model, ckpt, *variants[c].split(),
                                             "--max-batch-size", str(args.clients + 2), "--controller", "off",
                                             "--calibrate-steps", "0"))
                for c in chunks}
        for c in chunks:  # warm-up, not measured
            asyncio.run(measure(urls[c], texts[:2], None, argparse.Namespace(**{**vars(args), "max_tokens": 4})))
        for rnd in range(args.rounds):
            for c in (chunks if rnd % 2 == 0 else chunks[::-1]):
                for mode in (("quiet", "long") if rnd % 2 == 0 else ("long", "quiet")):
                    runs[(c, mode)].append(asyncio.run(measure(urls[c], texts, long_text if mode == "long" else None,
                                                               args)))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    med = medians(runs)
    print(f"# prefill_itl  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(machine_line())
    print(f"# model {args.model}, untrained r={max(args.rank, 16)} adapter, rank {args.rank}; {args.clients} decoding streams × "
          f"{args.max_tokens} tokens; 'long': a {args.long_tokens}-token prompt every {args.long_every_s:g} s; "
          f"median of {args.rounds} rounds")
    print(f"{'variant':>10} {'ITL p50 quiet':>14} {'p95 quiet':>10} {'p50 long':>9} {'p95 long':>9} {'p95 ÷':>6} "
          f"{'p99 long':>9} {'max long':>9} {'long prompts':>12} {'their TTFT':>10}")
    for c in chunks:
        qu, lo = med[(c, "quiet")], med[(c, "long")]
        print(f"{c:>10} {qu['p50'] * 1e3:12.0f}ms {qu['p95'] * 1e3:8.0f}ms {lo['p50'] * 1e3:7.0f}ms "
              f"{lo['p95'] * 1e3:7.0f}ms {lo['p95'] / qu['p95']:6.2f} {lo['p99'] * 1e3:7.0f}ms {lo['max'] * 1e3:7.0f}ms "
              f"{lo['long']:12.0f} {lo['long_ttft']:9.1f}s")
    print("# p95 hides a whole-prompt prefill (a few long gaps among hundreds); p99 and max show the stall")
    for c in chunks:
        r = med[(c, "long")]["p95"] / med[(c, "quiet")]["p95"]
        print(f"goal {c} ({variants[c] or 'server defaults'}): ITL p95 long ÷ quiet ≤ 2: {r:.2f} {'PASS' if r <= 2 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
