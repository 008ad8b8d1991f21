"""What a rank costs when decoding: tokens/s at each rank ÷ tokens/s at rank 0 (the base model).

Same model, same batch, same prompts, one run; the variants are interleaved round-robin and the
median of the repetitions is reported, so machine noise hits every variant alike. Measured on the
engine's model runner (``server.runner.ModelRunner``: left-padded KV batch, per-row ranks), i.e.
the serving path without HTTP. Rows:

* ``rank k``            every row at rank k, adapter unmerged
* ``mixed``             rows spread over all ranks (cost should follow the largest rank present)
* ``merged@r, rank r``  rank r folded into the weights: the all-max-rank batch costs what the base costs
* ``merged@r, rank k``  … and a row at rank k < r pays for the difference c_k − c_r

Goals (issue "Serving engine"): rank 64 ≥ 0.85 and rank 8 ≥ 0.97 of rank 0, unmerged (judged on
the best of the repetitions, the run least disturbed by other load; medians are printed too).

    python benchmarks/decode_ranks.py [--model smollm2-135m] [--batch 8] [--steps 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.runner import ModelRunner  # noqa: E402
from trainer.inject import AdapterConfig, NestedAdapter  # noqa: E402
from trainer.models import load_model, resolve_device, resolve_dtype  # noqa: E402

PROMPT = "Question: Ada has 12 apples and gets 7 more. How many apples does she have now?\nAnswer: "


def decode_tokens_per_s(runner: ModelRunner, prompts: list[list[int]], ranks: list[int], steps: int) -> float:
    runner.reset()
    new = runner.prefill(prompts, ranks)
    runner.join(new)
    tokens = new.logits.argmax(-1).tolist()
    sync(runner.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = runner.decode(tokens).argmax(-1).tolist()
    sync(runner.device)
    return len(prompts) * steps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok = load_model(args.model, device, dtype)
    torch.manual_seed(0)
    adapter = NestedAdapter.inject(model, AdapterConfig(r=args.rank))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=0.01)
            layer.to(dtype)
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    ids = tok(PROMPT)["input_ids"]
    prompts = [ids[: len(ids) - i % 4] for i in range(args.batch)]  # slightly ragged, as in serving
    R = adapter.config.ranks
    top = R[-1]
    variants: dict[str, tuple[list[int], int | None]] = {f"rank {k}": ([k] * args.batch, None) for k in [0, *R]}
    variants["mixed (all ranks)"] = ([[0, *R][i % (len(R) + 1)] for i in range(args.batch)], None)
    variants[f"merged@{top}, rank {top}"] = ([top] * args.batch, top)
    variants[f"merged@{top}, rank 8"] = ([8] * args.batch, top)
    variants[f"merged@{top}, rank 0"] = ([0] * args.batch, top)

    times: dict[str, list[float]] = {name: [] for name in variants}
    # two blocks: unmerged variants interleaved, then (merged once) the merged ones interleaved
    for merged_block in (None, top):
        block = {n: r for n, (r, m) in variants.items() if m == merged_block}
        if merged_block is not None:
            adapter.merge(merged_block)
        for rep in range(args.reps + 1):  # the first round warms up and is dropped
            for name, ranks in block.items():
                tps = decode_tokens_per_s(runner, prompts, ranks, args.steps)
                if rep:
                    times[name].append(tps)
            print(f"{'merged' if merged_block else 'unmerged'} round {rep}/{args.reps} done", file=sys.stderr)
        if merged_block is not None:
            adapter.unmerge()

    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: max(v) for name, v in times.items()}  # least disturbed by other load on the machine
    base, base_best = med["rank 0"], best["rank 0"]
    print(f"# decode_ranks  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# torch {torch.__version__}, device {device}, dtype {dtype}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    print(f"# model {args.model}, adapter r={args.rank} on {len(adapter.layers)} modules, batch {args.batch}, "
          f"{args.steps} decode steps, {args.reps} interleaved reps")
    print("# 'rank 0' and 'merged@r, rank r' run the same computation (base-model cost): their gap is noise")
    print(f"{'variant':<28} {'best tok/s':>10} {'÷ rank 0':>9} {'median':>8} {'÷ rank 0':>9}")
    for name, v in med.items():
        print(f"{name:<28} {best[name]:10.1f} {best[name] / base_best:9.3f} {v:8.1f} {v / base:9.3f}")
    for k, goal in [(top, 0.85), (8, 0.97)]:
        if f"rank {k}" in med:
            ratio = best[f"rank {k}"] / base_best
            print(f"goal rank {k} ≥ {goal}: {ratio:.3f} {'PASS' if ratio >= goal else 'MISS'}")


if __name__ == "__main__":
    main()
