"""Which coefficients should rank k be served with? All three inference rules on every method.

A nested checkpoint can be served at rank k with (DESIGN.md §2, ``trainer.nested.rule_coeffs``):

* ``paper``   c_k = s(k)·1ₖ                      (the paper's "discard P"; the authors' code)
* ``partial`` c_k = Σ_{j∈R, j≤k} s(j)·1ⱼ         (the Matryoshka sum cut after rank k)
* ``trained`` c_k = p[:k]                        (the training forward's own coefficients, truncated)

This script trains LoRA, DyLoRA and MatryoshkaLoRA (3 seeds each), SVD-nests every LoRA run, and
evaluates every checkpoint at every rank under every rule on two tasks:

* ``facts``: a capacity probe (``trainer.data.facts_records``, short form): 32 made-up names with
  4-digit codes, ``"The code of Name is" → " 1234"``; exact recall (teacher-forced greedy exact
  match, ``exact``) after training on the same facts; a new fact set per seed. The adapter sits
  on the last ``FACT_LAYERS`` decoder layers only, so that backward stops there (a 2-core CPU
  budget).
* ``gsm8k``: a GSM8K subset (32 train records, 8 steps of 4, r = 16), answer NLL on the first
  8 test problems.

Each cell is the mean over seeds with a 95% t-interval. Phases (resumable; finished steps are
skipped)::

    python benchmarks/inference_rules.py --phase train   # trainer subprocesses, weights in --run-dir
    python benchmarks/inference_rules.py --phase eval    # in-process, one model load per task
    python benchmarks/inference_rules.py                  # both, then the tables
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = next((p for p in (ROOT.parent / "shared/data/gsm8k", Path("/work/shared/data/gsm8k")) if p.is_dir()),
             ROOT.parent / "shared/data/gsm8k")
METHODS = ("lora", "dylora", "dylora-row", "matryoshka")  # dylora-row: --rank-sampling row (not in the paper)
NESTS = {"svd": "lora", "dylora-svd": "dylora", "dylora-row-svd": "dylora-row",  # each trained function,
         "matryoshka-svd": "matryoshka"}  # at full rank under its shipped rule, nested by SVD (trainer nest)
ALL = (*METHODS, *NESTS)
METHOD_FLAGS = {"dylora-row": ["--method", "dylora", "--rank-sampling", "row"]}  # the others: --method NAME
SEEDS = (0, 1, 2)
FACT_LAYERS = 8  # of SmolLM2-135M's 30
TASKS = {
    "facts": dict(n_facts=32, rank=8, lr=3e-3, batch_size=16, epochs=40, warmup=4, max_length=64),
    # the harder probe: twice the facts for the same r = 8 (rank 4 held 32 facts), 32 epochs
    "facts64": dict(n_facts=64, rank=8, lr=3e-3, batch_size=16, epochs=32, warmup=4, max_length=64),
    "gsm8k": dict(rank=16, lr=3e-3, batch_size=4, steps=8, warmup=2, max_length=256, train_limit=32,
                  test_n=8),
}


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed (exit {proc.returncode}); see {log}:\n"
                         f"{log.read_text()[-2000:]}")
    print(f"  {log.stem}: {time.monotonic() - t0:.0f} s", flush=True)


def facts_file(run_dir: Path, task: str, seed: int) -> Path:
    from trainer.data import facts_records

    path = run_dir / "data" / f"{task}-{seed}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        recs = facts_records(TASKS[task]["n_facts"], seed, short=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def fact_targets(n_layers: int = 30) -> str:
    first = n_layers - FACT_LAYERS
    layers = "|".join(str(i) for i in range(first, n_layers))
    return rf"re:model\.layers\.({layers})\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def train_args(task: str, method: str, seed: int, run_dir: Path, out: Path, model: str) -> list[str]:
    t = TASKS[task]
    common = ["--model", model, *METHOD_FLAGS.get(method, ["--method", method]), "--rank", str(t["rank"]), "--lr", str(t["lr"]),
              "--seed", str(seed), "--batch-size", str(t["batch_size"]), "--max-length", str(t["max_length"]),
              "--warmup-steps", str(t["warmup"]), "--no-progress", "--out", str(out)]
    if task.startswith("facts"):
        return [*common, "--data", str(facts_file(run_dir, task, seed)), "--epochs", str(t["epochs"]),
                "--targets", fact_targets()]
    return [*common, "--data", str(GSM8K / "train.jsonl"), "--limit", str(t["train_limit"]),
            "--max-steps", str(t["steps"])]


def ckpt_dir(run_dir: Path, task: str, method: str, seed: int) -> Path:
    return run_dir / task / f"{method}-s{seed}"


def phase_train(run_dir: Path, model: str, tasks: list[str], methods: tuple[str, ...] = METHODS) -> None:
    for task in tasks:
        for seed in SEEDS:
            for method in methods:
                out = ckpt_dir(run_dir, task, method, seed)
                if (out / "matryoshka.json").exists():
                    continue
                run([sys.executable, "-m", "trainer", "train", *train_args(task, method, seed, run_dir, out, model)],
                    run_dir / "logs" / f"train-{task}-{method}-s{seed}.log")
            for nested, source in NESTS.items():
                out = ckpt_dir(run_dir, task, nested, seed)
                if source not in methods or (out / "matryoshka.json").exists():
                    continue
                src = ckpt_dir(run_dir, task, source, seed)
                peft = run_dir / task / f"{source}-s{seed}-peft"
                if not (peft / "adapter_config.json").exists():
                    run([sys.executable, "-m", "trainer", "export", str(src), "--rank", str(TASKS[task]["rank"]),
                         "--out", str(peft)], run_dir / "logs" / f"export-{task}-{source}-s{seed}.log")
                run([sys.executable, "-m", "trainer", "nest", str(peft), "--model", model, "--out", str(out)],
                    run_dir / "logs" / f"nest-{task}-{source}-s{seed}.log")


# -- evaluation: every checkpoint, every rule, every rank, in one process per task ---------------------
RULES = ("trained", "paper", "partial")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t quantile for a 95% interval, by n - 1


def task_examples(task: str, run_dir: Path, seed: int, tok) -> list:
    """The scored examples (answer tokens carry the loss), in the training format."""
    from trainer.data import read_jsonl, tokenize

    if task.startswith("facts"):
        shape, records = read_jsonl(facts_file(run_dir, task, seed))
    else:
        shape, records = read_jsonl(GSM8K / "test.jsonl", TASKS[task]["test_n"])
    return tokenize(records, shape, tok, max_length=None)[0]


def eval_task(task: str, run_dir: Path, model_name: str, cache: dict, save=lambda: None) -> None:
    """Fill ``cache[task][method][seed][rule][rank] = {exact, nll}`` for what is not there yet;
    ``save()`` after each checkpoint (a long task resumes where it stopped)."""
    import torch

    from trainer.checkpoint import load_adapter
    from trainer.evaluate import answer_scores
    from trainer.models import load_model

    model, tok = load_model(model_name, "cpu", torch.float32)
    results = cache.setdefault(task, {})
    for seed in SEEDS:
        examples = task_examples(task, run_dir, seed, tok)
        for method in ALL:
            ckpt = ckpt_dir(run_dir, task, method, seed)
            if not (ckpt / "matryoshka.json").exists():
                continue  # not trained (yet): a rerun fills it in
            cell = results.setdefault(method, {}).setdefault(str(seed), {})
            if all(rule in cell for rule in RULES):
                continue
            adapter, _ = load_adapter(ckpt, model)
            base = None  # rank 0 is the base model under every rule: scored once
            done: dict[str, dict] = {}  # rules with the same coefficients (DyLoRA: trained = paper) are scored once
            for rule in RULES:
                adapter.set_inference_rule(rule)
                same = next((r for r in done if done[r] == adapter.config.coeffs), None)
                if same is not None:
                    cell[rule] = cell[same]
                    continue
                done[rule] = dict(adapter.config.coeffs)
                rows = cell[rule] = {}
                for k in [0, *adapter.config.ranks]:
                    adapter.set_rank(k)
                    if k == 0 and base is not None:
                        rows["0"] = base
                        continue
                    nll, exact = answer_scores(model, examples, tok.pad_token_id, 16)
                    rows[str(k)] = {"exact": exact, "nll": round(nll, 5)}
                    base = rows["0"]
                print(f"  {task} {method} s{seed} {rule}: " + "  ".join(
                    f"r{k} {v['exact']:.3f}/{v['nll']:.3f}" for k, v in rows.items()), flush=True)
            adapter.merge_and_unload(0)  # back to the plain base model for the next checkpoint
            save()


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) over seeds."""
    import statistics

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, T975[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5


def tables(cache: dict) -> str:
    """Markdown: per task and metric, one row per (method, rule), one column per rank."""
    out = []
    for task, metric, scale, fmt in [("facts", "exact", 100, "{:.1f} ± {:.1f}"),
                                     ("facts", "nll", 1, "{:.3f} ± {:.3f}"),
                                     ("facts64", "exact", 100, "{:.1f} ± {:.1f}"),
                                     ("gsm8k", "nll", 1, "{:.3f} ± {:.3f}")]:
        if task not in cache:
            continue
        res = cache[task]
        ranks = sorted({int(k) for m in res.values() for s in m.values() for r in s.values() for k in r})
        what = "exact recall, % (higher is better)" if metric == "exact" else "answer NLL, nats/token (lower is better)"
        n_seeds = {m: len(res[m]) for m in res}
        out += [f"### {task}: {what}", "", "mean ± 95% t-interval over seeds (" + ", ".join(
            f"{m}: {n}" for m, n in n_seeds.items()) + ")", "",
                "| method | rule | " + " | ".join(f"r{k}" for k in ranks) + " |",
                "|---|---|" + "---|" * len(ranks)]
        for method in ALL:
            if method not in res:
                continue
            for rule in RULES:
                cells = []
                for k in ranks:
                    vals = [res[method][s][rule][str(k)][metric] * scale for s in res.get(method, {})
                            if rule in res[method][s] and str(k) in res[method][s][rule]]
                    cells.append(fmt.format(*mean_ci(vals)) if vals else "–")
                out.append(f"| {method} | {rule} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# -- the study: every method under the rule it ships with (and Matryoshka under the paper's) -----------
def shipped(method: str) -> str:
    return "trained" if method == "matryoshka" else "paper"  # trainer.nested.default_inference_rule


STUDY_ROWS = [(m, shipped(m)) for m in ALL] + [("matryoshka", "paper")]


def cell(res: dict, method: str, rule: str, k: int, metric: str) -> tuple[float, float] | None:
    vals = [res[method][s][rule][str(k)][metric] for s in res.get(method, {})
            if rule in res[method][s] and str(k) in res[method][s][rule]]
    return mean_ci(vals) if vals else None


def study_tables(cache: dict) -> str:
    """Per probe: exact recall of every (method, rule) row at every rank, then, for every pair of
    rows, the ranks at which their 95% intervals do not overlap (and who is ahead)."""
    out = []
    for task in ("facts", "facts64"):
        res = cache.get(task)
        if not res:
            continue
        ranks = sorted({int(k) for m in res.values() for s in m.values() for r in s.values() for k in r} - {0})
        rows = [(m, r) for m, r in STUDY_ROWS if m in res]
        t = TASKS[task]
        out += [f"### {task}: {t['n_facts']} facts, r = {t['rank']}; exact recall, % (mean ± 95% t-interval, "
                f"{len(SEEDS)} seeds)", "",
                "| method | rule | " + " | ".join(f"r{k}" for k in ranks) + " |", "|---|---|" + "---|" * len(ranks)]
        for m, rule in rows:
            cells = [cell(res, m, rule, k, "exact") for k in ranks]
            out.append(f"| {m} | {rule} | " + " | ".join(
                "–" if c is None else f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}" for c in cells) + " |")
        out += ["", f"{task}: ranks at which two rows' intervals are apart (the first named is ahead there)", "",
                "| rows | apart at | ahead |", "|---|---|---|"]
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                apart = []
                for k in ranks:
                    ca, cb = cell(res, *a, k, "exact"), cell(res, *b, k, "exact")
                    if ca and cb and abs(ca[0] - cb[0]) > ca[1] + cb[1]:
                        apart.append((k, a if ca[0] > cb[0] else b))
                if apart:
                    out.append(f"| {a[0]}/{a[1]} vs {b[0]}/{b[1]} | {len(apart)} ranks: "
                               + ", ".join(f"r{k}" for k, _ in apart) + " | "
                               + ", ".join(f"r{k}: {w[0]}" for k, w in apart) + " |")
        out.append("")
    return "\n".join(out)


def study_plot(cache: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("facts", "facts64") if cache.get(t)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.4), squeeze=False)
    colours = {"lora": "tab:blue", "dylora": "tab:orange", "dylora-row": "tab:red", "matryoshka": "tab:green"}
    for ax, task in zip(axes[0], tasks):
        res = cache[task]
        for m, rule in STUDY_ROWS:
            if m not in res:
                continue
            base = NESTS.get(m, m)
            ranks = sorted(int(k) for k in next(iter(res[m].values()))[rule] if int(k) > 0)
            ys = [cell(res, m, rule, k, "exact") for k in ranks]
            style = "--" if m in NESTS else (":" if rule != shipped(m) else "-")
            ax.errorbar(ranks, [100 * y for y, _ in ys], yerr=[100 * e for _, e in ys], color=colours[base],
                        linestyle=style, marker="o", ms=3, capsize=2, label=f"{m} / {rule}")
        t = TASKS[task]
        ax.set_xscale("log", base=2)
        ax.set_xlabel("served rank k")
        ax.set_ylabel("exact recall, %")
        ax.set_title(f"{task}: {t['n_facts']} facts, r = {t['rank']} (mean, 95% CI, {len(SEEDS)} seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(cache: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, m) for t, m in [("facts", "exact"), ("gsm8k", "nll")] if t in cache]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    colours = {"lora": "tab:blue", "dylora": "tab:orange", "matryoshka": "tab:green", "svd": "tab:purple"}
    styles = {"trained": "-", "paper": ":", "partial": "--"}
    for ax, (task, metric) in zip(axes[0], panels):
        for method, seeds in cache[task].items():
            if method not in colours:  # the study's added rows are in study.png
                continue
            for rule in RULES:
                ranks = sorted(int(k) for k in next(iter(seeds.values()))[rule] if int(k) > 0)
                ys = [mean_ci([seeds[s][rule][str(k)][metric] for s in seeds]) for k in ranks]
                ax.errorbar(ranks, [y for y, _ in ys], yerr=[e for _, e in ys], color=colours[method],
                            linestyle=styles[rule], marker="o", ms=3, capsize=2, label=f"{method} / {rule}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("served rank k")
        ax.set_ylabel({"exact": "exact recall", "nll": "answer NLL (nats/token)"}[metric])
        ax.set_title(f"{task}: {metric} (mean and 95% CI over seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def phase_eval(run_dir: Path, results: Path, model: str, tasks: list[str]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    path = results / "results.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    for task in tasks:
        if not (run_dir / task).is_dir():
            continue
        eval_task(task, run_dir, model, cache, save=lambda: path.write_text(json.dumps(cache, indent=1) + "\n"))
    (results / "tables.md").write_text(tables(cache))
    plot(cache, results / "rules.png")
    (results / "study.md").write_text(study_tables(cache))
    study_plot(cache, results / "study.png")
    print(tables(cache))
    print(study_tables(cache))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=("train", "eval", "all"), default="all")
    ap.add_argument("--tasks", default="facts,gsm8k")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"trained methods, comma-separated, of {','.join(METHODS)} (with their SVD nests)")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "inference_rules")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "inference_rules")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = tuple(m for m in args.methods.split(",") if m)
    if unknown := [m for m in methods if m not in METHODS]:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.phase in ("train", "all"):
        phase_train(args.run_dir, args.model, tasks, methods)
    if args.phase in ("eval", "all"):
        phase_eval(args.run_dir, args.results, args.model, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
