"""What the benchmark scripts share: a real server process on 127.0.0.1, prompts, a streamed
completion timed token by token, the CPU's name."""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from trainer.data import GSM8K_PROMPT, demo_records

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serve(model: str, ckpt: Path, *extra: str, ready_timeout_s: float = 600,
          on_start: Callable[[subprocess.Popen], None] | None = None) -> Iterator[str]:
    """``python -m server`` on a free loopback port; yields its URL, terminates it after.
    ``on_start`` receives the process (e.g. to read its memory)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--adapter", str(ckpt),
                             "--port", str(port), "--log-level", "warning", *extra], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    if on_start is not None:
        on_start(proc)
    try:
        end = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise RuntimeError("server not ready in time")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def untrained_adapter(model: str, folder: Path, r: int = 16, std: float = 0.01) -> Path:
    """A nested adapter with random A and B ~ N(0, std) (the server's work does not depend on
    training)."""
    import torch

    from trainer.checkpoint import save_adapter
    from trainer.inject import AdapterConfig, NestedAdapter
    from trainer.models import load_model

    base, _ = load_model(model, "cpu", torch.float32)
    torch.manual_seed(0)
    adapter = NestedAdapter.inject(base, AdapterConfig(r=r))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=std)
    return save_adapter(folder, adapter, model)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prompts(n: int) -> list[str]:
    """The first n GSM8K test questions in the training prompt (demo records without the data)."""
    gsm8k = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in gsm8k.read_text().splitlines()[:n]] if gsm8k.exists() else demo_records(n)
    return [GSM8K_PROMPT.format(question=r["question"]) for r in rows]


def documents(n: int, tokens: int, model: str) -> list[str]:
    """n distinct prompts of exactly ``tokens`` tokens of ``model``'s tokenizer (GSM8K questions
    end to end, each document starting at another question: no two share a prefix, so an engine's
    prefix cache cannot skip their prefill)."""
    from transformers import AutoTokenizer

    from trainer.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model))
    pool = prompts(200 + n)
    out = []
    for i in range(n):
        ids = tok(" ".join(pool[i * 7 % len(pool):] + pool))["input_ids"][:tokens]
        if len(ids) < tokens:
            raise ValueError(f"not enough text for {tokens}-token documents")
        out.append(tok.decode(ids))
    return out


async def stream_completion(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed ``/v1/completions`` (greedy, ``ignore_eos``): its TTFT, the gap before each
    later token (a chunk's gap ÷ the tokens it carries) and its token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    t0 = time.perf_counter()
    first, last, tokens, gaps = None, None, 0, []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} {model}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            used = (chunk.get("usage") or {}).get("completion_tokens")
            if not chunk.get("choices") or used is None or used <= tokens:
                continue
            now, n = time.perf_counter(), used - tokens
            if first is None:
                first = now
            else:
                gaps.extend([(now - last) / n] * n)
            last, tokens = now, used
    if tokens != max_tokens:
        raise RuntimeError(f"{url} {model}: {tokens} tokens streamed, {max_tokens} asked (ignore_eos)")
    return {"ttft": first - t0, "gaps": gaps, "tokens": tokens}


def q(values: list[float], p: float) -> float:
    """The p-quantile of sorted values (nearest rank)."""
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def medians(runs: dict) -> dict:
    """{cell: [{metric: value}, …] per round} → {cell: {metric: median over rounds}}."""
    return {cell: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for cell, rs in runs.items()}


def machine_line() -> str:
    """What a benchmark's figures depend on: the CPU, its vector capability, torch."""
    import torch

    return (f"# cpu {cpu_name()}, {os.cpu_count()} cpus, torch capability {torch.backends.cpu.get_cpu_capability()}; "
            f"torch {torch.__version__}")
