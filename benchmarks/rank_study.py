"""The rank–accuracy study (docs/results.md): LoRA, DyLoRA, MatryoshkaLoRA and SVD-nested LoRA on GSM8K.

One command runs it all, sized by ``--budget``::

    python benchmarks/rank_study.py --budget cpu      # ~2 h on a 2-core CPU: small subsets
    python benchmarks/rank_study.py --budget full     # one GPU: the whole train set, held-out selection
    python benchmarks/rank_study.py --budget paper --model PATH/Llama-3.2-1B-Instruct   # the paper's protocol
    python benchmarks/rank_study.py --budget smoke    # minutes: checks the pipeline end to end

``--budget paper`` is the authors' setting exactly, for any local model folder (theirs is
Llama-3.2-1B-Instruct): r = 32, R = {1, 2, …, 32}, ``--a-init reference``, effective batch 32
(8 × 4 accumulation), 3 epochs over the whole train set, no warmup, AdamW with linear decay, their
learning-rate grid, seeds 42/666/2408; every (method, rate, seed) is trained and evaluated with
lm-evaluation-harness's own ``gsm8k`` task, 8-shot, in-process (``trainer eval --harness gsm8k
--harness-data DATA``: the harness's prompts and regexes, the data from local files); each
method's rate is the one with the best mean AURAC of ``exact_match,strict-match`` over the seeds
(as the paper selects). Run it with an interpreter that has the ``harness`` extra (e.g.
``.venv-harness/bin/python``). ``--estimate`` times a few steps first and prints the run's
length. ``--lrs``, ``--seeds``, ``--rank``, ``--epochs``, ``--train-limit`` and ``--test-limit``
override the budget (the test runs the paper protocol on a tiny model that way).

Steps (each a ``trainer`` subcommand in its own process, logged under ``RUN_DIR/logs``):

1. learning-rate sweep: every method at each rate of the budget, seed 0;
2. pick each method's rate by AURAC on a held-out tail of the train file (records the training
   never reads: training uses the first ``train_limit`` records, the held-out part starts at
   ``heldout_skip``) — by answer-NLL AURAC (lower is better) when the budget does not generate,
   else by flexible-accuracy AURAC;
3. more seeds at the chosen rates; one MatryoshkaLoRA run with ``rank`` scaling at Matryoshka's rate;
4. SVD-nest every LoRA run (``trainer nest``: the best rank-k approximation at every prefix);
5. evaluate everything at every rank on the test file (``trainer eval``);
6. aggregate: ``summary.json``, ``tables.md``, ``rank_curve.png`` (mean over seeds) in ``--results``.

Finished steps are skipped on a rerun (a run counts as finished when its checkpoint has the
budget's step count; an evaluation when its ``results.json`` exists), so an interrupted study
resumes where it stopped. Weights stay under ``--run-dir`` (not committed); the small
``results.json`` files are copied to ``--results``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = next((p for p in (ROOT.parent / "shared/data/gsm8k", Path("/work/shared/data/gsm8k")) if p.is_dir()),
             ROOT.parent / "shared/data/gsm8k")
METHODS = ("lora", "dylora", "matryoshka")


@dataclass
class Budget:
    """Everything that scales with the compute at hand."""

    steps: int | None  # optimizer steps per run (None: epochs)
    epochs: int
    batch_size: int
    max_length: int
    train_limit: int  # the first N train records are the training set
    heldout_skip: int  # held-out records start here (>= train_limit)
    heldout_n: int
    heldout_generate: bool  # select by accuracy AURAC (True) or answer-NLL AURAC (False)
    test_n: int | None  # None: the whole test file
    max_new_tokens: int
    eval_batch_size: int
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    rank: int = 64
    shots: int = 0  # few-shot exemplars in the test prompts (the paper: 8-shot via lm-evaluation-harness)
    note: str = ""
    protocol: str = "heldout"  # heldout: sweep seed 0, select on a held-out tail; paper: every seed, select on test
    grad_accum: int = 1
    warmup: int | None = None  # None: 2 steps with --max-steps budgets, else 100
    a_init: str = "peft"
    harness: str | None = None  # evaluate with this lm-evaluation-harness task (in-process) instead of trainer eval


BUDGETS = {
    "smoke": Budget(steps=2, epochs=1, batch_size=2, max_length=128, train_limit=8, heldout_skip=8,
                    heldout_n=4, heldout_generate=False, test_n=4, max_new_tokens=8, eval_batch_size=4,
                    lrs=[1e-3, 3e-3], seeds=[0, 1], rank=8, note="pipeline check only; numbers mean nothing"),
    "cpu": Budget(steps=20, epochs=1, batch_size=4, max_length=256, train_limit=80, heldout_skip=7000,
                  heldout_n=16, heldout_generate=False, test_n=16, max_new_tokens=128, eval_batch_size=16,
                  note="2-core CPU, fp32: 20 steps x 4 examples (80 train records), 16 test problems"),
    "full": Budget(steps=None, epochs=3, batch_size=16, max_length=512, train_limit=7000, heldout_skip=7000,
                   heldout_n=473, heldout_generate=True, test_n=None, max_new_tokens=256, eval_batch_size=64,
                   shots=8, note="one GPU, bf16: 7000 train records x 3 epochs, rates chosen on the held-out 473, "
                                 "the whole test set (1319), 8-shot (our evaluator; not the paper's protocol)"),
    "paper": Budget(steps=None, epochs=3, batch_size=8, grad_accum=4, max_length=512, train_limit=7473,
                    heldout_skip=7473, heldout_n=0, heldout_generate=True, test_n=None, max_new_tokens=256,
                    eval_batch_size=32, lrs=[5e-6, 1e-5, 2e-5, 5e-5, 8e-5, 1e-4, 2e-4, 5e-4, 1e-3],
                    seeds=[42, 666, 2408], rank=32, shots=8, protocol="paper", warmup=0, a_init="reference",
                    harness="gsm8k", note="the authors' protocol: every rate x seed, lm-eval gsm8k 8-shot "
                                          "strict-match, rate by mean AURAC over seeds"),
}


class Study:
    def __init__(self, budget_name: str, run_dir: Path, results: Path, model: str, data: Path, dry_run: bool,
                 overrides: dict | None = None, in_process: bool = False, methods: list[str] | None = None):
        self.name, self.b = budget_name, replace(BUDGETS[budget_name], **(overrides or {}))
        self.in_process = in_process
        self.methods = tuple(methods or METHODS)
        if not {"lora", "matryoshka"} <= set(self.methods):
            raise SystemExit(f"--methods {','.join(self.methods)}: lora (for SVD nesting) and matryoshka are needed")
        self.run_dir, self.results, self.model, self.data, self.dry_run = run_dir, results, model, data, dry_run
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()

    # -- processes ------------------------------------------------------------------------------
    def trainer(self, log: str, *args: str) -> None:
        cmd = [sys.executable, "-m", "trainer", *args]
        print(f"[{self.elapsed()}] trainer {' '.join(args[:1])} → {log}", flush=True)
        if self.dry_run:
            print("  " + " ".join(cmd))
            return
        with (self.run_dir / "logs" / f"{log}.log").open("w") as f:
            if self.in_process:  # the same command, without a new interpreter's start-up (tiny models, tests)
                from trainer.cli import main

                logging.getLogger().handlers.clear()  # main() binds its log handler to this file
                with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    returncode = main(list(args))
                logging.getLogger().handlers.clear()
            else:
                returncode = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
        if returncode != 0:
            tail = (self.run_dir / "logs" / f"{log}.log").read_text()[-3000:]
            raise SystemExit(f"trainer {args[0]} failed (exit {returncode}); log {log}.log ends:\n{tail}")

    def elapsed(self) -> str:
        s = int(time.monotonic() - self.started)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    # -- steps ----------------------------------------------------------------------------------
    def train(self, name: str, method: str, lr: float, seed: int, scaling: str = "sqrt") -> Path:
        out = self.run_dir / "ckpt" / name
        if self.finished(out):
            return out
        b = self.b
        length = ["--max-steps", str(b.steps)] if b.steps else ["--epochs", str(b.epochs)]
        warmup = b.warmup if b.warmup is not None else (2 if b.steps else 100)
        self.trainer(f"train-{name}", "train", "--model", self.model, "--data", str(self.data / "train.jsonl"),
                     "--limit", str(b.train_limit), "--method", method, "--rank", str(b.rank),
                     "--scaling", scaling, "--lr", str(lr), "--seed", str(seed), "--batch-size", str(b.batch_size),
                     "--grad-accum", str(b.grad_accum), "--a-init", b.a_init,
                     "--max-length", str(b.max_length), "--warmup-steps", str(warmup),
                     *length, "--no-progress", "--out", str(out))
        return out

    def finished(self, ckpt: Path) -> bool:
        meta = ckpt / "matryoshka.json"
        if not meta.is_file():
            return False
        m = json.loads(meta.read_text())
        return m.get("method") == "svd" or (self.b.steps is None or m.get("step") == self.b.steps)

    def nest(self, lora: Path, name: str) -> Path:
        out = self.run_dir / "ckpt" / name
        if not (out / "matryoshka.json").is_file():
            self.trainer(f"nest-{name}", "nest", str(lora), "--model", self.model, "--out", str(out))
        return out

    def evaluate(self, name: str, ckpts: list[Path], heldout: bool) -> dict:
        if self.b.harness and not heldout:
            return self.evaluate_harness(name, ckpts)
        out = self.run_dir / "eval" / name
        if not (out / "results.json").is_file():
            b = self.b
            if heldout:
                what = ["--data", str(self.data / "train.jsonl"), "--skip", str(b.heldout_skip),
                        "--limit", str(b.heldout_n)] + ([] if b.heldout_generate else ["--no-generate"])
            else:
                what = ["--data", str(self.data / "test.jsonl"), "--shots", str(b.shots)] + (
                    ["--limit", str(b.test_n)] if b.test_n else [])
            self.trainer(f"eval-{name}", "eval", *map(str, ckpts), *what, "--model", self.model,
                         "--batch-size", str(b.eval_batch_size), "--max-new-tokens", str(b.max_new_tokens),
                         "--no-progress", "--out", str(out))
        if self.dry_run:
            return {"checkpoints": []}
        dest = self.results / "eval" / name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "results.json", dest / "results.json")
        return json.loads((out / "results.json").read_text())

    def evaluate_harness(self, name: str, ckpts: list[Path]) -> dict:
        """lm-evaluation-harness's own task at every rank (``trainer eval --harness``), turned into
        the shape ``trainer eval`` writes (strict / flexible per rank, their AURACs)."""
        from trainer.aurac import aurac, log_aurac

        b, out = self.b, self.run_dir / "eval" / name
        if not (out / "harness.json").is_file():
            self.trainer(f"eval-{name}", "eval", *map(str, ckpts), "--harness", b.harness, "--harness-data",
                         str(self.data), "--shots", str(b.shots), *(["--limit", str(b.test_n)] if b.test_n else []),
                         "--model", self.model, "--batch-size", str(b.eval_batch_size),
                         "--max-new-tokens", str(b.max_new_tokens), "--out", str(out))
        if self.dry_run:
            return {"checkpoints": []}
        raw = json.loads((out / "harness.json").read_text())
        entries = []
        for e in raw["checkpoints"]:
            per_rank = {k: {"strict": row["exact_match,strict-match"], "flexible": row["exact_match,flexible-extract"]}
                        for k, row in e["per_rank"].items()}
            ks = sorted(int(k) for k in per_rank if int(k) > 0)
            entries.append({"label": Path(e["checkpoint"]).name, "n": e.get("n"), "per_rank": per_rank,
                            **{key: {m: f(ks, [per_rank[str(k)][m] for k in ks]) for m in ("strict", "flexible")}
                               for key, f in (("aurac", aurac), ("log_aurac", log_aurac))}})
        dest = self.results / "eval" / name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "harness.json", dest / "harness.json")
        return {"checkpoints": entries}

    def estimate(self) -> None:
        """Time 4 optimizer steps of the budget's first run here, and scale to the whole training."""
        b = self.b
        out = self.run_dir / "estimate"
        shutil.rmtree(out, ignore_errors=True)
        self.trainer("estimate", "train", "--model", self.model, "--data", str(self.data / "train.jsonl"),
                     "--limit", str(b.train_limit), "--method", "matryoshka", "--rank", str(b.rank),
                     "--lr", str(b.lrs[0]), "--batch-size", str(b.batch_size), "--grad-accum", str(b.grad_accum),
                     "--a-init", b.a_init, "--max-length", str(b.max_length), "--max-steps", "4", "--no-progress",
                     "--out", str(out))
        if self.dry_run:
            return
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        per_step = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (len(rows) - 1)  # the first step warms up
        steps = b.steps or b.epochs * -(-b.train_limit // (b.batch_size * b.grad_accum))
        runs = len(self.methods) * len(b.lrs) * len(b.seeds) if b.protocol == "paper" else \
            len(self.methods) * (len(b.lrs) + len(b.seeds) - 1) + 1
        total = per_step * steps * runs
        print(f"budget {self.name}: {per_step:.2f} s per optimizer step here (batch {b.batch_size} x "
              f"{b.grad_accum}, length <= {b.max_length}, r = {b.rank}); {steps} steps per run x {runs} runs = "
              f"{total / 3600:.1f} h of training, evaluation not included")

    # -- the study ------------------------------------------------------------------------------
    def run(self) -> None:
        if self.b.protocol == "paper":
            return self.run_paper()
        b = self.b
        if b.heldout_skip < b.train_limit:
            raise SystemExit(f"budget {self.name}: held-out records start at {b.heldout_skip}, inside the "
                             f"training set (the first {b.train_limit})")
        self.results.mkdir(parents=True, exist_ok=True)
        sweep = {m: {lr: self.train(f"{m}-lr{lr:g}-s0", m, lr, 0) for lr in b.lrs} for m in self.methods}
        select_metric = "flexible" if b.heldout_generate else "nll"
        chosen, sweep_table = {}, {}
        for m in self.methods:
            res = self.evaluate(f"sweep-{m}", list(sweep[m].values()), heldout=True)
            scores = {lr: e["aurac"].get(select_metric) for lr, e in zip(b.lrs, res["checkpoints"])}
            if self.dry_run:
                chosen[m] = b.lrs[len(b.lrs) // 2]
                continue
            pick = (min if select_metric == "nll" else max)(scores, key=scores.get)
            chosen[m], sweep_table[m] = pick, {f"{lr:g}": scores[lr] for lr in b.lrs}
            print(f"[{self.elapsed()}] {m}: held-out AURAC({select_metric}) {sweep_table[m]} → lr {pick:g}", flush=True)
        runs: dict[str, list[Path]] = {m: [] for m in (*self.methods, "matryoshka-rank", "svd")}
        for m in self.methods:
            for seed in b.seeds:
                runs[m].append(self.train(f"{m}-lr{chosen[m]:g}-s{seed}", m, chosen[m], seed))
        runs["matryoshka-rank"].append(self.train(f"matryoshka-rank-lr{chosen['matryoshka']:g}-s0", "matryoshka",
                                                  chosen["matryoshka"], 0, scaling="rank"))
        runs["svd"] = [self.nest(p, f"svd-of-{p.name}") for p in runs["lora"]]
        final = {m: self.evaluate(f"test-{m}", ckpts, heldout=False) for m, ckpts in runs.items()}
        if not self.dry_run:
            self.aggregate(final, chosen, sweep_table, select_metric)
        print(f"[{self.elapsed()}] done: {self.results}", flush=True)

    def run_paper(self) -> None:
        """Every (method, rate, seed) trained and evaluated on the test task; each method's rate is
        the one with the best mean strict-match AURAC over the seeds (the paper's selection)."""
        b = self.b
        self.results.mkdir(parents=True, exist_ok=True)
        grid = {m: {lr: [self.train(f"{m}-lr{lr:g}-s{seed}", m, lr, seed) for seed in b.seeds] for lr in b.lrs}
                for m in self.methods}
        evals = {m: {lr: self.evaluate(f"test-{m}-lr{lr:g}", ckpts, heldout=False) for lr, ckpts in grid[m].items()}
                 for m in self.methods}
        chosen, sweep_table = {}, {}
        for m in self.methods:
            if self.dry_run:
                chosen[m] = b.lrs[len(b.lrs) // 2]
                continue
            scores = {lr: statistics.fmean(e["aurac"]["strict"] for e in evals[m][lr]["checkpoints"]) for lr in b.lrs}
            chosen[m] = max(scores, key=scores.get)
            sweep_table[m] = {f"{lr:g}": scores[lr] for lr in b.lrs}
            print(f"[{self.elapsed()}] {m}: mean strict AURAC over seeds {sweep_table[m]} → lr {chosen[m]:g}", flush=True)
        final = {m: evals[m][chosen[m]] for m in self.methods}
        svd = [self.nest(p, f"svd-of-{p.name}") for p in grid["lora"][chosen["lora"]]]
        final["svd"] = self.evaluate("test-svd", svd, heldout=False)
        if not self.dry_run:
            self.aggregate(final, chosen, sweep_table, "strict")
        print(f"[{self.elapsed()}] done: {self.results}", flush=True)

    def aggregate(self, final: dict, chosen: dict, sweep_table: dict, select_metric: str) -> None:
        summary = {"budget": self.name, "config": asdict(self.b), "model": self.model,
                   "select_metric": select_metric, "sweep_aurac": sweep_table,
                   "chosen_lr": {m: f"{lr:g}" for m, lr in chosen.items()},
                   "wall_time_s": round(time.monotonic() - self.started), "methods": {}}
        for method, res in final.items():
            entries = res["checkpoints"]
            ranks = sorted({int(k) for e in entries for k in e["per_rank"]})
            per_rank = {}
            for k in ranks:
                row = {}
                for metric in ("strict", "flexible", "nll"):
                    vals = [e["per_rank"][str(k)].get(metric) for e in entries]
                    if any(v is None for v in vals):
                        continue  # the harness reports accuracies only
                    row[metric] = {"mean": statistics.fmean(vals), "values": vals}
                per_rank[str(k)] = row
            summary["methods"][method] = {
                "checkpoints": [e["label"] for e in entries], "n": entries[0]["n"], "per_rank": per_rank,
                "aurac": {m: statistics.fmean(e["aurac"][m] for e in entries) for m in entries[0]["aurac"]},
                "log_aurac": {m: statistics.fmean(e["log_aurac"][m] for e in entries) for m in entries[0]["log_aurac"]},
            }
        (self.results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.results / "tables.md").write_text(tables(summary))
        (self.results / "rank_curve.png").write_bytes(plot(summary))


LABELS = {"lora": "LoRA (truncated)", "dylora": "DyLoRA", "matryoshka": "MatryoshkaLoRA (sqrt)",
          "matryoshka-rank": "MatryoshkaLoRA (rank scaling)", "svd": "SVD-nested LoRA"}


def tables(summary: dict) -> str:
    """Markdown: one table per metric, a row per method, a column per rank, then the AURACs."""
    methods = summary["methods"]
    ranks = sorted({int(k) for m in methods.values() for k in m["per_rank"]})
    out = [f"Budget `{summary['budget']}`: {summary['config']['note']}. n = "
           f"{next(iter(methods.values()))['n']} test problems; mean over seeds (values per seed in summary.json).\n"]
    for metric, title, fmt in (("flexible", "flexible accuracy (%)", "{:.1f}"), ("strict", "strict accuracy (%)", "{:.1f}"),
                               ("nll", "answer NLL (nats/token, lower is better)", "{:.4f}")):
        factor = 1 if metric == "nll" else 100
        if not all(metric in m["aurac"] for m in methods.values()):
            continue  # not measured (the harness reports accuracies only)
        out.append(f"\n**{title}**\n")
        out.append("| method | seeds | " + " | ".join(f"r={k}" for k in ranks) + " | AURAC | log-AURAC |")
        out.append("|---" * (len(ranks) + 4) + "|")
        for name, m in methods.items():
            cells = [fmt.format(factor * m["per_rank"][str(k)][metric]["mean"]) if str(k) in m["per_rank"] else ""
                     for k in ranks]
            out.append(f"| {LABELS.get(name, name)} | {len(m['checkpoints'])} | " + " | ".join(cells)
                       + f" | {fmt.format(factor * m['aurac'][metric])} | {fmt.format(factor * m['log_aurac'][metric])} |")
    out.append(f"\nLearning rates chosen by held-out AURAC ({summary['select_metric']}): "
               + ", ".join(f"{m} {lr}" for m, lr in summary["chosen_lr"].items())
               + f". Sweep scores: `{json.dumps(summary['sweep_aurac'])}`.\n")
    return "\n".join(out) + "\n"


def plot(summary: dict) -> bytes:
    """Mean over seeds per method: flexible accuracy and answer NLL against rank (log2), base dashed."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = (("flexible", "GSM8K flexible accuracy (%)", 100), ("nll", "answer NLL (nats/token)", 1))
    if not all("nll" in m["aurac"] for m in summary["methods"].values()):  # the harness: accuracies only
        panels = (("strict", "GSM8K strict-match accuracy (%)", 100), panels[0])
    for ax, (metric, ylabel, factor) in zip(axes, panels):
        base = None
        for name, m in summary["methods"].items():
            ranks = sorted(int(k) for k in m["per_rank"] if int(k) > 0)
            ax.plot(ranks, [factor * m["per_rank"][str(k)][metric]["mean"] for k in ranks], marker="o",
                    label=f"{LABELS.get(name, name)} ({len(m['checkpoints'])} seed{'s' * (len(m['checkpoints']) > 1)})")
            base = base if base is not None else m["per_rank"].get("0", {}).get(metric, {}).get("mean")
        if base is not None:
            ax.axhline(factor * base, color="0.4", linestyle="--", linewidth=1, label="base model (rank 0)")
        ax.set_xscale("log", base=2)
        ks = sorted({int(k) for m in summary["methods"].values() for k in m["per_rank"] if int(k) > 0})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("rank k")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_title(f"GSM8K test, n={next(iter(summary['methods'].values()))['n']}")
    axes[1].set_title("teacher-forced answer NLL" if panels[1][0] == "nll" else "flexible-extract")
    axes[1].legend(fontsize="small")
    fig.suptitle(f"{summary['model']}, r={summary['config']['rank']}, budget '{summary['budget']}'")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=GSM8K, help="folder with train.jsonl and test.jsonl")
    ap.add_argument("--run-dir", type=Path, help="checkpoints and logs (default runs/study-BUDGET)")
    ap.add_argument("--results", type=Path, help="summary, tables, plot (default docs/results/BUDGET)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--estimate", action="store_true", help="time a few training steps of the budget's first run "
                    "on this machine and print how long the training would take (nothing else runs)")
    ap.add_argument("--in-process", action="store_true", help="run each trainer command in this process "
                    "(no interpreter start-up per step: for tiny models; a real run keeps them apart)")
    ap.add_argument("--methods", type=lambda v: v.split(","), help="override the methods (lora, dylora, matryoshka)")
    ap.add_argument("--lrs", type=lambda v: [float(x) for x in v.split(",")], help="override the rate grid")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], help="override the seeds")
    ap.add_argument("--rank", type=int, help="override r")
    ap.add_argument("--epochs", type=int, help="override the epochs")
    ap.add_argument("--train-limit", type=int, help="override the number of train records")
    ap.add_argument("--test-limit", type=int, help="override the number of test problems")
    ap.add_argument("--max-new-tokens", type=int, help="override the generation budget (the paper's: 256)")
    args = ap.parse_args()
    for f in ("train.jsonl", "test.jsonl"):
        if not (args.data / f).is_file():
            ap.error(f"--data {args.data}: no {f} there (GSM8K JSONL: question, answer)")
    overrides = {f: v for f, v in (("lrs", args.lrs), ("seeds", args.seeds), ("rank", args.rank),
                                   ("epochs", args.epochs), ("train_limit", args.train_limit),
                                   ("test_n", args.test_limit), ("max_new_tokens", args.max_new_tokens)) if v is not None}
    if args.train_limit is not None:
        overrides["heldout_skip"] = max(BUDGETS[args.budget].heldout_skip, args.train_limit)
    study = Study(args.budget, args.run_dir or ROOT / "runs" / f"study-{args.budget}",
                  args.results or ROOT / "docs" / "results" / args.budget, args.model, args.data, args.dry_run,
                  overrides, args.in_process, args.methods)
    study.estimate() if args.estimate else study.run()


if __name__ == "__main__":
    main()
