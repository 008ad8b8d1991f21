"""Does ``--compile decode`` serve the function the default server serves? Three real servers, one
after the other, answer the same GSM8K prompts greedily at rank 0 over ``/v1/completions``: the
default (bf16 where the CPU has it, lean decode), the same with ``--compile decode``, and an fp32
transformers-forward server as the reference. Prints how many completions are identical between
each pair; bf16 near-ties go either way, so the figure that matters is whether the compiled server
is as close to the fp32 reference as the default one is.

    python benchmarks/compiled_agreement.py [--prompts 16] [--max-tokens 48] | tee benchmarks/compiled_agreement.txt
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_line, prompts, serve, untrained_adapter  # noqa: E402

SERVERS = {"default": [], "compiled": ["--compile", "decode"],
           "fp32": ["--dtype", "float32", "--decode", "transformers"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    ckpt = untrained_adapter(args.model, Path(tempfile.mkdtemp(prefix="compiled-agreement-")) / "nested")
    texts = prompts(args.prompts)
    outs: dict[str, list[str]] = {}
    ready: dict[str, float] = {}
    for name, extra in SERVERS.items():
        t0 = time.perf_counter()
        with serve(args.model, ckpt, *extra) as url:
            ready[name] = time.perf_counter() - t0
            compute = httpx.get(url + "/ranks").json()["compute"]
            if name == "compiled" and not compute["compiled_rank0_decode"]:
                raise RuntimeError(f"--compile decode is not on: {compute}")
            outs[name] = [httpx.post(url + "/v1/completions", timeout=300, json={
                "model": "mlora@0", "prompt": t, "max_tokens": args.max_tokens, "temperature": 0}).json()
                ["choices"][0]["text"] for t in texts]

    print(f"# compiled_agreement  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(machine_line())
    print(f"# model {args.model} at rank 0 (untrained r=16 adapter), {args.prompts} GSM8K prompts × "
          f"{args.max_tokens} greedy tokens, /v1/completions one at a time")
    print("# ready in: " + ", ".join(f"{n} {s:.0f} s" for n, s in ready.items()))
    for a, b in (("compiled", "default"), ("default", "fp32"), ("compiled", "fp32")):
        same = sum(x == y for x, y in zip(outs[a], outs[b]))
        print(f"identical completions, {a} vs {b}: {same}/{len(texts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
