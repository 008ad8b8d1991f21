"""The engine: one thread owns all model state; requests come in through a queue.

Each step reads like a sentence — ``schedule → execute → update``:

* **schedule**: drop aborted and expired requests; admit waiting ones while the batch has room
  (``max_batch_size`` rows) and the step's prompt budget (``max_prefill_tokens``) lasts; fix
  each admitted request's rank (``auto`` asks the rank policy) for its whole generation;
* **execute**: prefill the admitted prompts and join them to the batch, then one decode step for
  every row (continuous batching: rows join and leave between decode steps);
* **update**: sample, detokenise, check stop conditions, stream events to each request's sink,
  drop finished rows, and hand one :class:`StepStats` to the metrics.

HTTP handlers never touch the model: they :meth:`Engine.submit` a :class:`GenerationRequest`
with a ``sink`` callback and read the :class:`Event` stream it receives.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from server.errors import Draining, InvalidRequest, Overloaded
from server.merging import AutoMerge
from server.runner import ModelRunner
from server.sampling import SamplingParams, make_generator, sample

log = logging.getLogger(__name__)
AUTO = "auto"


@dataclass
class Event:
    """What a request's sink receives: token deltas (streaming requests), then one final event
    (``done=True``; for a request that does not stream, it carries the whole text)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
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
    id: str = ""
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class _Row:
    req: GenerationRequest
    rank: int
    generator: torch.Generator
    admitted: float
    generated: list[int] = field(default_factory=list)
    emitted: str = ""  # text already sent to the sink
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish: str | None = None


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


class RankPolicy(Protocol):
    def __call__(self) -> int: ...


@dataclass
class EngineConfig:
    max_batch_size: int = 16  # rows decoded together
    max_queue: int = 256  # waiting requests beyond which submit() raises Overloaded
    max_prefill_tokens: int = 4096  # prompt tokens admitted per step (the first always fits)
    context_length: int = 8192  # prompt + max_new_tokens must fit


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, config: EngineConfig, ranks: list[int],
                 auto_rank: RankPolicy, on_step: Callable[[StepStats], None] | None = None,
                 on_tick: Callable[[], None] | None = None, tick_s: float = 0.5,
                 auto_merge: AutoMerge | None = None):
        self.runner = runner
        self.tok = tokenizer
        self.config = config
        self.ranks = [0, *ranks]
        self.auto_rank = auto_rank
        self.on_step = on_step or (lambda s: None)
        self.on_tick = on_tick or (lambda: None)  # the rank controller; also runs while idle
        self.tick_s = tick_s
        self.auto_merge = auto_merge  # keeps the traffic's dominant rank merged (None: never re-merge)
        self._arrivals = 0
        eos = runner.model.generation_config.eos_token_id if runner.model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._rows: list[_Row] = []
        self._aborted: set[str] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.dead: BaseException | None = None
        self._ids = itertools.count()

    # -- called from other threads -----------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> None:
        if req.rank != AUTO and req.rank not in self.ranks:
            raise InvalidRequest(f"rank {req.rank!r} is not served; valid ranks are {self.ranks} or 'auto'",
                                 param="rank")
        n, m, ctx = len(req.prompt_ids), req.params.max_new_tokens, self.config.context_length
        if n == 0:
            raise InvalidRequest("the prompt is empty after tokenisation", param="prompt")
        if n + m > ctx:
            raise InvalidRequest(f"prompt ({n} tokens) + max_new_tokens ({m}) = {n + m} exceeds the "
                                 f"model's context of {ctx} tokens", param="max_new_tokens")

    def submit(self, req: GenerationRequest) -> str:
        """Queue a request (validated first); raises InvalidRequest, Overloaded or Draining."""
        self.validate(req)
        with self._cv:
            if self.dead is not None:
                raise Draining(f"the engine stopped: {self.dead}")
            if self.draining:
                raise Draining("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.config.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are waiting (limit --max-queue "
                                 f"{self.config.max_queue}); retry later", retry_after=1.0)
            req.id = req.id or f"req-{next(self._ids)}"
            self._waiting.append(req)
            self._arrivals += 1
            self._cv.notify()
        return req.id

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (client gone); its slot frees at the next step."""
        with self._cv:
            self._aborted.add(request_id)
            self._cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def idle(self) -> bool:
        return not self._waiting and not self._rows

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop (engine thread only) ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._stop and not self._waiting and not self._rows and not self._aborted:
                    self._cv.wait(self.tick_s)
                if self._stop:
                    break
                work = self._waiting or self._rows or self._aborted or self._arrivals
            try:
                self.on_tick()
                if work:
                    self.step()
            except Exception as e:  # a broken engine must not hang its clients
                log.exception("engine step failed")
                self._fail_all(e)
        self._fail_all(RuntimeError("engine stopped"), reason="abort")

    def step(self) -> StepStats:
        stats = StepStats()
        admitted = self._schedule(stats)
        if admitted:
            self._prefill(admitted, stats)
            self._retire(stats)  # rows that ended on their first token
        if self._rows and self.auto_merge is not None:
            target = self.auto_merge.observe([r.rank for r in self._rows], time.monotonic())
            if target is not None:  # between steps: every row's effective weights stay the same
                t0 = time.perf_counter()
                self.runner.remerge(target)
                stats.merged = (target, time.perf_counter() - t0)
                log.info("merged rank → %d (%.2f s)", target, stats.merged[1])
        if self._rows:
            logits = self.runner.decode([r.generated[-1] for r in self._rows])
            self._update(self._rows, logits, stats)
            self._retire(stats)
        stats.queue_depth, stats.running = len(self._waiting), len(self._rows)
        self.on_step(stats)
        return stats

    def _schedule(self, stats: StepStats) -> list[GenerationRequest]:
        now = time.monotonic()
        with self._cv:
            aborted, self._aborted = self._aborted, set()
            stats.arrivals, self._arrivals = self._arrivals, 0
            kept = collections.deque()
            for req in self._waiting:
                if req.id in aborted:
                    self._finish_unstarted(req, "abort", stats)
                elif req.deadline is not None and now > req.deadline:
                    self._finish_unstarted(req, "timeout", stats)
                else:
                    kept.append(req)
            self._waiting = kept
            for row in self._rows:
                if row.req.id in aborted:
                    row.finish = "abort"
                elif row.req.deadline is not None and now > row.req.deadline:
                    row.finish = "timeout"
            admitted, budget = [], self.config.max_prefill_tokens
            room = self.config.max_batch_size - sum(r.finish is None for r in self._rows)
            while self._waiting and len(admitted) < room:
                n = len(self._waiting[0].prompt_ids)
                if admitted and n > budget:
                    break
                admitted.append(self._waiting.popleft())
                budget -= n
        if any(r.finish for r in self._rows):
            self._retire(stats)
        return admitted

    def _prefill(self, reqs: list[GenerationRequest], stats: StepStats) -> None:
        now = time.monotonic()
        rows = []
        for req in reqs:
            rank = self.auto_rank() if req.rank == AUTO else req.rank
            if req.elastic and req.rank != AUTO:
                rank = min(rank, self.auto_rank())  # a ceiling the controller may lower
            rows.append(_Row(req, rank, make_generator(req.params.seed), admitted=now))
            stats.queue_waits.append(now - req.arrival)
        stats.prefill_tokens = sum(len(r.prompt_ids) for r in reqs)
        new = self.runner.prefill([r.prompt_ids for r in reqs], [r.rank for r in rows])
        self.runner.join(new)
        self._rows.extend(rows)
        self._update(rows, new.logits, stats)

    def _update(self, rows: list[_Row], logits: torch.Tensor, stats: StepStats) -> None:
        """Sample one token per row, stream its text, and mark rows that are done."""
        tokens = sample(logits, [r.req.params for r in rows], [r.generator for r in rows])
        now = time.monotonic()
        stats.batch_size = max(stats.batch_size, len(rows))
        for row, tok in zip(rows, tokens):
            if row.first_token_at is None:
                row.first_token_at = now
                stats.ttfts.append(now - row.req.arrival)
            else:
                stats.inter_token.append(now - row.last_token_at)
            row.last_token_at = now
            stats.generated[row.rank] += 1
            self._append_token(row, tok)

    def _append_token(self, row: _Row, tok: int) -> None:
        """Add one token; stream the text that is now final (held back: an unfinished UTF-8
        sequence, or a tail that may still turn into a stop string). A request that neither
        streams nor has stop strings is decoded once, when it finishes."""
        params = row.req.params
        if tok in self.eos_ids and not params.ignore_eos:
            row.finish = "stop"
        else:
            row.generated.append(tok)
        if row.finish is None and len(row.generated) >= params.max_new_tokens:
            row.finish = "length"
        if not row.req.stream and not params.stop:
            return
        text = self.tok.decode(row.generated, skip_special_tokens=True)
        cut = _find_stop(text, params.stop, len(row.emitted))
        if cut is not None:
            text, row.finish = text[:cut], "stop"
        if row.finish is None:
            if text.endswith("\ufffd"):
                return
            text = text[:len(text) - _partial_stop(text, params.stop)]
        delta = text[len(row.emitted):]
        if delta:
            row.emitted = text
            if row.req.stream:
                row.req.sink(Event(text=delta, token_ids=[tok], rank=row.rank))

    def _retire(self, stats: StepStats) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            return
        for r in self._rows:
            if r.finish is not None:
                self._finish_row(r, stats)
        self.runner.leave(keep)
        self._rows = [self._rows[i] for i in keep]

    def _finish_row(self, row: _Row, stats: StepStats) -> None:
        now = time.monotonic()
        arrival = row.req.arrival
        text = "" if row.req.stream else (row.emitted if row.req.params.stop
                                          else self.tok.decode(row.generated, skip_special_tokens=True))
        ev = Event(text=text, done=True, finish_reason=row.finish, rank=row.rank,
                   prompt_tokens=len(row.req.prompt_ids), completion_tokens=len(row.generated),
                   queue_s=row.admitted - arrival,
                   ttft_s=None if row.first_token_at is None else row.first_token_at - arrival,
                   total_s=now - arrival)
        stats.finished.append((row.rank, row.finish, now - arrival))
        row.req.sink(ev)

    def _finish_unstarted(self, req: GenerationRequest, reason: str, stats: StepStats) -> None:
        now = time.monotonic()
        stats.finished.append((None, reason, now - req.arrival))
        req.sink(Event(done=True, finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                       queue_s=now - req.arrival, total_s=now - req.arrival))

    def _fail_all(self, error: BaseException, reason: str = "error") -> None:
        with self._cv:
            if reason == "error":
                self.dead = error
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting:
            req.sink(Event(done=True, finish_reason=reason, error=str(error)))
        for row in self._rows:
            row.req.sink(Event(done=True, finish_reason=reason, rank=row.rank, error=str(error),
                               completion_tokens=len(row.generated)))
        self._rows = []
        self.runner.reset()


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index of the earliest stop string in ``text`` that reaches past what was already sent."""
    best = None
    for s in stops:
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
