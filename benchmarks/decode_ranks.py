"""What a rank costs when decoding: tokens/s at each rank ÷ tokens/s at rank 0 (the base model).

Same model, same batch, same prompts, one run; every variant is measured once per round, in a
new random order each round (the adapter is put in each variant's state right before it runs),
so machine noise and position effects hit every variant alike. Measured on the engine's model runner
(``server.runner.ModelRunner``: left-padded KV batch, per-row ranks), i.e. the serving path
without HTTP, decode steps lean where the server's are (``--decode auto``: server.decoder). Rows:

* ``rank k``                every row at rank k, adapter unmerged, each module its own ops (server
                            ``--fuse false``; the default with standard GEMMs)
* ``rank k (fused)``        the same, siblings fused (``NestedAdapter.fuse``, one GEMM for q/k/v and their
                            A, one for gate/up: server ``--fuse true``; the default with packed GEMMs)
* ``mixed``                 rows spread over all ranks (cost should follow the largest rank present)
* ``merged@k, rank k``      rank k folded into the weights (``--merge-rank auto`` once rank k dominates):
                            costs what the base costs
* ``merged@64, rank 8|mixed``  rows at other ranks pay for their difference c_k − c_64

Every variant runs with the server's ``--gemm`` choice (``auto``: the GEMM mode a cached probe
measures fastest here, :mod:`trainer.kernels`: oneDNN-packed weights, weight-major or standard);
``--vs-standard`` adds each variant computed the standard way (``… [F.linear]``). Ratios divide
by rank 0 of the same path (fused by fused, standard by standard).

Goals (issue "an adapter whose cost follows its rank"): unmerged rank 1 ≥ 0.97 of rank 0; rank r
at the memory-bandwidth floor (a decode step reads every weight once, so rank r can be no faster
than ``base weights ÷ (base weights + adapter weights at rank r)`` of rank 0; printed); merged
≥ 0.98. Judged on the best of the repetitions (the run least disturbed by other load; medians are
printed too).

    python benchmarks/decode_ranks.py [--model smollm2-135m] [--batch 8] [--steps 32] [--reps 5]
        [--only REGEX] [--vs-standard] [--vs-transformers]
"""

from __future__ import annotations

import argparse
import datetime
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line  # noqa: E402
from server.runner import ModelRunner  # noqa: E402
from trainer.inject import AdapterConfig, NestedAdapter  # noqa: E402
from trainer.kernels import resolve_gemm, use_gemm  # noqa: E402
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
    ap.add_argument("--only", help="regex: measure only the variants whose name matches (rank 0 always)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--gemm", default="auto", choices=["auto", "standard", "weight-major", "packed"])
    ap.add_argument("--decode", default="auto", choices=["auto", "transformers"],
                    help="the server's --decode: auto runs decode steps lean where the probe agrees (server.decoder)")
    ap.add_argument("--vs-standard", action="store_true", help="also every variant with standard GEMMs")
    ap.add_argument("--vs-transformers", action="store_true",
                    help="also every variant with decode steps through transformers' forward (… [transformers])")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok = load_model(args.model, device, dtype)
    mode = resolve_gemm(args.gemm, device, dtype, model=model)  # probed on the base model's forward
    torch.manual_seed(0)
    adapter = NestedAdapter.inject(model, AdapterConfig(r=args.rank))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=0.01)
            layer.to(dtype)
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    lean = args.decode == "auto" and runner.enable_lean_decode()
    lean_step = runner.lean
    ids = tok(PROMPT)["input_ids"]
    prompts = [ids[: len(ids) - i % 4] for i in range(args.batch)]  # slightly ragged, as in serving
    R = adapter.config.ranks
    top = R[-1]
    mixed = [[0, *R][i % (len(R) + 1)] for i in range(args.batch)]
    # name → (row ranks, merged rank or None, fused, GEMM mode)
    plain: dict[str, tuple[list[int], int | None, bool]] = {
        f"rank {k}": ([k] * args.batch, None, False) for k in [0, *R]}
    plain["mixed (all ranks)"] = (mixed, None, False)
    for k in R:
        plain[f"merged@{k}, rank {k}"] = ([k] * args.batch, k, False)
    plain[f"merged@{top}, rank 8"] = ([8] * args.batch, top, False)
    plain[f"merged@{top}, mixed"] = (mixed, top, False)
    for k in sorted({0, 1, 2, 8, top}):
        plain[f"rank {k} (fused)"] = ([k] * args.batch, None, True)
    plain["mixed (all ranks) (fused)"] = (mixed, None, True)
    variants = {name: (*v, mode, lean) for name, v in plain.items()}  # …, GEMM mode, lean decode
    if args.vs_standard:
        variants |= {f"{name} [F.linear]": (*v, "standard", lean) for name, v in plain.items()}
    if args.vs_transformers and lean:
        variants |= {f"{name} [transformers]": (*v, mode, False) for name, v in plain.items()}

    if args.only:
        variants = {n: v for n, v in variants.items()
                    if re.match(r"rank 0( \(fused\))?( \[(F.linear|transformers)\])?$", n)
                    or re.search(args.only, n.removesuffix(" [transformers]").removesuffix(" [F.linear]"))}
    times: dict[str, list[float]] = {name: [] for name in variants}
    remerge_s = []
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        order = list(variants.items())
        random.Random(rep).shuffle(order)
        for name, (ranks, merged, fused, gemm, lean_on) in order:
            adapter.fuse() if fused else adapter.unfuse()
            use_gemm(model, gemm)
            runner.lean = lean_step if lean_on else None
            t0 = time.perf_counter()
            runner.remerge(0 if merged is None else merged)  # 0: the plain base weights (unmerged)
            remerge_s.append(time.perf_counter() - t0)
            tps = decode_tokens_per_s(runner, prompts, ranks, args.steps)
            if rep:
                times[name].append(tps)
        print(f"round {rep}/{args.reps} done", file=sys.stderr)
    adapter.unfuse()
    adapter.unmerge()

    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: max(v) for name, v in times.items()}  # least disturbed by other load on the machine

    def base_of(name: str) -> str:  # rank 0 of the same path
        return ("rank 0" + " (fused)" * ("(fused)" in name) + " [F.linear]" * ("[F.linear]" in name)
                + " [transformers]" * ("[transformers]" in name))

    print(f"# decode_ranks  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(machine_line())
    print(f"# device {device}, dtype {dtype}, threads {torch.get_num_threads()}")
    print(f"# model {args.model}, adapter r={args.rank} on {len(adapter.layers)} modules, batch {args.batch}, "
          f"{args.steps} decode steps, {args.reps} interleaved reps; GEMMs {mode} (--gemm {args.gemm}); decode steps "
          f"{'lean' if lean else 'through transformers'} (--decode {args.decode})")
    print("# 'rank 0' and 'merged@k, rank k' run the same computation (base-model cost): their gap is noise")
    print(f"{'variant':<38} {'best tok/s':>10} {'÷ rank 0':>9} {'median':>8} {'÷ rank 0':>9}")
    for name, v in med.items():
        b = base_of(name)
        print(f"{name:<38} {best[name]:10.1f} {best[name] / best[b]:9.3f} {v:8.1f} {v / med[b]:9.3f}")
    if args.vs_standard:
        print(f"# {mode} ÷ standard (best): " + ", ".join(
            f"{n} {best[n] / best[n + ' [F.linear]']:.2f}" for n in plain if n in best and n + " [F.linear]" in best))
    if args.vs_transformers and lean:
        print("# lean ÷ transformers' forward (best): " + ", ".join(
            f"{n} {best[n] / best[n + ' [transformers]']:.2f}" for n in plain
            if n in best and n + " [transformers]" in best))
    print(f"# one re-merge (rebuild W0 + dW_k in {len(adapter.layers)} layers) took "
          f"{statistics.median(remerge_s[len(variants):]):.3f} s (median)")
    base_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    floors = {k: base_w / (base_w + k * sum(l.base.in_features + l.base.out_features
                                            for l in adapter.layers.values())) for k in R}
    print(f"# memory-bandwidth floor of rank k ÷ rank 0 = base linear weights ({base_w / 1e6:.1f} M, lm_head "
          f"included) ÷ (those + k·Σ(in+out) adapter weights): "
          + ", ".join(f"r{k} {f:.3f}" for k, f in floors.items()))

    def goal(name: str, target: float, what: str) -> None:
        if name in med:
            ratio = best[name] / best[base_of(name)]
            print(f"goal {name} ≥ {target:.3f} ({what}): {ratio:.3f} {'PASS' if ratio >= target else 'MISS'}")

    goal("rank 1", 0.97, "unmerged rank 1")
    goal("rank 1 (fused)", 0.97, "unmerged rank 1, fused")
    goal(f"rank {top}", 0.97 * floors[top], f"97% of the floor {floors[top]:.3f}")
    goal(f"rank {top} (fused)", 0.97 * floors[top], f"97% of the floor {floors[top]:.3f}, fused")
    for k in R:
        goal(f"merged@{k}, rank {k}", 0.98, "merged")


if __name__ == "__main__":
    main()
