"""The rank–accuracy study (docs/results.md): LoRA, DyLoRA, MatryoshkaLoRA and SVD-nested LoRA on GSM8K.

One command runs it all, sized by ``--budget``::

    python benchmarks/rank_study.py --budget cpu      # ~2 h on a 2-core CPU: small subsets
    python benchmarks/rank_study.py --budget full     # one GPU: the paper's setting (see BUDGETS)
    python benchmarks/rank_study.py --budget smoke    # minutes: checks the pipeline end to end

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
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
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


BUDGETS = {
    "smoke": Budget(steps=2, epochs=1, batch_size=2, max_length=128, train_limit=8, heldout_skip=8,
                    heldout_n=4, heldout_generate=False, test_n=4, max_new_tokens=8, eval_batch_size=4,
                    lrs=[1e-3, 3e-3], seeds=[0, 1], rank=8, note="pipeline check only; numbers mean nothing"),
    "cpu": Budget(steps=20, epochs=1, batch_size=4, max_length=256, train_limit=80, heldout_skip=7000,
                  heldout_n=16, heldout_generate=False, test_n=16, max_new_tokens=128, eval_batch_size=16,
                  note="2-core CPU, fp32: 20 steps x 4 examples (80 train records), 16 test problems"),
    "full": Budget(steps=None, epochs=3, batch_size=16, max_length=512, train_limit=7000, heldout_skip=7000,
                   heldout_n=473, heldout_generate=True, test_n=None, max_new_tokens=256, eval_batch_size=64,
                   shots=8, note="one GPU, bf16: 7000 train records x 3 epochs, the whole test set (1319), 8-shot"),
}


class Study:
    def __init__(self, budget_name: str, run_dir: Path, results: Path, model: str, data: Path, dry_run: bool):
        self.name, self.b = budget_name, BUDGETS[budget_name]
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
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
        if proc.returncode != 0:
            tail = (self.run_dir / "logs" / f"{log}.log").read_text()[-3000:]
            raise SystemExit(f"trainer {args[0]} failed (exit {proc.returncode}); log {log}.log ends:\n{tail}")

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
        self.trainer(f"train-{name}", "train", "--model", self.model, "--data", str(self.data / "train.jsonl"),
                     "--limit", str(b.train_limit), "--method", method, "--rank", str(b.rank),
                     "--scaling", scaling, "--lr", str(lr), "--seed", str(seed), "--batch-size", str(b.batch_size),
                     "--max-length", str(b.max_length), "--warmup-steps", "2" if b.steps else "100",
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

    # -- the study ------------------------------------------------------------------------------
    def run(self) -> None:
        b = self.b
        if b.heldout_skip < b.train_limit:
            raise SystemExit(f"budget {self.name}: held-out records start at {b.heldout_skip}, inside the "
                             f"training set (the first {b.train_limit})")
        self.results.mkdir(parents=True, exist_ok=True)
        sweep = {m: {lr: self.train(f"{m}-lr{lr:g}-s0", m, lr, 0) for lr in b.lrs} for m in METHODS}
        select_metric = "flexible" if b.heldout_generate else "nll"
        chosen, sweep_table = {}, {}
        for m in METHODS:
            res = self.evaluate(f"sweep-{m}", list(sweep[m].values()), heldout=True)
            scores = {lr: e["aurac"].get(select_metric) for lr, e in zip(b.lrs, res["checkpoints"])}
            if self.dry_run:
                chosen[m] = b.lrs[len(b.lrs) // 2]
                continue
            pick = (min if select_metric == "nll" else max)(scores, key=scores.get)
            chosen[m], sweep_table[m] = pick, {f"{lr:g}": scores[lr] for lr in b.lrs}
            print(f"[{self.elapsed()}] {m}: held-out AURAC({select_metric}) {sweep_table[m]} → lr {pick:g}", flush=True)
        runs: dict[str, list[Path]] = {m: [] for m in (*METHODS, "matryoshka-rank", "svd")}
        for m in METHODS:
            for seed in b.seeds:
                runs[m].append(self.train(f"{m}-lr{chosen[m]:g}-s{seed}", m, chosen[m], seed))
        runs["matryoshka-rank"].append(self.train(f"matryoshka-rank-lr{chosen['matryoshka']:g}-s0", "matryoshka",
                                                  chosen["matryoshka"], 0, scaling="rank"))
        runs["svd"] = [self.nest(p, f"svd-of-{p.name}") for p in runs["lora"]]
        final = {m: self.evaluate(f"test-{m}", ckpts, heldout=False) for m, ckpts in runs.items()}
        if not self.dry_run:
            self.aggregate(final, chosen, sweep_table, select_metric)
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
                    vals = [e["per_rank"][str(k)][metric] for e in entries]
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
    for ax, (metric, ylabel, factor) in zip(axes, (("flexible", "GSM8K flexible accuracy (%)", 100),
                                                   ("nll", "answer NLL (nats/token)", 1))):
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
    axes[1].set_title("teacher-forced answer NLL")
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
    args = ap.parse_args()
    for f in ("train.jsonl", "test.jsonl"):
        if not (args.data / f).is_file():
            ap.error(f"--data {args.data}: no {f} there (GSM8K JSONL: question, answer)")
    Study(args.budget, args.run_dir or ROOT / "runs" / f"study-{args.budget}",
          args.results or ROOT / "docs" / "results" / args.budget, args.model, args.data, args.dry_run).run()


if __name__ == "__main__":
    main()
