"""``server`` command: flags override ``MLORA_*`` environment variables, which override defaults.

SIGTERM drains: ``/ready`` turns false and new requests get 503 at once, in-flight requests
finish (up to ``--grace-period-s``), then the process exits 0. A second SIGTERM/SIGINT exits now.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

import uvicorn
from pydantic import ValidationError

from server.settings import ServerSettings

FLAGS = {  # flag → (settings field, type)
    "--model": ("model", str), "--adapter": ("adapter", str), "--host": ("host", str), "--port": ("port", int),
    "--device": ("device", str), "--dtype": ("dtype", str), "--served-name": ("served_name", str),
    "--max-batch-size": ("max_batch_size", int), "--max-queue": ("max_queue", int),
    "--max-prefill-tokens": ("max_prefill_tokens", int),
    "--prefill-chunk-tokens": ("prefill_chunk_tokens", int),
    "--prefill-piece-budget": ("prefill_piece_budget", float), "--max-new-tokens-limit": ("max_new_tokens_limit", int),
    "--request-timeout-s": ("request_timeout_s", float), "--max-body-bytes": ("max_body_bytes", int),
    "--api-key": ("api_key", str), "--default-rank": ("default_rank", str), "--merge-rank": ("merge_rank", str),
    "--merge-dwell-s": ("merge_dwell_s", float), "--inference-rule": ("inference_rule", str), "--fuse": ("fuse", str),
    "--gemm": ("gemm", str), "--decode": ("decode", str), "--compile": ("compile", str),
    "--grace-period-s": ("grace_period_s", float), "--log-level": ("log_level", str),
    "--step-timeout-s": ("step_timeout_s", float),
    "--controller": ("controller", str), "--min-rank": ("min_rank", int), "--max-rank": ("max_rank", int),
    "--dwell-s": ("dwell_s", float), "--down-queue": ("down_queue", float), "--up-queue": ("up_queue", float),
    "--smooth-s": ("smooth_s", float),
    "--slo-p95-ms": ("slo_p95_ms", float), "--prometheus-url": ("prometheus_url", str),
    "--calibrate-steps": ("calibrate_steps", int), "--min-gain": ("min_gain", float),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="server", description="Serve a base model + nested LoRA adapter at any rank.")
    for flag, (name, typ) in FLAGS.items():
        field = ServerSettings.model_fields[name]
        text = f"{field.description or ''} (env MLORA_{name.upper()}; default {field.default!r})"
        p.add_argument(flag, dest=name, type=typ, default=None, help=text.replace("%", "%%"))  # argparse formats %
    return p


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before exiting (with status 0)."""

    def __init__(self, config: uvicorn.Config, grace_s: float):
        super().__init__(config)
        self.grace_s = grace_s
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self.config.app.state, "mlora", None)
        if self._draining or state is None:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        state.draining = True  # /ready → 503, new requests → 503
        threading.Thread(target=self._drain, args=(state,), daemon=True).start()

    def _drain(self, state) -> None:
        deadline = time.monotonic() + self.grace_s
        while not state.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def settings_from_args(argv: list[str] | None) -> ServerSettings:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return ServerSettings(**given)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
        if settings.adapter:
            from trainer.checkpoint import read_meta

            valid = [0, *read_meta(settings.adapter)["ranks"]]  # fail fast, before any model loads
            for flag, v in (("--default-rank", settings.default_rank), ("--merge-rank", settings.merge_rank)):
                if isinstance(v, int) and v not in valid:
                    raise ValueError(f"{flag} {v} is not a rank of this adapter; valid ranks are {valid}")
        elif settings.merge_rank is not None:
            raise ValueError(f"--merge-rank {settings.merge_rank} needs an --adapter to merge")
    except ValidationError as e:
        problems = [f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors()]
        print("server: error: invalid settings:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"server: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import build_app

    app = build_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(1, int(settings.grace_period_s)))
    server = DrainingServer(config, settings.grace_period_s)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
