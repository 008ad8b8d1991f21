"""``client`` command line: ``generate``, ``ranks`` and ``bench`` (the load generator)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from client.api import DEFAULT_URL, Client
from client.errors import ClientError


def rank_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rank takes an integer or 'auto', got {text!r}") from None


def _connection_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command shares. They are accepted before the command and after it
    (``client --url U ranks`` and ``client ranks --url U``): the sub-commands' copies default to
    SUPPRESS, so one given before the command is not overwritten by a default after it."""
    def d(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--url", default=d(os.environ.get("MLORA_URL", DEFAULT_URL)), help="server URL (env MLORA_URL)")
    p.add_argument("--api-key", default=d(os.environ.get("MLORA_API_KEY")), help="(env MLORA_API_KEY)")
    p.add_argument("--timeout", type=float, default=d(300.0), help="seconds per request")
    p.add_argument("--retries", type=int, default=d(2), help="retries on 429/503, honouring Retry-After")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="client", description="Talk to a rank-elastic server.")
    _connection_options(p, defaults=True)
    shared = argparse.ArgumentParser(add_help=False)
    _connection_options(shared, defaults=False)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text at a rank", parents=[shared])
    g.add_argument("prompt")
    g.add_argument("--rank", type=rank_arg, default=None, help="a rank in {0} ∪ R, or auto")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int)
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--json", action="store_true", help="print the whole response as JSON")

    sub.add_parser("ranks", help="the served ranks, scaling and per-rank eval table", parents=[shared])
    from client.loadgen import add_parser

    add_parser(sub, parents=[shared])
    return p


def cmd_generate(c: Client, args) -> int:
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "stop": args.stop, "seed": args.seed}
    params = {k: v for k, v in params.items() if v is not None}
    if args.stream:
        for chunk in c.stream(args.prompt, args.rank, **params):
            if chunk.done:
                print(f"\n[rank {chunk.rank}, {chunk.finish_reason}, {chunk.usage.completion_tokens} tokens]",
                      file=sys.stderr)
            else:
                print(chunk.text, end="", flush=True)
        return 0
    res = c.generate(args.prompt, args.rank, **params)
    if args.json:
        print(res.model_dump_json(indent=2))
    else:
        print(res.text)
        print(f"[rank {res.rank}, {res.finish_reason}, {res.usage.completion_tokens} tokens, "
              f"{res.timings.total_s:.2f} s]", file=sys.stderr)
    return 0


def cmd_ranks(c: Client, args) -> int:
    print(json.dumps(c.ranks().model_dump(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from client.loadgen import run_bench

        return run_bench(args)
    try:
        with Client(args.url, args.api_key, args.timeout, args.retries) as c:
            return {"generate": cmd_generate, "ranks": cmd_ranks}[args.command](c, args)
    except ClientError as e:
        print(f"client: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a request the protocol model refuses, before any network
        print(f"client: invalid request: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"client: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
