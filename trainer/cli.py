"""``trainer`` command line: ``train`` and ``info``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from trainer.checkpoint import CheckpointError, describe, read_meta
from trainer.data import DataError
from trainer.inject import DEFAULT_TARGETS
from trainer.nested import SCALINGS, TRAIN_METHODS


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8; got {text!r}") from e


def targets_arg(text: str) -> list[str] | str:
    """``q_proj,v_proj`` (names) or ``re:<regex>`` (full-match on module paths)."""
    if text.startswith("re:"):
        return text[3:]
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--targets needs module names like q_proj,v_proj or re:<regex>")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Train and inspect nested (Matryoshka) LoRA adapters.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train LoRA / DyLoRA / MatryoshkaLoRA and write a servable checkpoint")
    t.add_argument("--model", default="smollm2-135m", help="local HF folder, hub id, or smollm2-135m (embedded)")
    t.add_argument("--data", help="JSONL: {question,answer} | {messages} | {prompt,completion}; "
                   "omitted: a generated arithmetic demo set")
    t.add_argument("--method", choices=TRAIN_METHODS, default="matryoshka")
    t.add_argument("--rank", type=int, default=64, help="r, the max rank (default 64)")
    t.add_argument("--ranks", type=int_list, default=[], help="R, e.g. 1,2,4,8 (default: powers of two up to r)")
    t.add_argument("--scaling", choices=SCALINGS, default="sqrt", help="s(k): 1, 1/k or 1/sqrt(k)")
    t.add_argument("--targets", type=targets_arg, default=list(DEFAULT_TARGETS),
                   help=f"module names (default {','.join(DEFAULT_TARGETS)}) or re:<regex>")
    t.add_argument("--a-init", choices=("peft", "reference"), default="peft",
                   help="A's kaiming-uniform fan-in: in_features (peft) or r (reference code)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-length", type=int, default=512)
    t.add_argument("--limit", type=int, help="use only the first N examples")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--clip", type=float, default=1.0, help="max gradient norm; 0 disables")
    t.add_argument("--save-every", type=int, default=0, help="steps between periodic checkpoints (OUT/step-N)")
    t.add_argument("--log-every", type=int, default=1)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16")
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    t.add_argument("--resume", help="checkpoint folder (with training state) to continue from")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    i = sub.add_parser("info", help="show a checkpoint's metadata and the p vector its method implies")
    i.add_argument("ckpt")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.train import TrainConfig, train

    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    train(cfg)
    return 0


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
    blocks, prev, start = [], None, 1
    for i, v in enumerate(info["p"] + [None], 1):
        if v != prev and prev is not None:
            blocks.append(f"p[{start}..{i - 1}]={prev:.6f}" if i - 1 > start else f"p[{start}]={prev:.6f}")
            start = i
        elif prev is None:
            start = i
        prev = v
    print("p (training) " + "  ".join(blocks))
    if info.get("eval"):
        print("eval         " + json.dumps(info["eval"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "info": cmd_info}[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError, DataError) as e:
        print(f"trainer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
