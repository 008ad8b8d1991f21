"""Any rank of any checkpoint through lm-evaluation-harness's own tasks, in-process.

``trainer eval CKPT --harness gsm8k --shots 8`` loads the base model and the checkpoint once,
wraps the model in the harness's Hugging Face model class (``HFLM``), and, for rank 0 and every
rank k of R (or ``--ranks``), sets the adapter to rank k and runs ``lm_eval.simple_evaluate``:
the harness's prompts, few-shot sampling, stop sequences, answer extraction and metrics, not a
re-implementation of them. Tasks come from the harness or from ``--include-path`` (YAML files).
``--harness-data DIR`` keeps the harness's task and reads its splits from ``DIR/<split>.jsonl``
instead of the hub (a task that ``include:``-s the harness's own YAML, with ``dataset_path: json``):
what a machine without a dataset hub runs, e.g. ``--harness gsm8k --harness-data
../shared/data/gsm8k``.

Outputs: ``harness.json`` in ``--out`` (every rank's metrics, the command, versions) and the same
table in the checkpoint's ``matryoshka.json`` under ``eval_harness.<task>``; with ``--log-samples``
every document's requests and responses per rank (``samples_<ckpt>_<task>_rank<k>.jsonl``).

Needs the ``harness`` extra (``pip install -e '.[harness]'``, lm-eval 0.4.13); its dependencies
are many, so a venv of its own suits it (the tests use ``.venv-harness``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.checkpoint import atomic_write_json, load_adapter, read_meta, update_meta
from trainer.models import load_model, resolve_device, resolve_dtype


@dataclass
class HarnessConfig:
    """The options of ``trainer eval --harness``."""

    checkpoints: list[str]
    task: str  # a harness task name (gsm8k, hellaswag, …) or one defined under include_path
    out: str
    include_path: str | None = None
    harness_data: str | None = None  # a folder of <split>.jsonl files that replace the task's hub dataset
    shots: int | None = None  # None: the task's own default
    limit: int | None = None  # the first N documents of the task's evaluation split
    ranks: list[int] = field(default_factory=list)  # empty: all of R (rank 0 always)
    batch_size: int = 8
    model: str | None = None
    inference_rule: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 1234  # the harness's few-shot sampling seed (its default)
    log_samples: bool = False  # also write every document's requests and responses, per rank
    max_new_tokens: int | None = None  # None: the task's own generation budget (max_gen_toks)


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError("--harness needs lm-evaluation-harness in this environment: pip install -e '.[harness]' "
                         f"(lm-eval==0.4.13), ideally in a venv of its own ({e})") from e
    return lm_eval, HFLM, TaskManager


@contextlib.contextmanager
def _without_env_report(lm_eval):
    """``simple_evaluate`` ends every call by collecting the environment (torch's collect_env:
    ``pip list`` and more, ~1–5 s); that report is not kept here (harness.json records versions
    once), and at every rank of every checkpoint it would cost more than the evaluation."""
    import lm_eval.evaluator as evaluator
    saved = evaluator.add_env_info
    evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        evaluator.add_env_info = saved


def run_harness(cfg: HarnessConfig, command: list[str] | None = None) -> dict:
    """Evaluate every checkpoint at rank 0 and each of its ranks with the harness's task."""
    from trainer.evaluate import select_ranks

    lm_eval, HFLM, TaskManager = _harness()
    metas = [read_meta(c) for c in cfg.checkpoints]  # every bad input fails before any model loads
    ranks = [select_ranks(m, cfg.ranks, c) for m, c in zip(metas, cfg.checkpoints)]
    from lm_eval.tasks import get_task_dict

    manager = TaskManager(include_path=cfg.include_path)
    if cfg.task not in manager.all_tasks:
        raise ValueError(f"--harness {cfg.task}: no such task in lm-eval {importlib.metadata.version('lm_eval')}"
                         + (f" or under --include-path {cfg.include_path}" if cfg.include_path else "")
                         + " (list them with `lm_eval ls tasks`)")
    task = cfg.task
    if cfg.harness_data:
        local = Path(cfg.out) / "tasks"
        task = local_task(manager, cfg.task, Path(cfg.harness_data), local)
        # only the local task and the user's: indexing the harness's thousands of YAMLs again takes seconds
        manager = TaskManager(include_path=[p for p in (cfg.include_path, str(local)) if p], include_defaults=False)
    tasks = get_task_dict([task], manager)  # built once (data, few-shot docs), evaluated at every rank
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    entries = []
    for ckpt, meta, rks in zip(cfg.checkpoints, metas, ranks):
        model_name = cfg.model or meta["base_model"]["name"]
        model, tok = load_model(model_name, device, dtype)
        adapter, _ = load_adapter(ckpt, model, cfg.inference_rule)
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, device=str(device))
        per_rank = {}
        budget = f"max_gen_toks={cfg.max_new_tokens}" if cfg.max_new_tokens else None  # None: the task's own
        for k in [0, *rks]:
            adapter.set_rank(k)
            t0 = time.perf_counter()
            with _without_env_report(lm_eval):
                out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), num_fewshot=cfg.shots,
                                              limit=cfg.limit, gen_kwargs=budget, task_manager=manager, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                              torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                                              bootstrap_iters=0, log_samples=cfg.log_samples)
            n_docs = (out.get("n-samples") or {}).get(task, {}).get("effective")
            metrics = {name: value for name, value in out["results"][task].items()
                       if name != "alias" and isinstance(value, (int, float))}
            per_rank[str(k)] = {**metrics, "seconds": round(time.perf_counter() - t0, 3)}
            if cfg.log_samples:
                samples = Path(cfg.out) / f"samples_{Path(ckpt).name}_{cfg.task}_rank{k}.jsonl"  # the asked name
                samples.parent.mkdir(parents=True, exist_ok=True)
                samples.write_text("".join(json.dumps(logged(x), default=str) + "\n" for x in out["samples"][task]))
            shown = "  ".join(f"{n} {v:.4f}" for n, v in metrics.items() if not n.endswith("_stderr,none"))
            print(f"{ckpt} rank {k}: {shown}", flush=True)
        table = {"task": cfg.task, "data": cfg.harness_data or "the task's own", "shots": cfg.shots, "n": n_docs,
                 "limit": cfg.limit, "model": model_name,
                 "inference_rule": adapter.config.inference_rule, "lm_eval": importlib.metadata.version("lm_eval"),
                 "per_rank": per_rank}
        update_meta(ckpt, eval_harness={**(read_meta(ckpt).get("eval_harness") or {}), cfg.task: table})
        entries.append({"checkpoint": str(ckpt), "method": meta["method"], "r": meta["r"], **table})
        del lm, adapter, model
    versions = {name: importlib.metadata.version(name) for name in ("lm_eval", "torch", "transformers")}
    results = {"command": shlex.join(command if command is not None else sys.argv), "versions": versions,
               "checkpoints": entries}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "harness.json", results)
    return results


def logged(sample: dict) -> dict:
    """A sample in the shape ``lm_eval --log_samples`` writes (arguments as ``gen_args_i.arg_j``)."""
    from lm_eval.utils import sanitize_list

    return {**sample, "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(args)}
                                    for i, args in enumerate(sample["arguments"])},
            "resps": sanitize_list(sample["resps"]), "filtered_resps": sanitize_list(sample["filtered_resps"]),
            "target": str(sample["target"])}


LOCAL_TASK = """\
# lm-evaluation-harness's own {task} task (prompts, few-shot, answer extraction, metrics), its data
# read from local files instead of the hub
include: {yaml}
task: {name}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
{files}"""


def local_task(manager, task: str, data: Path, folder: Path) -> str:
    """Write ``folder/<task>_local.yaml``: the harness's ``task`` with every split read from
    ``data/<split>.jsonl``; returns the new task's name."""
    entry = manager.task_index.get(task)
    yaml = getattr(entry, "yaml_path", None) if entry is not None else None
    if not yaml or yaml == -1 or str(getattr(entry, "kind", "")).endswith("GROUP"):
        raise ValueError(f"--harness-data: {task} is a group or has no YAML of its own to take the data of")
    splits = sorted(data.glob("*.jsonl"))
    if not splits:
        raise ValueError(f"--harness-data {data}: no <split>.jsonl files there (e.g. train.jsonl, test.jsonl)")
    name = f"{task}_local"
    folder.mkdir(parents=True, exist_ok=True)
    files = "".join(f"    {p.stem}: {p.resolve()}\n" for p in splits)
    (folder / f"{name}.yaml").write_text(LOCAL_TASK.format(task=task, yaml=yaml, name=name, files=files))
    return name
