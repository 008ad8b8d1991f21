"""Continuous batching through the real server vs ``model.generate``, same model, rank and prompts.

Three ways to produce ``max_new_tokens`` tokens for each of N prompts (EOS ignored, so every
way does the same work), in one run:

* ``sequential``  ``model.generate`` one prompt at a time (what a naive server does);
* ``static``      one left-padded ``model.generate`` batch of all N prompts (the static-batching
                  ceiling: no request can join or leave, but nothing is wasted here either);
* ``server``      N concurrent clients against ``python -m server`` on 127.0.0.1 (HTTP, JSON,
                  continuous batching, per-row ranks).

Goals (issue "Serving engine"): server ≥ 5× sequential and ≥ 0.9× static. The reference points
measured on this machine for transformers' own continuous batching were 4.6× and 0.78×.

    python benchmarks/serve_throughput.py [--model smollm2-135m] [--clients 16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line, prompts, serve  # noqa: E402
from trainer.checkpoint import save_adapter  # noqa: E402
from trainer.inject import AdapterConfig, NestedAdapter  # noqa: E402
from trainer.models import load_model, resolve_dtype  # noqa: E402


def generate_rate(model, tok, texts: list[str], new_tokens: int) -> float:
    """Tokens/s of one left-padded ``generate`` call over ``texts`` (greedy, EOS ignored)."""
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return len(texts) * new_tokens / dt


async def server_rate(url: str, texts: list[str], rank: int, new_tokens: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(text: str) -> int:
            r = await client.post("/generate", json={"prompt": text, "rank": rank, "max_new_tokens": new_tokens,
                                                     "ignore_eos": True})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        await one(texts[0])  # warm-up
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(t) for t in texts))
        dt = time.perf_counter() - t0
    assert all(n == new_tokens for n in done)
    return sum(done) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=16, help="adapter r, and the rank every request uses")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequential-prompts", type=int, default=4, help="sequential rate measured on this many")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="every way's dtype; auto: what the server's --dtype auto picks here")
    args = ap.parse_args()

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    dtype_name = str(dtype).removeprefix("torch.")
    model, tok = load_model(args.model, "cpu", dtype)
    torch.manual_seed(0)
    adapter = NestedAdapter.inject(model, AdapterConfig(r=args.rank))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=0.01)
            layer.to(dtype)
    adapter.set_rank(args.rank)
    texts = prompts(args.clients)

    generate_rate(model, tok, texts[:1], 4)  # warm-up
    seq = sum(generate_rate(model, tok, [t], args.new_tokens) for t in texts[:args.sequential_prompts])
    seq /= args.sequential_prompts
    statics, served = [], []
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(Path(tmp) / "ckpt", adapter, args.model)
        with serve(args.model, Path(tmp) / "ckpt", "--max-batch-size", str(args.clients),
                   "--calibrate-steps", "0", "--dtype", dtype_name) as url:
            for _ in range(args.reps):  # interleaved, so that machine noise hits both alike
                statics.append(generate_rate(model, tok, texts, args.new_tokens))
                served.append(asyncio.run(server_rate(url, texts, args.rank, args.new_tokens)))
    static, served_best = max(statics), max(served)

    print(f"# serve_throughput  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(machine_line())
    print(f"# torch {torch.__version__}, cpu, {dtype_name} (every way), threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"# model {args.model}, adapter r={args.rank} served at rank {args.rank}, {args.clients} prompts "
          f"(GSM8K test), {args.new_tokens} new tokens each, EOS ignored")
    print(f"# best of {args.reps} interleaved runs (all runs listed)")
    print(f"{'way':<34} {'tok/s':>8}   runs")
    print(f"{'sequential model.generate (batch 1)':<34} {seq:8.1f}")
    print(f"{'static model.generate (batch ' + str(args.clients) + ')':<34} {static:8.1f}   "
          + " ".join(f"{v:.1f}" for v in statics))
    print(f"{'server, ' + str(args.clients) + ' concurrent clients':<34} {served_best:8.1f}   "
          + " ".join(f"{v:.1f}" for v in served))
    for name, ratio, goal in [("server ÷ sequential", served_best / seq, 5.0),
                              ("server ÷ static", served_best / static, 0.9)]:
        print(f"{name:<22} {ratio:6.2f}  (goal ≥ {goal})  {'PASS' if ratio >= goal else 'MISS'}")


if __name__ == "__main__":
    main()
