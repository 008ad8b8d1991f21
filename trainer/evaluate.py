"""Per-rank evaluation of nested checkpoints on GSM8K: accuracy, answer NLL, time, AURAC.

For rank 0 (the base model) and every rank k of the checkpoint's R (or ``--ranks``):

* **accuracy** — greedy generation, batched with left padding, each completion stopping at EOS or
  at the next ``Question:``; scored as lm-evaluation-harness's ``gsm8k`` task does, two ways:
  *strict* — the number after the first ``#### `` (commas removed);
  *flexible* — the last number in the completion (commas and ``$`` removed).
  Both compare by value with the reference's ``#### n`` (so ``18.00`` counts as ``18``).
* **answer NLL** — teacher-forced, in the training format (zero-shot prompt, answer + EOS), so it
  reads on the scale of the training loss: Σ −log p(answer token) / #answer tokens, over the set.
* **exact** — from the same forward: the share of examples whose every answer token (EOS
  included) is the argmax, i.e. greedy decoding's exact match of the reference, without
  generating (what a short-answer probe such as ``trainer.data.facts_records`` needs; fast).
* **seconds** — wall time of both.

Prompts: ``--shots K`` exemplars ``"Question: {q}\\nAnswer: {answer}\\n\\n"`` (the first K records of
the few-shot file, as the harness's 8-shot GSM8K), then ``"Question: {q}\\nAnswer: "``.
AURAC and log-AURAC (:mod:`trainer.aurac`) summarise each metric over R (rank 0 excluded).
Outputs: ``results.json``, ``results.csv``, ``rank_curve.png`` in ``--out``, and the table in
each checkpoint's ``matryoshka.json`` (``eval``), which the server shows.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.aurac import aurac, log_aurac
from trainer.checkpoint import atomic_write_bytes, atomic_write_json, load_adapter, read_meta, update_meta
from trainer.data import GSM8K_PROMPT, IGNORE, DataError, Example, collate, read_jsonl, tokenize
from trainer.kernels import resolve_gemm, use_gemm
from trainer.models import load_model, resolve_device, resolve_dtype
from trainer.plot import plot_rank_curves
from trainer.train import token_loss_sum

STOP = "Question:"  # the next few-shot question: where a GSM8K completion ends
METRICS = ("strict", "flexible", "exact", "nll")
_STRICT = re.compile(r"#### (-?[0-9.,]+)")  # the harness's strict-match pattern; first match
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")  # flexible: the last match


@dataclass
class EvalConfig:
    """Every option of ``trainer eval``."""

    checkpoints: list[str]
    data: str  # GSM8K-style JSONL ({question, answer}, answer ending in "#### n")
    out: str  # folder for results.json, results.csv, rank_curve.png
    model: str | None = None  # base model; None → each checkpoint's base_model name
    inference_rule: str | None = None  # None → each checkpoint's own; else trained | paper | partial
    ranks: list[int] = field(default_factory=list)  # ranks of R to evaluate; empty → all of R
    limit: int | None = None  # the first N records only (after skip)
    skip: int = 0  # records skipped at the start of --data (held-out tails of a train file)
    generate: bool = True  # False: answer NLL only (strict/flexible are None), for fast sweeps
    shots: int = 0  # few-shot exemplars per prompt (the reference evaluation uses 8)
    fewshot_data: str | None = None  # None → train.jsonl next to --data
    batch_size: int = 8  # prompts per generation / NLL batch
    max_new_tokens: int = 256  # the harness's GSM8K generation budget
    device: str = "auto"
    dtype: str = "auto"  # trainer.models.DTYPE_HELP
    progress: bool = True

    def validate(self) -> None:
        problems = [f"{flag} must be >= {low}, got {v}" for flag, v, low in [
            ("--shots", self.shots, 0), ("--batch-size", self.batch_size, 1),
            ("--max-new-tokens", self.max_new_tokens, 1), ("--limit", self.limit, 1),
            ("--skip", self.skip, 0)]
            if v is not None and v < low]
        if not self.checkpoints:
            problems.append("give at least one checkpoint folder")
        if problems:
            raise ValueError("invalid eval options:\n  " + "\n  ".join(problems))


# -- answers ---------------------------------------------------------------------------------------
def to_number(text: str) -> Decimal | None:
    """'1,234' / '$18' / '18.' → Decimal; None when it is no number."""
    try:
        return Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None


def strict_answer(completion: str) -> Decimal | None:
    m = _STRICT.search(completion)
    return to_number(m.group(1)) if m else None


def flexible_answer(completion: str) -> Decimal | None:
    found = _NUMBER.findall(completion)
    return to_number(found[-1]) if found else None


def cut_at_stop(text: str) -> str:
    """The completion up to the next ``Question:`` (the model starting a new few-shot item)."""
    return text.split(STOP, 1)[0]


# -- the task --------------------------------------------------------------------------------------
@dataclass
class Task:
    """The prompts and references of one eval set."""

    data: str
    records: list[dict]
    prompts: list[str]
    references: list[Decimal]
    shots: int
    fewshot_data: str | None


def fewshot_prefix(exemplars: list[dict]) -> str:
    """"Question: {q}\\nAnswer: {answer}\\n\\n" per exemplar."""
    return "".join(GSM8K_PROMPT.format(question=r["question"]) + r["answer"] + "\n\n" for r in exemplars)


def fewshot_file(data: str, fewshot_data: str | None, shots: int) -> Path | None:
    if shots == 0:
        return None
    if fewshot_data:
        return Path(fewshot_data)
    default = Path(data).with_name("train.jsonl")
    if not default.is_file():
        raise DataError(f"--shots {shots} needs exemplars: there is no {default} next to --data; "
                        "pass --fewshot-data PATH (GSM8K-style JSONL)")
    return default


def read_gsm8k(path: str | Path, limit: int | None, flag: str, skip: int = 0) -> list[dict]:
    shape, records = read_jsonl(path, None if limit is None else skip + limit)
    if shape != "gsm8k":
        raise DataError(f"{flag} {path}: trainer eval scores GSM8K-style {{question, answer}} records; "
                        f"this file's records are {shape}")
    if skip >= len(records):
        raise DataError(f"{flag} {path}: --skip {skip} leaves nothing to evaluate; the file holds "
                        f"{len(records)} records")
    return records[skip:]


def load_task(data: str, limit: int | None, shots: int, fewshot_data: str | None, skip: int = 0) -> Task:
    records = read_gsm8k(data, limit, "--data", skip)
    references = []
    for i, rec in enumerate(records, 1):
        ref = strict_answer(rec["answer"])
        if ref is None:
            raise DataError(f"--data {data}: record {i} has no '#### <number>' in its answer: "
                            f"{rec['answer'][-80:]!r}")
        references.append(ref)
    shots_path = fewshot_file(data, fewshot_data, shots)
    prefix = ""
    if shots_path is not None:
        exemplars = read_gsm8k(shots_path, shots, "--fewshot-data")
        if len(exemplars) < shots:
            raise DataError(f"--fewshot-data {shots_path} has {len(exemplars)} records; --shots {shots} needs {shots}")
        prefix = fewshot_prefix(exemplars)
    prompts = [prefix + GSM8K_PROMPT.format(question=r["question"]) for r in records]
    return Task(str(data), records, prompts, references, shots, None if shots_path is None else str(shots_path))


# -- the model work ----------------------------------------------------------------------------------
def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the left so every row ends at T."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length (less padding); results are put back in input order."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def encode(task: Task, tok) -> tuple[list[list[int]], list[Example]]:
    """(prompt token ids for generation, NLL examples in the training format), once per tokenizer."""
    prompt_ids = [tok(p)["input_ids"] for p in task.prompts]  # BOS as in training (data.tokenize)
    examples, _ = tokenize(task.records, "gsm8k", tok, max_length=None, path=task.data)
    return prompt_ids, examples


@torch.no_grad()
def generate(model, tok, prompt_ids: list[list[int]], batch_size: int, max_new_tokens: int,
             bar: tqdm | None = None) -> tuple[list[str], int]:
    """Greedy completions (cut at ``Question:``) and the number of tokens generated (to EOS)."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos_ids = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos_ids),
                           pad_token_id=tok.pad_token_id, stop_strings=[STOP])
    done = eos_ids | {tok.pad_token_id}  # finished rows are padded
    completions, n_tokens = [""] * len(prompt_ids), 0
    device = next(model.parameters()).device
    for idx in _batches([len(p) for p in prompt_ids], batch_size):
        ids, mask = left_pad([prompt_ids[i] for i in idx], tok.pad_token_id)  # (B, T)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              generation_config=gen, tokenizer=tok)
        for i, row in zip(idx, seqs[:, ids.shape[1]:].tolist()):
            end = next((j for j, t in enumerate(row) if t in done), len(row))
            n_tokens += end
            completions[i] = cut_at_stop(tok.decode(row[:end], skip_special_tokens=True))
        if bar is not None:
            bar.update(1)
    return completions, n_tokens


@torch.no_grad()
def answer_scores(model, examples: list[Example], pad_id: int, batch_size: int,
                  bar: tqdm | None = None) -> tuple[float, float]:
    """Teacher-forced, one forward per batch: (answer NLL = Σ −log p(answer tokens) / #answer
    tokens, exact = the share of examples whose every answer token, EOS included, is the argmax).

    ``exact`` is greedy decoding's exact match of the reference answer without generating: greedy
    reproduces the answer iff each of its tokens is the argmax given the tokens before it.
    """
    device = next(model.parameters()).device
    total, count, exact = 0.0, 0, 0
    for idx in _batches([len(e.input_ids) for e in examples], batch_size):
        t = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits  # (B, T, V)
        labels = t["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        total += float(token_loss_sum(logits, t["labels"]))
        count += int((labels != IGNORE).sum())
        hit = (logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE)  # (B, T-1)
        exact += int(hit.all(dim=1).sum())
        if bar is not None:
            bar.update(1)
    return total / count, exact / len(examples)


@torch.no_grad()
def loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) summed over its tokens, and whether greedy decoding would
    produce it (every token the argmax): what lm-evaluation-harness's loglikelihood requests
    ask a model, computed in-process at the adapter's current rank, one unpadded forward."""
    device = next(model.parameters()).device
    ids = torch.tensor([context + continuation], device=device)  # (1, T)
    logp = model(input_ids=ids).logits[0, len(context) - 1:-1].float().log_softmax(-1)  # (len(cont), V)
    target = torch.tensor(continuation, device=device)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def evaluate_rank(model, tok, task: Task, encoded: tuple[list[list[int]], list[Example]], batch_size: int,
                  max_new_tokens: int, desc: str, progress: bool = True, generate_answers: bool = True) -> dict:
    """One row of the table: strict, flexible (fractions correct; None without generation), exact
    (teacher-forced greedy exact match of the reference answer), nll, n, seconds, generated_tokens."""
    prompt_ids, examples = encoded
    n_batches = (1 + generate_answers) * -(-len(prompt_ids) // batch_size)
    with tqdm(total=n_batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True) as bar:
        t0 = time.perf_counter()
        completions, n_tokens = (generate(model, tok, prompt_ids, batch_size, max_new_tokens, bar)
                                 if generate_answers else (None, 0))
        nll, exact = answer_scores(model, examples, tok.pad_token_id, batch_size, bar)
        seconds = time.perf_counter() - t0
    n = len(task.references)
    strict = flexible = None
    if completions is not None:
        strict = sum(strict_answer(c) == ref for c, ref in zip(completions, task.references)) / n
        flexible = sum(flexible_answer(c) == ref for c, ref in zip(completions, task.references)) / n
    return {"strict": strict, "flexible": flexible, "exact": exact, "nll": nll, "n": n, "seconds": round(seconds, 3),
            "generated_tokens": n_tokens}


def summarise(per_rank: dict[int, dict]) -> tuple[dict, dict]:
    """(AURAC, log-AURAC) of each measured metric over the ranks ≥ 1 (empty when only rank 0 was
    evaluated; accuracies are left out when nothing was generated)."""
    ranks = sorted(k for k in per_rank if k > 0)
    metrics = [m for m in METRICS if ranks and all(per_rank[k][m] is not None for k in ranks)]
    return ({m: aurac(ranks, [per_rank[k][m] for k in ranks]) for m in metrics},
            {m: log_aurac(ranks, [per_rank[k][m] for k in ranks]) for m in metrics})


def score_ranks(model, tok, adapter, examples: list[Example], batch_size: int, data: str, model_name: str) -> dict:
    """The teacher-forced table (exact, nll) at rank 0 and every rank of R, in the shape of
    ``matryoshka.json``'s ``eval`` (as ``trainer eval --no-generate`` writes it), plus an
    ``example``: one of the examples that rank 0 gets wrong and the full rank right, with every
    rank's greedy answer (what the server's start-up line and /ranks show). What ``trainer train
    --eval-data`` stores at the end of training. Leaves the adapter at full rank."""
    per_rank = {}
    for k in [0, *adapter.config.ranks]:
        adapter.set_rank(k)
        t0 = time.perf_counter()
        nll, exact = answer_scores(model, examples, tok.pad_token_id, batch_size)
        per_rank[k] = {"strict": None, "flexible": None, "exact": exact, "nll": nll, "n": len(examples),
                       "seconds": round(time.perf_counter() - t0, 3), "generated_tokens": 0}
    example = showcase(model, tok, adapter, examples[:32], batch_size)
    adapter.set_rank(adapter.config.r)
    au, log_au = summarise(per_rank)
    return {"data": data, "skip": 0, "n": len(examples), "shots": 0, "max_new_tokens": 0, "model": model_name,
            "inference_rule": adapter.config.inference_rule,
            "per_rank": {str(k): row for k, row in per_rank.items()}, "aurac": au, "log_aurac": log_au,
            **({"example": example} if example else {})}


def showcase(model, tok, adapter, examples: list[Example], batch_size: int) -> dict | None:
    """The first example whose reference rank 0 does not generate and the full rank does, with
    the greedy answer of every rank (None when there is none): the trade-off in one prompt."""
    prompts = [e.input_ids[:e.n_prompt] for e in examples]
    refs = [tok.decode(e.input_ids[e.n_prompt:], skip_special_tokens=True) for e in examples]
    budget = max(len(e.input_ids) - e.n_prompt for e in examples) + 2
    answers = {}
    for k in (0, adapter.config.r):
        adapter.set_rank(k)
        answers[k] = generate(model, tok, prompts, batch_size, budget)[0]
    pick = next((i for i, ref in enumerate(refs)
                 if answers[0][i].strip() != ref.strip() and answers[adapter.config.r][i].strip() == ref.strip()), None)
    if pick is None:
        return None
    by_rank = {}
    for k in [0, *adapter.config.ranks]:
        adapter.set_rank(k)
        by_rank[str(k)] = answers[k][pick] if k in answers else generate(model, tok, [prompts[pick]], 1, budget)[0][0]
    return {"prompt": tok.decode(prompts[pick]), "reference": refs[pick], "max_new_tokens": budget,
            "answers": by_rank}


def eval_checkpoint(ckpt: str | Path, data: str, model: str | None = None, batch_size: int = 16) -> dict:
    """:func:`score_ranks` of a written checkpoint on ``data`` (a JSONL path or ``facts:N``),
    stored in its ``matryoshka.json`` (``eval``); returns the table."""
    from trainer.data import load_examples

    meta = read_meta(ckpt)
    name = model or meta["base_model"]["name"]
    device = resolve_device("auto")
    net, tok = load_model(name, device, resolve_dtype("auto", device))
    adapter, _ = load_adapter(ckpt, net)
    net.eval()
    examples, report = load_examples(data, tok, None, None)
    return score_and_store(ckpt, net, tok, adapter, examples, batch_size, report.path, name)


@torch.no_grad()
def score_and_store(ckpt: str | Path, model, tok, adapter, examples: list[Example], batch_size: int, data: str,
                    model_name: str) -> dict:
    """:func:`score_ranks`, written into ``ckpt``'s ``matryoshka.json`` as its ``eval`` table."""
    table = score_ranks(model, tok, adapter, examples, batch_size, data, model_name)
    update_meta(ckpt, eval=table)
    return table


def rank_table_text(table: dict) -> str:
    """The ``eval`` table as the terminal shows it: one line per rank."""
    lines = [f"eval on {table['data']} ({table['n']} examples, rule {table['inference_rule']}):",
             "  rank   exact   answer NLL"]
    example = table.get("example") or {}
    if example:
        lines[1] += f"   answer to {example['prompt']!r} (reference {example['reference']!r})"
    for k, row in table["per_rank"].items():
        said = f"   {example['answers'][k]!r}" if k in example.get("answers", {}) else ""
        lines.append(f"  {k:>4}  {100 * row['exact']:5.1f}%   {row['nll']:10.4f}{said}")
    return "\n".join(lines)


# -- the recipe ---------------------------------------------------------------------------------------
def select_ranks(meta: dict, wanted: list[int], ckpt: str) -> list[int]:
    """R, or the asked subset of it (rank 0 is always evaluated); an error lists the valid ranks."""
    if not wanted:
        return list(meta["ranks"])
    bad = [k for k in wanted if k != 0 and k not in meta["ranks"]]
    if bad:
        raise ValueError(f"--ranks {bad} not in the rank set of {ckpt}; valid ranks are {[0, *meta['ranks']]}")
    return sorted({k for k in wanted if k != 0})


def _labels(checkpoints: list[str]) -> list[str]:
    names = [Path(c).resolve().name for c in checkpoints]
    return [n if names.count(n) == 1 else str(c) for n, c in zip(names, checkpoints)]


def run_eval(cfg: EvalConfig, command: list[str] | None = None) -> dict:
    """Evaluate every checkpoint at rank 0 and each of its ranks; write the outputs; return results.json."""
    cfg.validate()
    metas = [read_meta(c) for c in cfg.checkpoints]  # every bad input fails before any model loads
    ranks = [select_ranks(m, cfg.ranks, c) for m, c in zip(metas, cfg.checkpoints)]
    task = load_task(cfg.data, cfg.limit, cfg.shots, cfg.fewshot_data, cfg.skip)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    base_rows: dict[str, dict] = {}  # model name → its rank-0 row: evaluated once per base model
    entries = []
    for ckpt, meta, label, rks in zip(cfg.checkpoints, metas, _labels(cfg.checkpoints), ranks):
        model_name = cfg.model or meta["base_model"]["name"]
        model, tok = load_model(model_name, device, dtype)
        gemm = resolve_gemm("auto", device, dtype, model=model)  # probed on the base model's forward
        adapter, _ = load_adapter(ckpt, model, cfg.inference_rule)
        use_gemm(model, gemm)  # greedy decoding: few rows per step
        encoded = encode(task, tok)
        per_rank: dict[int, dict] = {}
        for k in [0, *rks]:
            if k == 0 and model_name in base_rows:
                per_rank[0] = base_rows[model_name]
                continue
            adapter.set_rank(k)
            row = per_rank[k] = evaluate_rank(model, tok, task, encoded, cfg.batch_size, cfg.max_new_tokens,
                                              f"{label} rank {k}", cfg.progress, cfg.generate)
            acc = (f"strict {row['strict']:.3f}  flexible {row['flexible']:.3f}  " if cfg.generate else "")
            tqdm.write(f"{label} rank {k}: {acc}exact {row['exact']:.3f}  nll {row['nll']:.4f}  {row['seconds']:.1f}s")
        base_rows[model_name] = per_rank[0]
        au, log_au = summarise(per_rank)
        table = {"data": task.data, "skip": cfg.skip, "n": len(task.records), "shots": task.shots,
                 "max_new_tokens": cfg.max_new_tokens, "model": model_name,
                 "inference_rule": adapter.config.inference_rule,
                 "per_rank": {str(k): row for k, row in per_rank.items()}, "aurac": au, "log_aurac": log_au}
        update_meta(ckpt, eval=table)
        entries.append({"checkpoint": str(ckpt), "label": label, "method": meta["method"], "r": meta["r"],
                        "scaling": meta["scaling"], **table})
        del adapter, model
    results = {
        "command": shlex.join(command if command is not None else sys.argv),
        "versions": _versions(),
        "settings": {"data": task.data, "n": len(task.records), "skip": cfg.skip, "limit": cfg.limit,
                     "generate": cfg.generate, "shots": task.shots,
                     "fewshot_data": task.fewshot_data, "batch_size": cfg.batch_size,
                     "max_new_tokens": cfg.max_new_tokens, "device": str(device), "dtype": str(dtype)},
        "checkpoints": entries,
    }
    write_outputs(Path(cfg.out), results)
    return results


def write_outputs(out: Path, results: dict) -> None:
    """results.json, results.csv (one row per checkpoint and rank), rank_curve.png — atomically."""
    atomic_write_json(out / "results.json", results)
    buf = io.StringIO()
    cols = ["checkpoint", "label", "rank", "strict", "flexible", "exact", "nll", "n", "seconds", "generated_tokens"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for e in results["checkpoints"]:
        for k, row in e["per_rank"].items():
            writer.writerow([e["checkpoint"], e["label"], k, *(row[c] for c in cols[3:])])
    atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    atomic_write_bytes(out / "rank_curve.png", plot_rank_curves(results["checkpoints"]))


def _versions() -> dict:
    import transformers

    try:
        ours = importlib.metadata.version("matryoshka-lora")
    except importlib.metadata.PackageNotFoundError:
        ours = "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "matryoshka-lora": ours}
