"""The FastAPI app: ``build_app(settings)``; the model loads in the lifespan, never at import.

Routes hold no model logic: they validate, hand off to :class:`server.serving.Serving`, and
format. Every error leaves through one map (:func:`error_response`) as
``{"error": {"message", "type", "param"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.calibration import cache_key, calibrate
from server.control import ClusterSignals, RankController
from server.controller import ControllerConfig
from server.engine import Engine, ModelThread
from server.engine_types import EngineConfig, StepStats
from server.merging import AutoMerge
from server.deps import accepting, app_state, authorised, key_ok, respond
from server.errors import EngineDead, InvalidRequest, PayloadTooLarge, ServingError
from server.metrics import Metrics
from server.openai_serving import OpenAIServing
from server.protocol import ErrorBody, ErrorDetail, GenerateRequest, GenerateResponse, RankInfo
from server.runner import ModelRunner
from server.serving import ClientGone, Serving
from server.settings import ServerSettings

log = logging.getLogger("server")


@dataclass
class AppState:
    settings: ServerSettings
    serving: Serving
    engine: Engine
    metrics: Metrics
    meta: dict  # the checkpoint's matryoshka.json ({} without an adapter)
    controller: RankController
    throughput: dict[int, float]  # measured decode tokens/s per rank ({} if not calibrated)
    openai: OpenAIServing
    ready: bool = False
    draining: bool = False

    def compute_info(self) -> dict:
        """How this server computes (what its throughput table was measured under)."""
        import torch

        from trainer.kernels import gemm_mode

        runner = self.engine.runner
        return {"device": str(runner.device), "dtype": str(runner.model.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "gemm": gemm_mode(runner.model),
                "fused": bool(runner.adapter is not None and runner.adapter.groups),
                "decode": "lean" if runner.lean is not None else "transformers",
                "compiled_rank0_decode": runner.compiled is not None, "mixed_prefill": runner.mixed}

    def inference_info(self) -> dict:
        """The rule and the coefficients c_k each rank is served with (none without an adapter)."""
        adapter = self.engine.runner.adapter
        if adapter is None:
            return {}
        return {"rule": adapter.config.inference_rule, "coeffs": {str(k): c for k, c in adapter.config.coeffs.items()}}

    def merge_info(self) -> dict:
        adapter = self.engine.runner.adapter
        mode = "off" if self.settings.merge_rank is None else "auto" if self.settings.merge_rank == "auto" else "fixed"
        return {"mode": mode, "rank": None if adapter is None else adapter.merged_rank}


def load_state(settings: ServerSettings) -> AppState:
    """The composition root, in named steps (blocking; seconds): model → GEMM mode (probed on the
    base model) → adapter (in the model's dtype) → kernels (GEMM mode, fusion) → merge policy → metrics → runner → calibration →
    controller → engine → serving."""
    model, tok, device = _setup_model(settings)
    gemm = _resolve_gemm(settings, model, device)
    adapter, meta = _setup_adapter(settings, model)
    _setup_kernels(settings, model, adapter, gemm)
    ranks = adapter.config.ranks if adapter else []
    auto_merge = _setup_merge(settings, adapter, ranks)
    metrics = _setup_metrics(settings, adapter, meta, ranks)
    runner = _setup_runner(settings, model, adapter, tok)
    throughput = _setup_calibration(settings, runner, tok, meta, device, ranks, auto_merge, gemm)
    controller = _setup_controller(settings, metrics, throughput, ranks, auto_merge)
    context = min(tok.model_max_length, getattr(model.config, "max_position_embeddings", tok.model_max_length))
    engine = _setup_engine(settings, runner, tok, context, ranks, controller, metrics, auto_merge)
    serving = Serving(engine, tok, settings, ranks)
    openai = OpenAIServing(serving, settings.served_name, settings.model, settings.default_rank, context)
    return AppState(settings, serving, engine, metrics, meta, controller, throughput, openai)


def _setup_model(settings: ServerSettings):
    from trainer.models import load_model, resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    model, tok = load_model(settings.model, device, resolve_dtype(settings.dtype, device))
    return model, tok, device


def _setup_adapter(settings: ServerSettings, model):
    """The checkpoint (validated against the base), served in the base model's dtype."""
    import torch

    from trainer.checkpoint import load_adapter

    if not settings.adapter:
        return None, {}
    adapter, meta = load_adapter(settings.adapter, model, settings.inference_rule)
    if model.dtype != torch.float32:  # no autocast when serving: the adapter runs in the base dtype
        for layer in adapter.layers.values():
            layer.to(model.dtype)
        adapter.set_coeffs(adapter.state.coeffs)  # the coefficients set at load, in the layers' dtype too
    return adapter, meta


def _setup_runner(settings: ServerSettings, model, adapter, tok) -> ModelRunner:
    """The model runner; batched prompts prefilled unpadded, and chunked prefill's pieces riding on
    decode steps, where a probe shows this model computes the same that way
    (``ModelRunner.enable_mixed``)."""
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    exact = runner.enable_mixed()
    log.info("batched prompts %s; prefill pieces %s", "unpadded" if exact else "padded",
             "off" if not settings.prefill_chunk_tokens else "mixed into decode steps" if exact else "run separately")
    if settings.decode != "transformers":
        lean = runner.enable_lean_decode()
        if settings.decode == "lean" and not lean:
            raise ValueError(f"--decode lean: {settings.model} is not a model the lean decode step computes exactly "
                             "(Llama, Qwen2 or Mistral layers, full attention; see the log); use --decode auto or "
                             "transformers")
        log.info("decode steps %s (--decode %s)", "lean" if lean else "through transformers", settings.decode)
    if settings.compile != "off":
        probe = tok("The quick brown fox jumps over the lazy dog, and then it runs far away.")["input_ids"]
        compiled = len(probe) >= 7 and runner.enable_compiled_decode(probe)
        if not compiled and settings.compile == "decode":
            raise ValueError(f"--compile decode: rank-0 decode steps of {settings.model} cannot run compiled here "
                             "(it needs a CPU, the lean decode step and a compiled graph that matches it; see the "
                             "log); use --compile auto or off")
        log.info("rank-0 decode steps %s (--compile %s)", "compiled" if compiled else "lean", settings.compile)
    return runner


def _resolve_gemm(settings: ServerSettings, model, device) -> str:
    """What ``--gemm`` means here; ``auto`` times the base model's own forward in every mode (once
    per CPU and model, cached: :func:`trainer.kernels.gemm_speedups`), before any adapter is on it."""
    from trainer.kernels import resolve_gemm

    return resolve_gemm(settings.gemm, device, model.dtype, model=model)


def _setup_kernels(settings: ServerSettings, model, adapter, mode: str) -> None:
    """Linears computed the ``mode`` way (:mod:`trainer.kernels`), siblings fused where ``--fuse``
    says (auto: with packed GEMMs); after the adapter's dtype cast (fused weights are views that a
    later ``.to()`` would break)."""
    from trainer.kernels import use_gemm

    if adapter is not None and fused(settings, mode):
        adapter.fuse()
    n = use_gemm(model, mode)
    log.info("GEMMs %s in %d linears (--gemm %s), siblings %s", mode, n, settings.gemm,
             "fused" if adapter is not None and adapter.groups else "apart")


def fused(settings: ServerSettings, gemm: str) -> bool:
    """What ``--fuse`` means with this GEMM mode."""
    return settings.fuse == "true" or (settings.fuse == "auto" and gemm == "packed")


def _setup_merge(settings: ServerSettings, adapter, ranks: list[int]) -> AutoMerge | None:
    """``--merge-rank N`` folds rank N in once; ``auto`` starts with the rank ``auto`` requests
    get first (the top) and returns the policy that re-merges as the traffic shifts."""
    if settings.merge_rank is None:
        return None
    if adapter is None:
        raise ValueError(f"--merge-rank {settings.merge_rank} needs an --adapter to merge")
    if settings.merge_rank != "auto":
        adapter.merge(settings.merge_rank)
        return None
    top = settings.max_rank if settings.max_rank is not None else ranks[-1]
    adapter.remerge(top)
    return AutoMerge(merged=top, dwell_s=settings.merge_dwell_s)


def _setup_metrics(settings: ServerSettings, adapter, meta: dict, ranks: list[int]) -> Metrics:
    metrics = Metrics()
    metrics.set_info(settings.model, settings.adapter or "", ranks, meta.get("scaling", ""), meta.get("method", ""))
    if adapter is not None and adapter.merged_rank is not None:
        metrics.merged_rank.set(adapter.merged_rank)
    return metrics


def _setup_calibration(settings: ServerSettings, runner: ModelRunner, tok, meta: dict, device, ranks: list[int],
                       auto_merge: AutoMerge | None, gemm: str) -> dict[int, float]:
    from trainer.models import cache_dir

    if runner.adapter is None or settings.calibrate_steps <= 0:
        return {}
    prompt = tok("Question: how many apples are left?\nAnswer: ")["input_ids"]
    throughput = calibrate(runner, prompt, [0, *ranks], settings.max_batch_size, settings.calibrate_steps,
                           cache_dir(), cache_key(settings, meta, device, runner.model.dtype, gemm),
                           same_cost=auto_merge is not None)
    log.info("measured decode tokens/s per rank at batch %d: %s", settings.max_batch_size, throughput)
    return throughput


def _setup_controller(settings: ServerSettings, metrics: Metrics, throughput: dict[int, float], ranks: list[int],
                      auto_merge: AutoMerge | None) -> RankController:
    cfg = ControllerConfig.build(ranks, settings.min_rank, settings.max_rank, policy=settings.controller,
                                 dwell_s=settings.dwell_s, down_queue=settings.down_queue,
                                 up_queue=settings.up_queue, smooth_s=settings.smooth_s,
                                 slo_p95_s=settings.slo_p95_ms / 1000, min_gain=settings.min_gain,
                                 equal_costs=auto_merge is not None, batch_size=settings.max_batch_size)
    cluster = ClusterSignals(settings.prometheus_url) if settings.prometheus_url else None
    return RankController(cfg, metrics, throughput, cluster)


def _setup_engine(settings: ServerSettings, runner: ModelRunner, tok, context: int, ranks: list[int],
                  controller: RankController, metrics: Metrics, auto_merge: AutoMerge | None) -> Engine:
    config = EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                          max_prefill_tokens=settings.max_prefill_tokens, context_length=context,
                          step_timeout_s=settings.step_timeout_s, prefill_chunk_tokens=settings.prefill_chunk_tokens,
                          prefill_piece_budget=settings.prefill_piece_budget)

    def on_step(stats: StepStats) -> None:  # one stats object per step, to the metrics and the controller
        metrics.record(stats)
        controller.record(stats)

    engine = Engine(runner, tok, config, ranks, auto_rank=lambda: controller.rank, on_step=on_step,
                    on_tick=controller.tick, auto_merge=auto_merge, on_stall=metrics.record_stall)
    metrics.watch(engine)
    return engine


def error_response(exc: ServingError) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=exc.message, type=exc.type, param=exc.param))
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if hasattr(exc, "retry_after") else None
    return JSONResponse(body.model_dump(), status_code=exc.status, headers=headers)


def _error(status: int, type_: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=ErrorDetail(message=message, type=type_, param=param)).model_dump(),
                        status_code=status)


def _field_path(loc) -> str:
    """``("body", "rank", "literal['auto']")`` → ``rank``: field names and list indices only
    (pydantic adds the union member it tried; the client never wrote that)."""
    return ".".join(str(p) for p in loc[1:] if isinstance(p, int) or str(p).isidentifier() and p not in _TAGS)


_TAGS = {"int", "str", "float", "bool", "list", "dict", "none"}


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 before any handler reads them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = PayloadTooLarge(f"the request body exceeds {self.limit} bytes (--max-body-bytes)")
        if length is not None and not length.isdigit():
            bad = InvalidRequest(f"Content-Length must be a number of bytes, got {length[:40]!r}")
            return await _error(400, bad.type, bad.message)(scope, receive, send)
        if length is not None and int(length) > self.limit:
            return await error_response(too_big)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise too_big
            return msg

        try:
            await self.app(scope, limited, send)
        except PayloadTooLarge as e:
            await error_response(e)(scope, receive, send)


GENERATION_PATHS = {"/generate", "/v1/completions", "/v1/chat/completions"}


class ShedLoad:
    """ASGI middleware: while the queue is full, generation requests get 429 before their body is
    read, parsed or tokenised. Under overload most requests are refused; refusing them cheaply
    keeps the CPU (and the GIL) for the engine (benchmarks/overload.txt)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        state = getattr(scope.get("app").state, "mlora", None) if scope["type"] == "http" else None
        if (state is not None and scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
                and state.engine.queue_full() and key_ok(state.settings.api_key, Headers(scope=scope))):
            return await error_response(state.engine.overloaded())(scope, receive, send)
        return await self.app(scope, receive, send)


def try_line(settings: ServerSettings, st: AppState) -> str:
    """A ready-to-paste curl for the start-up log: the checkpoint's own example (one that rank 0
    gets wrong and the full rank right, stored by ``trainer train --eval-data``) at full rank, or
    an arithmetic question."""
    example = (st.meta.get("eval") or {}).get("example")
    top = st.serving.ranks[-1] if st.serving.ranks else 0
    body = ({"prompt": example["prompt"], "rank": top, "max_new_tokens": example["max_new_tokens"]} if example else
            {"prompt": "Question: Ada has 12 apples and gets 7 more. How many apples does she have?\nAnswer: ",
             "rank": top, "max_new_tokens": 48})
    line = (f"curl -s http://{settings.host}:{settings.port}/generate -H 'content-type: application/json' "
            f"-d '{json.dumps(body).replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}'")  # ' → '\''

    if example:
        line += "   (each rank answers: " + ", ".join(f"{k}: {v!r}" for k, v in example["answers"].items()) + ")"
    return line


def build_app(settings: ServerSettings, state: AppState | None = None) -> FastAPI:
    """The app. ``state`` lets tests inject a prepared engine; otherwise the lifespan loads one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model_thread = ModelThread()  # loading, probes and calibration run where the engine loop will
        st = state or await asyncio.wrap_future(model_thread.submit(lambda: load_state(settings)))
        app.state.mlora = st
        st.engine.start(model_thread)
        if st.controller.cluster is not None:
            st.controller.cluster.start()
        st.ready = True
        log.info("ready: model %s, adapter %s, ranks %s", settings.model, settings.adapter, [0, *st.serving.ranks])
        log.info("try:  %s", try_line(settings, st))
        yield
        st.ready = False
        st.engine.stop()
        if st.controller.cluster is not None:
            st.controller.cluster.stop()

    app = FastAPI(title="matryoshka-lora server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(ShedLoad)  # added last: runs first

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = _field_path(first.get("loc", ())) or None
        msg = "; ".join(f"{_field_path(e.get('loc', ())) or 'body'}: {e.get('msg')}"
                        + (f" (got {e['input']!r:.60})" if "input" in e and e.get("type") != "missing" else "")
                        for e in errs)
        return _error(400, "invalid_request_error", msg, param)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "invalid_request_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error")
        return _error(500, "server_error", f"internal error: {type(exc).__name__}")

    @app.get("/health", responses={503: {"model": ErrorBody}})
    async def health(request: Request):
        """Liveness: 200 while loading and serving; 503 once the engine stopped, its thread is
        gone, or a step runs past --step-timeout-s (an orchestrator then restarts the process)."""
        s = getattr(request.app.state, "mlora", None)
        problem = None if s is None else s.engine.health()
        if problem is not None:
            return _error(503, EngineDead.type, problem)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        """Readiness: true only while loaded, not draining, and the engine is healthy."""
        s = getattr(request.app.state, "mlora", None)
        problem = None if s is None else s.engine.health()
        ok = s is not None and s.ready and not s.draining and problem is None
        body = {"ready": ok} if ok else {"ready": False, "reason": problem or ("draining" if s else "loading")}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(generate_latest(app_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/ranks", response_model=RankInfo, dependencies=[Depends(authorised)])
    async def ranks(request: Request):
        s = app_state(request)
        return RankInfo(ranks=[0, *s.serving.ranks], r=s.meta.get("r", 0), scaling=s.meta.get("scaling", "none"),
                        method=s.meta.get("method", "none"), default_rank=settings.default_rank,
                        inference=s.inference_info(),
                        eval=s.meta.get("eval") or {}, throughput={str(k): v for k, v in s.throughput.items()},
                        controller=s.controller.describe(), merge=s.merge_info(), compute=s.compute_info())

    @app.post("/generate", response_model=GenerateResponse, dependencies=[Depends(authorised)],
              responses={400: {"model": ErrorBody}, 429: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def generate(body: GenerateRequest, request: Request, s: AppState = Depends(accepting)):
        return respond(await s.serving.create_generation(body, request.is_disconnected))

    from server.openai_routes import router as openai_router

    app.include_router(openai_router)
    return app
