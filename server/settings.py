"""Server settings: command-line flags, else ``MLORA_*`` environment variables, else defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.kernels import GEMM_HELP, Gemm
from trainer.models import DTYPE_HELP


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLORA_", extra="forbid")

    model: str = Field("smollm2-135m", description="base model: local HF folder, hub id, or smollm2-135m")
    adapter: str | None = Field(None, description="nested-LoRA checkpoint folder (none: base model only)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description=DTYPE_HELP + " | float16")
    inference_rule: Literal["auto", "trained", "paper", "partial"] | None = Field(
        None, description="serve every rank under this rule instead of the checkpoint's own (trained: "
        "c_k = p[:k]; paper: s(k)·1ₖ; partial: Σ_{j≤k} s(j)·1ⱼ; auto: the method's default)")
    served_name: str = Field("mlora", description="model name in the OpenAI API; NAME@k selects rank k")
    max_batch_size: int = Field(16, ge=1, description="rows decoded together")
    max_queue: int = Field(256, ge=1, description="waiting requests before 429")
    max_prefill_tokens: int = Field(4096, ge=1, description="prompt tokens admitted per engine step")
    prefill_chunk_tokens: int = Field(256, ge=0, description="a longer prompt is prefilled in pieces of at most "
                                      "this many tokens, one per engine step, each riding on the running rows' decode "
                                      "step (chunked prefill; 0: every prompt whole)")
    prefill_piece_budget: float = Field(0.8, ge=0, description="while rows are decoding, a piece is sized to add at "
                                        "most this fraction of a decode step's time (measured as the engine runs), "
                                        "so a long prompt slows the running streams' tokens by at most 1+this; "
                                        "0: every piece is --prefill-chunk-tokens")
    max_new_tokens_limit: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask")
    request_timeout_s: float = Field(300.0, gt=0, description="deadline of every request (a request may ask less)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger bodies get 413")
    api_key: str | None = Field(None, description="when set, requests need 'Authorization: Bearer KEY'")
    default_rank: int | Literal["auto"] = Field("auto", description="rank of requests that name none")
    merge_rank: int | Literal["auto"] | None = Field(
        None, description="fold this rank into the weights (it then costs nothing extra; other ranks pay "
        "for their difference); auto: keep the rank most rows use merged, re-merging as traffic shifts")
    fuse: Literal["auto", "true", "false"] = Field(
        "auto", description="compute the adapted modules that read one input (q/k/v; gate/up) as one GEMM with their "
        "adapters' A, and their B as one addmm (exact; 4 GEMMs + 4 addmms per layer instead of 21 ops); auto: with "
        "packed GEMMs (measured 1.4x faster decode at ranks 1-64 in bf16 on AVX-512), not with standard ones "
        "(0.90x on AVX2 in fp32)")
    gemm: Gemm = Field("auto", description=GEMM_HELP)
    decode: Literal["auto", "lean", "transformers"] = Field(
        "auto", description="how a decode step is computed: lean (server.decoder: the model's own modules in a loop of "
        "~25 ops a layer instead of transformers' ~50, the mask and rotary angles built once a step; Llama, Qwen2, "
        "Mistral) | transformers (the model's forward); auto: lean where a start-up probe shows it computes what "
        "transformers' forward computes; lean: the same, an error where it does not")
    compile: Literal["off", "decode", "auto"] = Field(
        "off", description="decode: decode steps whose rows are all at rank 0 run as one TorchInductor graph, weights "
        "frozen (server.compiled; CPU, with the lean step; ~1.3x faster a step for SmolLM2 on 2 cores), compiled and "
        "checked against the lean step at start-up (one graph, 30-120 s for SmolLM2 on 2 cores; an error where it "
        "cannot be used); other steps as before. auto: the same where it can be used (a CPU with the lean step), else off (logged)")
    merge_dwell_s: float = Field(2.0, ge=0, description="auto merge: how long a rank must lead the traffic "
                                 "before it is merged (and min seconds between re-merges)")
    controller: Literal["threshold", "slo", "off"] = Field(
        "threshold", description="how 'auto' (and elastic) requests get their rank under load")
    min_rank: int | None = Field(None, ge=0, description="lowest rank the controller may choose (0: base model)")
    max_rank: int | None = Field(None, ge=0, description="highest rank the controller may choose")
    dwell_s: float = Field(3.0, ge=0, description="seconds a rank is held before the controller moves "
                         "down (less when the queue is deep: down-queue / queue, to a quarter) or up (3×; 1× while "
                         "at most half the batch is busy)")
    down_queue: float = Field(2.0, gt=0, description="threshold: smoothed queue depth that lowers the rank")
    up_queue: float = Field(0.5, ge=0, description="threshold: smoothed queue depth that allows raising it")
    smooth_s: float = Field(3.0, ge=0, description="time constant of the controller's queue-depth average")
    slo_p95_ms: float = Field(10_000.0, gt=0, description="slo: p95 end-to-end latency target")
    min_gain: float | None = Field(0.03, ge=0, description="the controller moves only between ranks that are "
                                   "measured more than this fraction faster than the next higher one it uses "
                                   "(0.03 = 3%); a rank that costs what the one above costs is skipped; 0: every rank is a rung")
    prometheus_url: str | None = Field(None, description="read cluster-wide queue depth with PromQL from here")
    calibrate_steps: int = Field(4, ge=0, description="decode steps per rank measured at startup (0: skip); cached")
    grace_period_s: float = Field(30.0, ge=0, description="on SIGTERM: time for in-flight requests to finish")
    step_timeout_s: float = Field(120.0, gt=0, description="an engine step running longer is reported stuck: "
                                  "logged, counted (mlora_engine_stalls_total), /health 503 until it ends")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("default_rank", "merge_rank", mode="before")
    @classmethod
    def _rank(cls, v, info):
        if isinstance(v, str) and v != "auto":
            try:
                return int(v)
            except ValueError:
                flag = "--" + info.field_name.replace("_", "-")
                raise ValueError(f"{flag} takes 'auto' or an integer rank, got {v!r}") from None
        return v
