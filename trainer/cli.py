"""``trainer`` command line: ``train``, ``info``, ``eval``, ``export`` and ``nest``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from trainer.checkpoint import CheckpointError, describe, read_meta
from trainer.data import DataError
from trainer.flags import add_flags, flag_values, int_list
from trainer.inject import AdapterConfig
from trainer.models import DTYPE_HELP
from trainer.nested import INFERENCE_RULES, SCALINGS
from trainer.train import TrainConfig

RULE_HELP = next(f for f in fields(AdapterConfig) if f.name == "inference_rule").metadata["help"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Train and inspect nested (Matryoshka) LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train LoRA / DyLoRA / MatryoshkaLoRA and write a servable checkpoint")
    add_flags(t, TrainConfig)  # one flag per TrainConfig / AdapterConfig field, help and default from it

    i = sub.add_parser("info", help="show a checkpoint's metadata and the p vector its method implies")
    i.add_argument("ckpt")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    e = sub.add_parser("eval", help="GSM8K accuracy, answer NLL and time at rank 0 and every rank; AURAC; or any "
                       "lm-evaluation-harness task at every rank (--harness)")
    e.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint folders (overlaid in the plot)")
    e.add_argument("--data", help="GSM8K-style JSONL {question, answer ... #### n} (required without --harness)")
    e.add_argument("--harness", metavar="TASK", help="instead: lm-evaluation-harness's own task TASK (e.g. gsm8k), "
                   "run in-process with the adapter at each rank (needs the 'harness' extra); writes harness.json")
    e.add_argument("--include-path", help="--harness: a folder of task YAMLs of your own")
    e.add_argument("--harness-data", metavar="DIR", help="--harness: the task's splits from DIR/<split>.jsonl "
                   "instead of the hub (e.g. ../shared/data/gsm8k), its prompts and metrics unchanged")
    e.add_argument("--log-samples", action="store_true", help="--harness: write every document's requests and "
                   "responses per rank")
    e.add_argument("--ranks", type=int_list, default=[], help="ranks of R to evaluate (default: all; 0 always)")
    e.add_argument("--limit", type=int, help="evaluate only the first N records (after --skip)")
    e.add_argument("--skip", type=int, default=0, help="skip the first N records (e.g. to hold out the end "
                   "of a train file)")
    e.add_argument("--no-generate", dest="generate", action="store_false",
                   help="answer NLL only: no generation, no accuracy (fast; for sweeps)")
    e.add_argument("--shots", type=int, help="few-shot exemplars per prompt (reference: 8; default 0, "
                   "with --harness the task's own)")
    e.add_argument("--fewshot-data", help="exemplar JSONL (default: train.jsonl next to --data)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, help="generation budget (default 256, as the harness's "
                   "gsm8k; with --harness: overrides the task's own max_gen_toks)")
    e.add_argument("--model", help="base model (default: each checkpoint's base_model name)")
    e.add_argument("--inference-rule", choices=("auto", *INFERENCE_RULES),
                   help=RULE_HELP + " (default: each checkpoint's own)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    e.add_argument("--out", required=True, help="folder for results.json, results.csv, rank_curve.png")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    x = sub.add_parser("export", help="write one rank as a plain PEFT LoRA adapter (PEFT, vLLM, TGI, LoRAX)")
    x.add_argument("ckpt")
    x.add_argument("--rank", type=int, required=True, help="k, one of the checkpoint's ranks")
    x.add_argument("--out", required=True, help="folder to write")
    x.add_argument("--inference-rule", choices=("auto", *INFERENCE_RULES),
                   help=RULE_HELP + " (default: the checkpoint's own); folded into A")

    n = sub.add_parser("nest", help="make a PEFT LoRA adapter rank-elastic by SVD, without retraining")
    n.add_argument("peft_dir", metavar="PEFT_DIR")
    n.add_argument("--out", required=True, help="checkpoint folder to write")
    n.add_argument("--ranks", type=int_list, default=[], help="R (default: powers of two below r, then r)")
    n.add_argument("--model", help="base model, for the fingerprint (default: base_model_name_or_path)")
    n.add_argument("--scaling", choices=SCALINGS, default="none",
                   help="s(k); only none makes every rank-k prefix the best rank-k approximation")
    n.add_argument("--inference-rule", choices=("auto", *INFERENCE_RULES), default="auto",
                   help=RULE_HELP + " (trained serves the best rank-k part under any scaling)")
    n.add_argument("--eval-data", metavar="DATA", help="then score rank 0 and every rank on DATA (as trainer "
                   "train --eval-data: a JSONL path or facts:N[:SEED]), print the table, store it in the checkpoint")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.train import train

    train(TrainConfig.from_flags(flag_values(TrainConfig, args)))
    return 0


def _runs(values: list[float], name: str) -> str:
    """[2, 2, 1] → 'c[1..2]=2  c[3]=1': a coefficient vector by its runs of equal values."""
    blocks, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            span = f"[{start + 1}..{i}]" if i - 1 > start else f"[{i}]"
            blocks.append(f"{name}{span}={values[start]:.6f}")
            start = i
    return "  ".join(blocks)


def cmd_info(args: argparse.Namespace) -> int:
    info = describe(read_meta(args.ckpt))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    base = info["base_model"]
    print(f"checkpoint   {args.ckpt}")
    print(f"method       {info['method']}   r={info['r']}   scaling={info['scaling']}   step={info.get('step', '-')}")
    print(f"ranks        {info['ranks']}   (plus 0: the base model)")
    print(f"base model   {base['name']}  fingerprint {base['fingerprint']}")
    print(f"targets      {info['target_modules']}")
    print("s(k)         " + "  ".join(f"{k}:{v:.4g}" for k, v in info["scale_per_rank"].items()))
    print(f"inference    rule {info['inference']['rule']}: rank k serves W x + B[:, :k] (c_k ⊙ A[:k] x)")
    for k, c in info["inference"]["coeffs"].items():
        print(f"  rank {k:>4}  " + _runs(c, "c"))
    print("training     " + _runs(info["p"], "p"))
    ev = info.get("eval") or {}
    if "per_rank" in ev:
        print(f"eval         {ev['data']}  n={ev['n']}  shots={ev['shots']}")
        for k, row in ev["per_rank"].items():
            acc = "" if row["strict"] is None else f"strict {row['strict']:.4f}  flexible {row['flexible']:.4f}  "
            exact = f"exact {row['exact']:.4f}  " if row.get("exact") is not None else ""
            print(f"  rank {k:>4}  {acc}{exact}nll {row['nll']:.4f}  {row['seconds']:.1f}s")
        for name in ("aurac", "log_aurac"):
            if ev.get(name):
                print(f"  {name:<10} " + "  ".join(f"{m} {v:.4f}" for m, v in ev[name].items()))
    elif ev:
        print("eval         " + json.dumps(ev))
    return 0


HARNESS_ONLY = {"include_path": None, "harness_data": None, "log_samples": False}
NOT_WITH_HARNESS = {"data": None, "skip": 0, "generate": True, "fewshot_data": None}


def cmd_eval(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    command = ["trainer", *(sys.argv[1:] if argv is None else argv)]
    if args.harness:
        from trainer.harness import HarnessConfig, run_harness

        clash = [f"--{k.replace('_', '-')}" for k, default in NOT_WITH_HARNESS.items() if getattr(args, k) != default]
        if clash:
            raise ValueError(f"--harness {args.harness} runs the harness's own task: {', '.join(clash)} "
                             "would be ignored, so they are refused (the task defines its data, prompts and "
                             "generation)")
        names = {f.name for f in fields(HarnessConfig)}
        cfg = HarnessConfig(task=args.harness, **{k: v for k, v in vars(args).items() if k in names})
        run_harness(cfg, command)
        print(f"results written to {cfg.out}/harness.json and each checkpoint's matryoshka.json (eval_harness)")
        return 0
    from trainer.evaluate import EvalConfig, run_eval

    given = [f"--{k.replace('_', '-')}" for k, default in HARNESS_ONLY.items() if getattr(args, k) != default]
    if args.data is None or given:
        raise ValueError("--data is required (or --harness TASK)" if args.data is None else
                         f"{', '.join(given)} only applies with --harness")
    names = {f.name for f in fields(EvalConfig)}
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k in names and k not in ("shots", "max_new_tokens")},
                     shots=args.shots or 0, max_new_tokens=args.max_new_tokens or 256)
    run_eval(cfg, command)
    print(f"results written to {cfg.out}/results.json, results.csv, rank_curve.png")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export_rank

    out = export_rank(args.ckpt, args.rank, args.out, args.inference_rule)
    print(f"rank-{args.rank} PEFT adapter written to {out}")
    return 0


def cmd_nest(args: argparse.Namespace) -> int:
    from trainer.nest import nest_adapter

    out = nest_adapter(args.peft_dir, args.out, args.model, args.ranks, args.scaling, args.inference_rule)
    print(f"nested checkpoint written to {out}")
    if args.eval_data:
        from trainer.evaluate import eval_checkpoint, rank_table_text

        print(rank_table_text(eval_checkpoint(out, args.eval_data)))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "info": cmd_info, "eval": lambda a: cmd_eval(a, argv),
                "export": cmd_export, "nest": cmd_nest}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError, DataError) as e:
        print(f"trainer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
