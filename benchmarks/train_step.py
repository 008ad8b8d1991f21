"""Train-step time of the nested LoRA layer: Matryoshka vs LoRA vs DyLoRA, and ours vs PEFT.

What is measured: the wall time of one training step — forward, loss, backward, AdamW step,
zero_grad — in fp32 on the CPU, on one fixed batch, for four variants:

* ``matryoshka``, ``lora``, ``dylora``, ``dylora@r``: our ``NestedLoRALinear`` (r=64,
  R = 1, 2, 4, …, 64, scaling sqrt) on q, k, v, o, gate, up, down. They share one injected model
  (they differ only in the coefficient vector c); each has its own AdamW. DyLoRA draws its rank b
  from R every step with a seeded generator and computes only the first b components, so its cost
  grows with b and its median depends on the draws (they are printed); ``dylora@r`` is DyLoRA's
  step at b = r, the same work as the others.
* ``peft-lora``: PEFT's LoRA (same r, rsLoRA scaling 1/√r, no dropout, same targets) on a
  separately loaded copy of the same base model.

The loss is ``trainer.train.token_loss_sum`` divided by the number of answer tokens, for all.
Before timing, ours and PEFT's LoRA are given identical (non-zero) weights and must give the same
loss on the batch; the absolute difference is printed.

How it is timed: ``--warmup`` untimed steps per variant, then ``--reps`` rounds, each round one
timed step of every variant in turn (round-robin, the starting variant rotating every round), so
that machine noise hits all variants alike. The table gives the median, min and max seconds per
step; the ratios compare medians (PASS/MISS) and, beside them, mins. On a shared CPU another
process's burst can slow a step several-fold; the header prints the load average before and after
timing (this run's own threads add about --threads to the second), and when it is higher than
that the ratio of mins is the steadier estimate. Even on a quiet machine single steps vary by
about ±10%, so 5 rounds give a ratio to about ±5% (one such run measured Matryoshka/LoRA 1.043,
the next, with 15, 0.981): the default is 15 rounds (~12 min).

How to read it: ``Matryoshka/LoRA`` is the cost of training every prefix at once over plain LoRA
(goal ≤ 1.03: the extra work is one length-r coefficient vector instead of a scalar), and
``Matryoshka/DyLoRA@r`` the same against DyLoRA at equal work (goal ≤ 1.03); ``ours/PEFT`` is
our LoRA over PEFT's (goal ≤ 1.00). ``DyLoRA/LoRA`` and ``Matryoshka/DyLoRA`` (no goal) compare
against DyLoRA's average step, which skips the components past its draw b: DyLoRA is cheaper per
step because it trains less of the adapter each step, not because its layer is faster. Run: ``python benchmarks/train_step.py | tee benchmarks/train_step.txt``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `python benchmarks/train_step.py`
os.environ.setdefault("MLORA_CACHE", str(REPO / ".cache"))  # share the dequantised SmolLM2

from trainer.data import IGNORE, DataError, collate, demo_records, read_jsonl, tokenize  # noqa: E402
from trainer.inject import DEFAULT_TARGETS, AdapterConfig, NestedAdapter  # noqa: E402
from trainer.models import load_model  # noqa: E402
from trainer.train import token_loss_sum  # noqa: E402

GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
RANK = 64
OURS = ("matryoshka", "lora", "dylora", "dylora@r")
VARIANTS = (*OURS, "peft-lora")
RATIOS = {"Matryoshka/LoRA": ("matryoshka", "lora"), "Matryoshka/DyLoRA@r": ("matryoshka", "dylora@r"),
          "Matryoshka/DyLoRA": ("matryoshka", "dylora"), "DyLoRA/LoRA": ("dylora", "lora"),
          "ours/PEFT": ("lora", "peft-lora")}  # name → (numerator, denominator) variants
GOALS = {"Matryoshka/LoRA": 1.03, "Matryoshka/DyLoRA@r": 1.03, "ours/PEFT": 1.00}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="local HF folder, hub id or embedded alias")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (cut or padded to it)")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds (one step per variant each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="adapter init and DyLoRA's rank draws")
    args = ap.parse_args(argv)
    for flag in ("batch_size", "seq_len", "reps", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the batch ---------------------------------------------------------------------------------------
def make_batch(tok, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The first GSM8K training problems (the generated demo set if GSM8K is absent), each cut
    to ``seq_len`` tokens and right-padded to exactly ``seq_len``: (B, T) ids, mask, labels."""
    if GSM8K_TRAIN.is_file():
        shape, records = read_jsonl(GSM8K_TRAIN, limit=4 * batch_size)
    else:
        shape, records = "gsm8k", demo_records(4 * batch_size)
    try:
        examples, _ = tokenize(records, shape, tok, max_length=seq_len)
    except DataError as e:
        raise ValueError(f"--seq-len {seq_len} is shorter than every prompt of the batch; raise it") from e
    if len(examples) < batch_size:
        raise ValueError(f"only {len(examples)} examples keep an answer token at --seq-len {seq_len}; raise it")
    batch = collate(examples[:batch_size], tok.pad_token_id)
    return {k: pad_to(v, seq_len, fill) for (k, v), fill in
            zip(batch.items(), (tok.pad_token_id, 0, IGNORE))}


def pad_to(t: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """(B, w) → (B, width), right-padded with ``fill``."""
    out = torch.full((t.shape[0], width), fill, dtype=t.dtype)
    out[:, :t.shape[1]] = t
    return out


def mean_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean cross-entropy over the answer tokens of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    return token_loss_sum(logits, batch["labels"]) / n_targets


# -- the models ----------------------------------------------------------------------------------------
def build_ours(model_name: str, seed: int) -> tuple[dict[str, NestedAdapter], object]:
    """(a NestedAdapter per method, all views of one injected model's layers; the tokenizer)."""
    model, tok = load_model(model_name, "cpu", torch.float32)
    torch.manual_seed(seed)
    base = NestedAdapter.inject(model, AdapterConfig(method="lora", r=RANK, scaling="sqrt",
                                                     target_modules=list(DEFAULT_TARGETS)))
    model.train()
    views = {m: NestedAdapter(model, replace(base.config, method=m.split("@")[0]), base.layers) for m in OURS}
    return views, tok


def build_peft(model_name: str):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(model_name, "cpu", torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=1, use_rslora=True, target_modules=list(DEFAULT_TARGETS),
                     lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    return peft_model


@torch.no_grad()
def copy_ours_into_peft(ours: NestedAdapter, peft_model, seed: int) -> None:
    """Give our B a trained-looking value (it is 0 at init), then copy A and B into PEFT.
    Ours: lora_A (r, in), lora_Bt (r, out); PEFT: lora_A.weight (r, in), lora_B.weight (out, r)."""
    g = torch.Generator().manual_seed(seed + 1)
    peft_layers = dict(peft_model.base_model.model.named_modules())
    for name, layer in ours.layers.items():
        layer.lora_Bt.copy_(torch.randn(layer.lora_Bt.shape, generator=g) * 0.02)
        target = peft_layers[name]
        target.lora_A["default"].weight.copy_(layer.lora_A)
        target.lora_B["default"].weight.copy_(layer.lora_Bt.t())


@torch.no_grad()
def loss_difference(ours: NestedAdapter, peft_model, batch) -> tuple[float, float, float]:
    """(our loss, PEFT's loss, |difference|) with LoRA coefficients on both."""
    ours.set_training_coeffs()
    a, b = float(mean_loss(ours.model, batch)), float(mean_loss(peft_model, batch))
    return a, b, abs(a - b)


# -- one training step -----------------------------------------------------------------------------------
class Stepper:
    """One variant: its model, its AdamW, and how it sets coefficients before a step."""

    def __init__(self, name: str, model, params: list[torch.Tensor], adapter: NestedAdapter | None = None,
                 sampler: torch.Generator | None = None, fixed_b: int | None = None):
        self.name, self.model, self.adapter, self.sampler, self.fixed_b = name, model, adapter, sampler, fixed_b
        self.opt = torch.optim.AdamW(params, lr=1e-5)
        self.draws: list[int] = []  # DyLoRA's rank per step

    def set_coeffs(self) -> None:
        if self.adapter is None:
            return
        if self.fixed_b is not None:
            self.adapter.set_training_coeffs(self.fixed_b)
            return
        if self.sampler is None:
            self.adapter.set_training_coeffs()
            return
        ranks = self.adapter.config.ranks
        b = ranks[int(torch.randint(len(ranks), (1,), generator=self.sampler))]
        self.draws.append(b)
        self.adapter.set_training_coeffs(b)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """Seconds for: coefficients, forward + loss, backward, AdamW step, zero_grad."""
        t0 = time.perf_counter()
        self.set_coeffs()
        mean_loss(self.model, batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def make_steppers(ours: dict[str, NestedAdapter], peft_model, seed: int) -> list[Stepper]:
    shared = ours["lora"].parameters()
    steppers = [Stepper(m, a.model, shared, a, torch.Generator().manual_seed(seed) if m == "dylora" else None,
                        fixed_b=RANK if m == "dylora@r" else None)
                for m, a in ours.items()]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    steppers.append(Stepper("peft-lora", peft_model, peft_params))
    return steppers


def run_round_robin(steppers: list[Stepper], batch, warmup: int, reps: int) -> dict[str, list[float]]:
    """Seconds per timed step, per variant: every round runs one step of each variant."""
    times: dict[str, list[float]] = {s.name: [] for s in steppers}
    for i in range(warmup + reps):
        label = f"warmup {i + 1}/{warmup}" if i < warmup else f"rep {i - warmup + 1}/{reps}"
        k = i % len(steppers)  # rotate who goes first, so no variant always follows the same one
        for s in steppers[k:] + steppers[:k]:
            gc.collect()
            dt = s.step(batch)
            if i >= warmup:
                times[s.name].append(dt)
            progress(f"  {label} {s.name:<11} {dt:6.2f} s" + (f" (b={s.draws[-1]})" if s.draws else ""))
    return times


# -- the report ------------------------------------------------------------------------------------------------
def report(args, batch, times: dict[str, list[float]], dylora_draws: list[int], losses, n_params,
           load: tuple[float, float]) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    tokens = batch["input_ids"].numel()
    print(f"# train_step benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}), "
          f"fp32; model {args.model}; batch {tuple(batch['input_ids'].shape)} "
          f"({int(batch['attention_mask'].sum())}/{tokens} real tokens); warmup {args.warmup}, reps {args.reps}")
    print(f"adapter: r={RANK}, R=1,2,4,…,{RANK}, scaling sqrt, targets {','.join(DEFAULT_TARGETS)}; "
          f"trainable params: ours {n_params[0]:,}, PEFT {n_params[1]:,}")
    print(f"1-min load average: {load[0]:.2f} before timing, {load[1]:.2f} after (this run adds about "
          f"{torch.get_num_threads()}; more means other processes shared the {os.cpu_count()} cores: "
          "read min as well as median)")
    print(f"loss check (identical weights, LoRA): ours {losses[0]:.6f}, PEFT {losses[1]:.6f}, "
          f"max abs diff {losses[2]:.2e}")
    print()
    print(f"{'variant':<12}{'median s/step':>14}{'min':>8}{'max':>8}{'tokens/s':>10}")
    for name, ts in times.items():
        print(f"{name:<12}{med[name]:>14.3f}{min(ts):>8.3f}{max(ts):>8.3f}{tokens / med[name]:>10.0f}")
    print(f"dylora ranks drawn in the timed steps: {dylora_draws} (its cost grows with b; median only)")
    print()
    print(f"{'ratio':<21}{'of medians':>11}{'of mins':>9}   goal (on medians)")
    for name, (a, b) in RATIOS.items():
        value, goal = med[a] / med[b], GOALS.get(name)
        verdict = f"<= {goal:.2f}  {'PASS' if value <= goal else 'MISS'}" if goal else "-"
        print(f"{name:<21}{value:>11.3f}{low[a] / low[b]:>9.3f}   {verdict}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress(f"loading {args.model} twice (ours, PEFT) …")
    ours, tok = build_ours(args.model, args.seed)
    peft_model = build_peft(args.model)
    batch = make_batch(tok, args.batch_size, args.seq_len)
    copy_ours_into_peft(ours["lora"], peft_model, args.seed)
    losses = loss_difference(ours["lora"], peft_model, batch)
    progress(f"loss check: ours {losses[0]:.6f}, PEFT {losses[1]:.6f}, diff {losses[2]:.2e}")
    steppers = make_steppers(ours, peft_model, args.seed)
    n_params = (ours["lora"].num_trainable(), sum(p.numel() for p in steppers[-1].opt.param_groups[0]["params"]))
    progress(f"timing {', '.join(VARIANTS)}: {args.warmup} warmup + {args.reps} reps each, round-robin")
    load_before = os.getloadavg()[0]
    times = run_round_robin(steppers, batch, args.warmup, args.reps)
    dylora = next(s for s in steppers if s.name == "dylora")  # dylora@r records no draws
    report(args, batch, times, dylora.draws[args.warmup:], losses, n_params, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
