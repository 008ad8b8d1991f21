"""What the engine works on: requests in, events out, running rows, per-step stats, limits.

No HTTP types here (the protocol module converts to these); no model either.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from server.detok import IncrementalDetokenizer
from server.sampling import RowSampling, SamplingParams, TokenLogprob

AUTO = "auto"


@dataclass
class Event:
    """What a request's sink receives: token deltas (streaming requests), then one final event
    (``done=True``; for a request that does not stream, it carries the whole text). ``token_ids``
    (and ``logprobs``, when asked for) are the generated tokens not carried by an earlier event;
    ``prompt_logprobs`` comes with the request's first event."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    done: bool = False
    finish_reason: str | None = None  # stop | length | timeout | abort | error
    rank: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    error: str | None = None


@dataclass
class GenerationRequest:
    """An engine-side request: no HTTP types here."""

    prompt_ids: list[int]
    rank: int | str  # a rank in {0} ∪ R, or "auto"
    params: SamplingParams
    sink: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    elastic: bool = False  # rank is a ceiling the controller may lower under load
    stream: bool = True  # token deltas as they come; else one final event with the whole text
    prompt_logprobs: int | None = None  # score the prompt too: each token's logprob and the top n (echo)
    id: str = ""
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class Row:
    req: GenerationRequest
    rank: int
    sampling: RowSampling  # penalties' counts, grammar state, generator
    detok: IncrementalDetokenizer
    admitted: float
    generated: list[int] = field(default_factory=list)
    emitted: str = ""  # text already sent to the sink (cut at a stop string)
    pending: list[int] = field(default_factory=list)  # generated ids not yet carried by an event
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent with the first event, then None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish: str | None = None
    error: str | None = None  # why the row failed (finish "error")

    def fail(self, error: str) -> None:
        self.finish, self.error = "error", error


@dataclass
class StepStats:
    """Everything one engine step observed; the metrics module records it in one place."""

    queue_depth: int = 0
    running: int = 0
    arrivals: int = 0  # requests submitted since the previous step
    batch_size: int = 0
    prefill_tokens: int = 0
    queue_waits: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    inter_token: list[float] = field(default_factory=list)
    generated: dict[int, int] = field(default_factory=lambda: collections.Counter())  # rank → tokens
    finished: list[tuple[int | None, str, float]] = field(default_factory=list)  # (rank, status, e2e)
    merged: tuple[int, float] | None = None  # (rank, seconds) when this step re-merged the weights
    retried_apart: int = 0  # batched forwards that raised and were retried one row at a time
    # seconds of model forwards this step, by phase: "decode", "mixed" (decode + a prompt piece),
    # "prefill" (whole prompts), "piece" (a prompt piece alone)
    forward_s: dict[str, float] = field(default_factory=dict)


class RankPolicy(Protocol):
    def __call__(self) -> int: ...


@dataclass
class EngineConfig:
    max_batch_size: int = 16  # rows decoded together
    max_queue: int = 256  # waiting requests beyond which submit() raises Overloaded
    max_prefill_tokens: int = 4096  # prompt tokens admitted per step (the first always fits)
    prefill_chunk_tokens: int = 256  # longer prompts are prefilled this many tokens per step (0: whole)
    # while rows decode, a piece adds at most this fraction of a decode step's time (sized from the
    # measured cost of a decode step and of a piece token; 0: every piece is prefill_chunk_tokens)
    prefill_piece_budget: float = 0.0
    context_length: int = 8192  # prompt + max_new_tokens must fit
    step_timeout_s: float = 120.0  # a step running longer is reported stuck (health, metrics)
