"""The engine: one thread owns all model state; requests come in through a queue.

Each step reads like a sentence — ``schedule → execute → update``:

* **schedule**: drop aborted and expired requests; admit waiting ones while the batch has room
  (``max_batch_size`` rows) and the step's prompt budget (``max_prefill_tokens``) lasts; fix
  each admitted request's rank (``auto`` asks the rank policy) for its whole generation;
* **execute**: prefill the admitted prompts and join them to the batch, then one decode step for
  every row (continuous batching: rows join and leave between decode steps). A prompt longer
  than ``prefill_chunk_tokens`` is prefilled that many tokens per step instead (chunked
  prefill, one such prompt at a time), so the running rows keep decoding while it comes in:
  a step costs at most one piece more than a decode step, never the whole long prompt;
* **update**: sample, detokenise, check stop conditions, stream events to each request's sink,
  drop finished rows, and hand one :class:`StepStats` to the metrics.

HTTP handlers never touch the model: they :meth:`Engine.submit` a :class:`GenerationRequest`
with a ``sink`` callback and read the :class:`Event` stream it receives.

A fault that belongs to one request fails that request alone (``finish_reason`` ``error``, with
the error): its generator, its sampling, its detokenisation, its sink, and — through
:mod:`server.isolation` — a batched forward that raises (the rows are retried apart). Only a
fault that leaves the model unusable stops the engine (:attr:`Engine.dead`); :meth:`health`
reports it, and a watchdog thread reports a step that runs past ``step_timeout_s``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from typing import Callable

import torch

from server import isolation
from server.engine_types import AUTO, EngineConfig, Event, GenerationRequest, RankPolicy, Row, StepStats
from server.errors import Draining, EngineDead, InvalidRequest, Overloaded
from server.detok import IncrementalDetokenizer
from server.merging import AutoMerge
from server.runner import ModelRunner, PartialPrefill, Prefilled
from server.sampling import RowSampling, Sampled, make_generator, sample
from server.stops import find_stop, partial_stop

log = logging.getLogger(__name__)


class ModelThread:
    """One thread for all of the model's compute: start-up (loading, probes, calibration), then
    the engine loop. Once a second thread has run a parallel region, GNU OpenMP manages more
    threads than there are CPUs and *throttles* its workers' spin-wait (100 spins instead of
    300,000), so from then on every parallel op pays a futex sleep and wake-up, whichever thread
    calls it. Measured on 2 cores: a 16×576 @ 576×1536 bf16 GEMM 95 µs on the only
    OpenMP thread, 320-350 µs once another thread had run one (its two threads then use 1.05
    cores between them instead of 2); a SmolLM2 decode step of 16 rows 58 ms → 100-112 ms, and
    115-125 ms afterwards on the first thread too (earlier, AVX2 + MKL: a server that calibrated
    on its start-up thread decoded at 0.53× the speed). So the forwards never change threads, and
    the HTTP thread runs no torch op (routes and request models import no torch; samplers, masks
    and generators are made here)."""

    def __init__(self, name: str = "engine"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if fn is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to whoever waits on the future
                    future.set_exception(e)

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def close(self) -> None:
        """Let the thread end once its queued jobs are done."""
        self._jobs.put((None, None))


def piece_tokens(budget: float, decode_s: float | None, token_s: float | None, chunk: int, remaining: int,
                 first: int = 16, quantum: int = 8) -> int:
    """Tokens in the next piece so that it adds ``budget`` × a decode step's time:
    ``budget · decode_s / token_s``, in multiples of ``quantum``, at least ``quantum``, at most
    ``chunk`` and ``remaining``; ``first`` until both costs have been measured."""
    if not decode_s or not token_s:
        n = first
    else:
        n = max(quantum, int(budget * decode_s / token_s) // quantum * quantum)
    return max(1, min(n, chunk, remaining))


class StepCost:
    """Moving averages (weight ``ALPHA`` on the newest) of a decode step's seconds and of the
    seconds a prefill piece adds per token: mixed in, what the step took beyond a decode step;
    apart, the piece's own time. A decode step's cost is only measured on plain steps, so while
    pieces ride on every step it goes stale: :meth:`stale` asks for a plain step once the batch
    size has changed since the last one, or ``STALE_STEPS`` mixed steps have run."""

    ALPHA = 0.3
    STALE_STEPS = 32

    def __init__(self) -> None:
        self.decode_s: float | None = None
        self.token_s: float | None = None
        self._rows = 0  # the batch size decode_s was last measured at
        self._mixed = 0  # mixed steps since

    def decode(self, seconds: float, rows: int) -> None:
        if self.decode_s is None or rows != self._rows:  # another batch: another cost, not an average
            self.decode_s = seconds
        else:
            self.decode_s = (1 - self.ALPHA) * self.decode_s + self.ALPHA * seconds
        self._rows, self._mixed = rows, 0

    def piece(self, n: int, seconds: float, apart: bool = False) -> None:
        if not apart:
            self._mixed += 1
        if n <= 0 or (not apart and self.decode_s is None):
            return
        per = max(seconds - (0.0 if apart else self.decode_s), 0.0) / n
        self.token_s = per if self.token_s is None else (1 - self.ALPHA) * self.token_s + self.ALPHA * per

    def stale(self, rows: int) -> bool:
        """Whether a plain decode step of ``rows`` rows should run before the next mixed one
        (never twice in a row: a batch that changes every step still lets the prompt advance)."""
        if self.decode_s is None:
            return True
        return self._mixed > 0 and (rows != self._rows or self._mixed >= self.STALE_STEPS)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, config: EngineConfig, ranks: list[int],
                 auto_rank: RankPolicy, on_step: Callable[[StepStats], None] | None = None,
                 on_tick: Callable[[], None] | None = None, tick_s: float = 0.5,
                 auto_merge: AutoMerge | None = None, on_stall: Callable[[float], None] | None = None):
        self.runner = runner
        self.tok = tokenizer
        self.config = config
        self.ranks = [0, *ranks]
        self.auto_rank = auto_rank
        self.on_step = on_step or (lambda s: None)
        self.on_tick = on_tick or (lambda: None)  # the rank controller; also runs while idle
        self.on_stall = on_stall or (lambda age: None)  # a step ran past config.step_timeout_s
        self.tick_s = tick_s
        self.auto_merge = auto_merge  # keeps the traffic's dominant rank merged (None: never re-merge)
        self._partial: tuple[Row, PartialPrefill] | None = None  # the long prompt being prefilled in pieces
        self._cost = StepCost()  # measured: a decode step, and what a piece token adds to it
        self._arrivals = 0
        eos = runner.model.generation_config.eos_token_id if runner.model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {e for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._rows: list[Row] = []
        self._aborted: set[str] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.dead: BaseException | None = None
        self._ids = itertools.count()
        self._step_started: float | None = None  # monotonic start of the running step
        self._steps = 0  # steps started (the watchdog reports each stuck step once)
        self.stalls = 0

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
                raise EngineDead(f"the engine stopped: {self.dead}; this replica must be restarted")
            if self.draining:
                raise Draining("the server is shutting down; retry on another replica")
            if self.queue_full():
                raise self.overloaded()
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

    def queue_full(self) -> bool:
        return len(self._waiting) >= self.config.max_queue

    def overloaded(self) -> Overloaded:
        return Overloaded(f"{len(self._waiting)} requests are waiting (limit --max-queue "
                          f"{self.config.max_queue}); retry later", retry_after=1.0)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def idle(self) -> bool:
        return not self._waiting and not self._rows and self._partial is None

    def step_age(self) -> float:
        """Seconds the running step has taken so far (0 between steps)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    def health(self) -> str | None:
        """None while the engine can serve; else why not: stopped, thread gone, or a step stuck."""
        if self.dead is not None:
            return f"the engine stopped: {self.dead}"
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            return "the engine thread exited"
        age, limit = self.step_age(), self.config.step_timeout_s
        if age > limit:
            return f"an engine step has run for {age:.1f} s (limit --step-timeout-s {limit:g})"
        return None

    def start(self, thread: "ModelThread | None" = None) -> None:
        """Run the loop on ``thread`` (the one that loaded the model and ran its start-up
        forwards, see :class:`ModelThread`), else on a new thread."""
        if thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()
        else:
            self._thread = thread.thread
            thread.submit(self._loop)
            thread.close()  # the thread ends with the loop
        threading.Thread(target=self._watch, name="engine-watchdog", daemon=True).start()

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
                if not self._stop and not self._waiting and not self._rows and not self._aborted \
                        and self._partial is None:
                    self._cv.wait(self.tick_s)
                if self._stop:
                    break
                work = self._waiting or self._rows or self._aborted or self._arrivals or self._partial
            try:
                self.on_tick()
            except Exception:
                log.exception("the rank controller's tick failed; the engine goes on")
            if not work:
                continue
            self._steps += 1
            self._step_started = time.monotonic()
            try:
                self.step()
            except Exception as e:  # not one request's fault: the model is unusable; nobody may hang
                log.exception("engine step failed: the engine stops")
                self._fail_all(e)
                return
            finally:
                self._step_started = None
        self._fail_all(RuntimeError("engine stopped"), reason="abort")

    def _watch(self) -> None:
        """Report (once each) a step that runs past ``step_timeout_s``: log and ``on_stall``."""
        limit = self.config.step_timeout_s
        reported = 0
        while not self._stop and self.dead is None:
            time.sleep(min(1.0, limit / 4))
            age, step = self.step_age(), self._steps
            if age > limit and step != reported:
                reported = step
                self.stalls += 1
                log.error("engine step %d has run for %.1f s (limit --step-timeout-s %g)", step, age, limit)
                self.on_stall(age)

    def step(self) -> StepStats:
        stats = StepStats()
        admitted, long_prompt = self._schedule(stats)
        if long_prompt is not None:
            self._start_partial(long_prompt, stats)
        # a piece rides on the decode step when rows are running (one forward), else runs alone
        mixed = self._partial is not None and bool(self._rows) and self._mixable(self._partial[1])
        if mixed and self._measure_first():
            mixed, piece_now = False, False  # this step decodes plain, the piece waits for the next
        else:
            piece_now = self._partial is not None and not mixed
        joined = self._prefill_piece(stats) if piece_now else False
        if admitted:
            self._prefill(admitted, stats)
        if admitted or joined:
            self._retire(stats)  # rows that ended on their first token
        if self._rows and self.auto_merge is not None:
            target = self.auto_merge.observe([r.rank for r in self._rows], time.monotonic())
            if target is not None:  # between steps: every row's effective weights stay the same
                t0 = time.perf_counter()
                self.runner.remerge(target)
                stats.merged = (target, time.perf_counter() - t0)
                log.info("merged rank → %d (%.2f s)", target, stats.merged[1])
        piece = None
        if self._rows:
            tokens = [r.generated[-1] for r in self._rows]
            t0 = time.perf_counter()
            if mixed and self._partial is not None:
                out, piece, n = self._decode_with_piece(tokens, stats)
                stats.forward_s["mixed"] = dt = time.perf_counter() - t0
                self._cost.piece(n, dt)
            else:
                out = isolation.decode(self.runner, tokens)
                stats.forward_s["decode"] = dt = time.perf_counter() - t0
                self._cost.decode(dt, len(tokens))
            if out.errors:  # the runner already holds only the kept rows
                stats.retried_apart += 1
                for i, err in out.errors.items():
                    self._rows[i].fail(err)
                    self._finish_row(self._rows[i], stats)
                self._rows = [self._rows[i] for i in out.kept]
            if self._rows:
                self._update(self._rows, out.logits, stats)
                self._retire(stats)
        elif mixed and self._partial is not None:  # every row retired before the decode: the piece alone
            self._prefill_piece(stats)
        if piece is not None and self._piece_done(*piece, stats):
            self._retire(stats)
        stats.queue_depth, stats.running = len(self._waiting), len(self._rows)
        try:
            self.on_step(stats)
        except Exception:
            log.exception("recording the step's metrics failed; the engine goes on")
        return stats

    def _schedule(self, stats: StepStats) -> tuple[list[GenerationRequest], GenerationRequest | None]:
        """(requests to prefill whole this step, a long prompt to start prefilling in pieces)."""
        with self._cv:  # the clock read under the lock: every request seen was queued before it
            now = time.monotonic()
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
            if self._partial is not None:
                row = self._partial[0]
                why = "abort" if row.req.id in aborted else (
                    "timeout" if row.req.deadline is not None and now > row.req.deadline else None)
                if why:
                    self._partial = None
                    self._finish_unstarted(row.req, why, stats, rank=row.rank)
            chunk = self.config.prefill_chunk_tokens
            admitted, long_prompt, budget = [], None, self.config.max_prefill_tokens
            if self._partial is not None:
                budget -= min(chunk, self._partial[1].remaining)
            room = self.config.max_batch_size - sum(r.finish is None for r in self._rows) - (self._partial is not None)
            while self._waiting and len(admitted) + (long_prompt is not None) < room:
                n = len(self._waiting[0].prompt_ids)
                if chunk and n > chunk:  # prefilled in pieces, one such prompt at a time (in order)
                    if self._partial is not None or long_prompt is not None:
                        break
                    long_prompt = self._waiting.popleft()
                    budget -= chunk
                    continue
                if (admitted or long_prompt or self._partial) and n > budget:
                    break
                admitted.append(self._waiting.popleft())
                budget -= n
        if any(r.finish for r in self._rows):
            self._retire(stats)
        return admitted, long_prompt

    def _new_row(self, req: GenerationRequest, now: float, stats: StepStats) -> Row | None:
        """The request's row, its rank fixed now; None (and the request answered) if that fails."""
        stats.queue_waits.append(now - req.arrival)
        try:
            rank = self.auto_rank() if req.rank == AUTO else req.rank
            if req.elastic and req.rank != AUTO:
                rank = min(rank, self.auto_rank())  # a ceiling the controller may lower
            sampling = RowSampling(req.params, req.prompt_ids, make_generator(req.params.seed))
            return Row(req, rank, sampling, IncrementalDetokenizer(self.tok), admitted=now)
        except Exception as e:  # e.g. a seed torch cannot take: this request alone
            log.exception("request %s failed before prefill", req.id)
            self._finish_unstarted(req, "error", stats, error=isolation.describe(e))
            return None

    def _start_partial(self, req: GenerationRequest, stats: StepStats) -> None:
        row = self._new_row(req, time.monotonic(), stats)
        if row is not None:
            self._partial = (row, PartialPrefill(req.prompt_ids, row.rank, req.prompt_logprobs))

    def _mixable(self, part: PartialPrefill) -> bool:
        return self.runner.mixed and part.prompt_logprobs is None

    def _measure_first(self) -> bool:
        """With a piece budget, whether this step must decode plain so that the piece is sized
        from a fresh decode cost (:meth:`StepCost.stale`)."""
        return self.config.prefill_piece_budget > 0 and self._cost.stale(len(self._rows))

    def _piece_size(self, part: PartialPrefill) -> int:
        """While rows are decoding: ``prefill_chunk_tokens``, or with a ``prefill_piece_budget``
        the tokens that add that fraction of a decode step (:func:`piece_tokens`, from the costs
        measured so far). While none is: up to ``max_prefill_tokens`` (no decode step to protect,
        and one forward is cheaper than many)."""
        cfg = self.config
        if not self._rows:
            return min(max(cfg.prefill_chunk_tokens, cfg.max_prefill_tokens), part.remaining)
        if cfg.prefill_piece_budget > 0:
            return piece_tokens(cfg.prefill_piece_budget, self._cost.decode_s, self._cost.token_s,
                                cfg.prefill_chunk_tokens, part.remaining)
        return min(cfg.prefill_chunk_tokens, part.remaining)

    def _decode_with_piece(self, tokens: list[int], stats: StepStats):
        """The decode step with the long prompt's next piece in the same forward."""
        row, part = self._partial
        n = self._piece_size(part)
        stats.prefill_tokens += n
        try:
            return (*isolation.decode_with_piece(self.runner, tokens, part, n), n)
        except isolation.ModelBroken:
            self._partial = None
            with self._cv:  # answered by _fail_all once the engine is marked dead
                self._waiting.appendleft(row.req)
            raise

    def _prefill_piece(self, stats: StepStats) -> bool:
        """The next piece of the long prompt; True when it completed and its row joined."""
        row, part = self._partial
        n = self._piece_size(part)
        stats.prefill_tokens += n
        t0 = time.perf_counter()
        try:
            new, error = isolation.prefill_piece(self.runner, part, n)
            dt = time.perf_counter() - t0
            stats.forward_s["piece"] = stats.forward_s.get("piece", 0.0) + dt
            if self._rows:  # a piece apart adds its whole time to the step
                self._cost.piece(n, dt, apart=True)
        except isolation.ModelBroken:
            self._partial = None
            with self._cv:  # answered by _fail_all once the engine is marked dead
                self._waiting.appendleft(row.req)
            raise
        return self._piece_done(new, error, stats)

    def _piece_done(self, new, error: str | None, stats: StepStats) -> bool:
        """A piece's outcome: the request failed (error), still in pieces (None), or complete:
        its row joins the batch. True when it joined."""
        row, part = self._partial
        if error is not None:
            self._partial = None
            self._finish_unstarted(row.req, "error", stats, error=error, rank=row.rank)
            return False
        if new is None:
            return False
        self._partial = None
        self._admit([row], new.logits, [new], new.prompt_logprobs, stats)
        return True

    def _prefill(self, reqs: list[GenerationRequest], stats: StepStats) -> None:
        now = time.monotonic()
        rows = [row for row in (self._new_row(req, now, stats) for req in reqs) if row is not None]
        if not rows:
            return
        stats.prefill_tokens += sum(len(r.req.prompt_ids) for r in rows)
        t0 = time.perf_counter()
        try:
            out, parts = isolation.prefill(self.runner, [r.req.prompt_ids for r in rows], [r.rank for r in rows],
                                           [r.req.prompt_logprobs for r in rows])
            stats.forward_s["prefill"] = time.perf_counter() - t0
        except isolation.ModelBroken:
            with self._cv:  # back in the queue: _fail_all answers them once the engine is marked dead
                self._waiting.extendleft(r.req for r in reversed(rows))
            raise
        if out.errors:
            stats.retried_apart += 1
            for i, err in out.errors.items():
                self._finish_unstarted(rows[i].req, "error", stats, error=err, rank=rows[i].rank)
        self._admit([rows[i] for i in out.kept], out.logits, parts, out.prompt_logprobs, stats)

    def _admit(self, rows: list[Row], logits: torch.Tensor | None, parts: list[Prefilled],
               prompt_logprobs: list | None, stats: StepStats) -> None:
        """Sample prefilled rows' first tokens (``logits``: (rows, V)), then join to the batch the
        rows that go on. A row done on its first token (one token asked, EOS, a stop string, an
        echo-only score, a failure) is answered here and never joins: its cache is dropped, not
        copied into the batch's and out again (for one long prompt, a copy the size of the whole
        batch padded to its length). ``parts`` hold the rows in order."""
        for row, scored in zip(rows, prompt_logprobs or []):
            row.prompt_logprobs = scored
        for row in rows:
            if row.req.params.max_new_tokens == 0:  # scoring only (echo): nothing to generate
                row.finish = "length"
        sampled = [i for i, r in enumerate(rows) if r.req.params.max_new_tokens > 0]
        if sampled:
            self._update([rows[i] for i in sampled], logits[sampled], stats)
        start = 0
        for part in parts:
            group, start = rows[start:start + len(part.ranks)], start + len(part.ranks)
            going_on = [i for i, r in enumerate(group) if r.finish is None]
            if going_on:
                self.runner.join(part, going_on)
            self._rows.extend(group[i] for i in going_on)
            for row in group:
                if row.finish is not None:
                    self._finish_row(row, stats)

    def _update(self, rows: list[Row], logits: torch.Tensor, stats: StepStats) -> None:
        """Sample one token per row, stream its text, and mark rows that are done (a row whose
        sampling or text fails is marked failed; the others go on)."""
        try:
            picks = sample(logits, [r.sampling for r in rows])
        except Exception:
            log.exception("sampling %d rows failed; sampling them one at a time", len(rows))
            picks = [self._sample_one(row, logits[i:i + 1]) for i, row in enumerate(rows)]
        now = time.monotonic()
        stats.batch_size = max(stats.batch_size, len(rows))
        for row, pick in zip(rows, picks):
            if pick is None:
                continue
            if row.first_token_at is None:
                row.first_token_at = now
                stats.ttfts.append(now - row.req.arrival)
            else:
                stats.inter_token.append(now - row.last_token_at)
            row.last_token_at = now
            stats.generated[row.rank] += 1
            try:
                self._append_token(row, pick)
            except Exception as e:
                log.exception("request %s failed on its token %d", row.req.id, pick.token)
                row.fail(isolation.describe(e))

    @staticmethod
    def _sample_one(row: Row, logits: torch.Tensor) -> Sampled | None:
        try:
            return sample(logits, [row.sampling])[0]
        except Exception as e:
            row.fail(isolation.describe(e))
            return None

    def _append_token(self, row: Row, pick: Sampled) -> None:
        """Add one token; stream the text that is now final (held back: an unfinished UTF-8
        sequence, or a tail that may still turn into a stop string). The text grows
        incrementally (:mod:`server.detok`): a few tokens are decoded per step, not the output."""
        params, tok = row.req.params, pick.token
        if tok in self.eos_ids and not params.ignore_eos:
            row.finish = "stop"
        else:
            row.sampling.accept(tok)  # a token the grammar refuses raises: this request fails alone
            row.generated.append(tok)
            row.pending.append(tok)
            if pick.logprob is not None:
                row.pending_logprobs.append(pick.logprob)
            row.detok.add(tok)
        if row.finish is None and len(row.generated) >= params.max_new_tokens:
            row.finish = "length"
        if row.finish is None and row.sampling.done:  # the JSON is complete
            row.finish = "stop"
        if row.finish is not None:
            row.detok.flush()
        text = row.detok.text
        cut = find_stop(text, params.stop, len(row.emitted)) if params.stop else None
        if cut is not None:
            text, row.finish = text[:cut], "stop"
        if row.finish is None and params.stop:
            text = text[:len(text) - partial_stop(text, params.stop)]
        delta = text[len(row.emitted):]
        if delta:
            row.emitted = text
            if row.req.stream:
                self._send(row.req, self._event(row, text=delta))

    def _event(self, row: Row, **fields) -> Event:
        """An event for ``row`` carrying its tokens (and logprobs) not sent yet, and its prompt's
        logprobs if this is its first event."""
        ev = Event(token_ids=row.pending, logprobs=row.pending_logprobs if row.req.params.logprobs is not None
                   else None, prompt_logprobs=row.prompt_logprobs, rank=row.rank, **fields)
        row.pending, row.pending_logprobs, row.prompt_logprobs = [], [], None
        return ev

    def _retire(self, stats: StepStats) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            return
        for r in self._rows:
            if r.finish is not None:
                self._finish_row(r, stats)
        self.runner.leave(keep)
        self._rows = [self._rows[i] for i in keep]

    def _finish_row(self, row: Row, stats: StepStats) -> None:
        now = time.monotonic()
        arrival = row.req.arrival
        ev = self._event(row, text="" if row.req.stream else row.emitted, done=True, finish_reason=row.finish,
                   prompt_tokens=len(row.req.prompt_ids), completion_tokens=len(row.generated),
                   queue_s=row.admitted - arrival,
                   ttft_s=None if row.first_token_at is None else row.first_token_at - arrival,
                   total_s=now - arrival, error=row.error)
        stats.finished.append((row.rank, row.finish, now - arrival))
        self._send(row.req, ev)

    def _finish_unstarted(self, req: GenerationRequest, reason: str, stats: StepStats,
                          error: str | None = None, rank: int | None = None) -> None:
        now = time.monotonic()
        stats.finished.append((rank, reason, now - req.arrival))
        self._send(req, Event(done=True, finish_reason=reason, rank=rank, prompt_tokens=len(req.prompt_ids),
                              queue_s=now - req.arrival, total_s=now - req.arrival, error=error))

    def _send(self, req: GenerationRequest, ev: Event) -> None:
        """Hand an event to the request's sink; a sink that raises (its client's loop is gone)
        aborts that request only."""
        try:
            req.sink(ev)
        except Exception:
            log.exception("the sink of request %s failed; aborting it", req.id)
            with self._cv:
                self._aborted.add(req.id)

    def _fail_all(self, error: BaseException, reason: str = "error") -> None:
        with self._cv:
            if reason == "error":
                self.dead = error
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting:
            self._send(req, Event(done=True, finish_reason=reason, error=str(error)))
        for row in self._rows:
            self._send(row.req, Event(done=True, finish_reason=reason, rank=row.rank, error=str(error),
                                      completion_tokens=len(row.generated)))
        self._rows = []
        self.runner.reset()
