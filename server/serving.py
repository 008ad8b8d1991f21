"""The serving layer between the HTTP routes and the engine, no FastAPI here.

:class:`Serving` is the one place that turns a validated request into engine requests — rank
(resolved and checked here only), token limit, tokenisation, token-id and logit-bias bounds,
the grammar of a ``response_format`` — submits them, and turns their event streams into results
or one merged stream. :meth:`Serving.create_generation` serves the native ``/generate`` whole;
:mod:`server.openai_serving` serves ``/v1`` on the same building blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from jinja2 import TemplateError

from server.engine import AUTO, Engine, Event, GenerationRequest
from server.errors import DeadlineExceeded, EngineDead, InvalidRequest, RequestFailed, ServingError
from server.protocol import GenerateRequest, GenerateResponse, StreamChunk, Timings, Usage
from server.sampling import SamplingParams, TokenLogprob
from server.settings import ServerSettings


class ClientGone(Exception):
    """The client disconnected; its request was aborted."""


@dataclass
class Submission:
    id: str
    events: asyncio.Queue
    engine: Engine
    first: Event | None = None  # the first event, once awaited (fixes the rank for headers)
    finished: bool = False

    @property
    def rank(self) -> int | None:
        return self.first.rank if self.first else None


@dataclass
class Result:
    text: str
    final: Event
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Reply:
    """A whole response: its JSON body and the rank that served it (the ``X-Rank`` header)."""

    body: dict
    rank: int | None


@dataclass
class Streamed:
    """A server-sent-event stream (each item one ``data: ...`` frame) and its rank."""

    frames: AsyncIterator[str]
    rank: int | None


class Serving:
    def __init__(self, engine: Engine, tokenizer, settings: ServerSettings, ranks: list[int]):
        self.engine, self.tok, self.settings = engine, tokenizer, settings
        self.ranks = ranks  # R (without 0)
        self.vocab_size = engine.runner.model.get_input_embeddings().num_embeddings
        self._structured = None  # built on first use (converting the vocabulary takes ~1 s)

    # -- request building ----------------------------------------------------------------------------
    def resolve_rank(self, rank: int | str | None, param: str = "rank") -> int | str:
        rank = self.settings.default_rank if rank is None else rank
        if rank != AUTO and rank not in (0, *self.ranks):
            raise InvalidRequest(f"rank {rank!r} is not served; valid ranks are {[0, *self.ranks]} or 'auto'",
                                 param=param)
        return rank

    def max_new_tokens(self, asked: int | None, param: str = "max_new_tokens") -> int:
        limit = self.settings.max_new_tokens_limit
        n = min(128, limit) if asked is None else asked
        if n > limit:
            raise InvalidRequest(f"{param} {n} exceeds this server's limit of {limit} "
                                 "(--max-new-tokens-limit)", param=param)
        return n

    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Text is tokenised; token ids are checked against the model's vocabulary."""
        if isinstance(prompt, str):
            return self.tok(prompt)["input_ids"]
        bad = next((t for t in prompt if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of range: this model's vocabulary has ids "
                                 f"0..{self.vocab_size - 1}", param=param)
        return list(prompt)

    def sampling(self, body, max_new_tokens: int, logprobs: int | None = None,
                 seed_offset: int = 0) -> SamplingParams:
        """The request's SamplingParams, its logit_bias checked against the vocabulary and its
        ``response_format`` compiled; sample j of n uses seed + j (wrapped to 64 bits)."""
        bias = body.logit_bias or {}
        bad = next((k for k in bias if int(k) >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"logit_bias names token {bad}; this model's vocabulary has ids "
                                 f"0..{self.vocab_size - 1}", param="logit_bias")
        params = body.to_sampling_params(max_new_tokens, logprobs, self.grammar(getattr(body, "response_format", None)))
        if params.seed is not None and seed_offset:
            params.seed = (params.seed + seed_offset + 2**63) % 2**64 - 2**63
        return params

    def grammar(self, response_format):
        if response_format is None or response_format.type == "text":
            return None
        if self._structured is None:
            from server.structured import StructuredOutput

            self._structured = StructuredOutput(self.tok)
        return self._structured.compile(response_format.model_dump(by_alias=True, exclude_none=True))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise InvalidRequest("this model has no chat template; use /v1/completions or /generate",
                                 param="messages")
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except TemplateError as e:  # templates raise on what they refuse (e.g. roles out of order)
            raise InvalidRequest(f"the model's chat template refused these messages: {e}", param="messages") from e
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def deadline(self, timeout: float | None) -> float:
        t = self.settings.request_timeout_s if timeout is None else min(timeout, self.settings.request_timeout_s)
        return time.monotonic() + t

    def submit(self, prompt_ids: list[int], rank: int | str, params: SamplingParams,
               timeout: float | None, elastic: bool = False, stream: bool = False,
               prompt_logprobs: int | None = None) -> Submission:
        """Queue the request (raises InvalidRequest / Overloaded / Draining at once)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(ev: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, ev)

        req = GenerationRequest(prompt_ids, rank, params, sink, deadline=self.deadline(timeout), elastic=elastic,
                                stream=stream, prompt_logprobs=prompt_logprobs)
        rid = self.engine.submit(req)
        return Submission(rid, events, self.engine)

    def submit_all(self, jobs: list[dict]) -> list[Submission]:
        """Submit several requests (``submit``'s keyword arguments each) as one: if one is refused
        (queue full, too long), the ones already queued are aborted and the error is raised."""
        subs: list[Submission] = []
        try:
            for job in jobs:
                subs.append(self.submit(**job))
        except BaseException:
            for sub in subs:
                self.abort(sub)
            raise
        return subs

    # -- consuming events ------------------------------------------------------------------------------
    async def _next(self, sub: Submission, is_disconnected: Callable[[], Awaitable[bool]] | None) -> Event:
        while True:
            try:
                ev = await asyncio.wait_for(sub.events.get(), timeout=0.25)
            except TimeoutError:
                if is_disconnected is not None and await is_disconnected():
                    self.abort(sub)
                    raise ClientGone(sub.id) from None
                continue
            if ev.done:
                sub.finished = True
            return ev

    async def start(self, sub: Submission, is_disconnected=None) -> Event:
        """Wait for the first event (the request is admitted; its rank is known)."""
        if sub.first is None:
            sub.first = await self._next(sub, is_disconnected)
            _raise_if_failed(sub.first, self.engine)
        return sub.first

    async def collect(self, sub: Submission, is_disconnected=None) -> Result:
        """The whole generation; DeadlineExceeded / EngineDead / ClientGone on failure."""
        ev = await self.start(sub, is_disconnected)
        res = Result("", ev, [], None, ev.prompt_logprobs)
        while True:
            res.text += ev.text
            res.token_ids += ev.token_ids
            if ev.logprobs is not None:
                res.logprobs = (res.logprobs or []) + ev.logprobs
            if ev.done:
                break
            ev = await self._next(sub, is_disconnected)
        _raise_if_failed(ev, self.engine)
        res.final = ev
        return res

    async def collect_all(self, subs: list[Submission], is_disconnected=None) -> list[Result]:
        """Every submission's result, in order; if one fails, the others are aborted."""
        try:
            return list(await asyncio.gather(*(self.collect(s, is_disconnected) for s in subs)))
        finally:
            for s in subs:
                self.abort(s)

    async def stream_all(self, subs: list[Submission]) -> AsyncIterator[tuple[int, Event]]:
        """The submissions' events merged as they come, tagged with the submission's index;
        every submission is aborted if the consumer goes away."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, sub: Submission) -> None:
            try:
                async for ev in self.stream(sub):
                    await merged.put((i, ev, None))
            except Exception as e:
                await merged.put((i, None, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(subs)]
        open_ = len(subs)
        try:
            while open_:
                i, ev, err = await merged.get()
                if err is not None:
                    raise err
                if ev.done:
                    open_ -= 1
                yield i, ev
        finally:
            for t in tasks:
                t.cancel()
            for s in subs:
                self.abort(s)

    async def stream(self, sub: Submission) -> AsyncIterator[Event]:
        """Events from the first on; aborts the request if the consumer goes away."""
        try:
            ev = await self.start(sub)
            yield ev
            while not ev.done:
                ev = await self._next(sub, None)
                yield ev
        finally:
            self.abort(sub)

    def abort(self, sub: Submission) -> None:
        if not sub.finished:
            self.engine.abort(sub.id)
            sub.finished = True


    # -- the native API: one request, one call ------------------------------------------------------
    async def create_generation(self, body: GenerateRequest, is_disconnected) -> Reply | Streamed:
        sub = self.submit(self.encode_prompt(body.prompt), self.resolve_rank(body.rank),
                          self.sampling(body, self.max_new_tokens(body.max_new_tokens)), body.timeout,
                          elastic=body.rank_policy == "elastic", stream=body.stream)
        if body.stream:
            first = await self.start(sub, is_disconnected)
            return Streamed(self._native_frames(sub), first.rank)
        res = await self.collect(sub, is_disconnected)
        f = res.final
        out = GenerateResponse(text=res.text, rank=f.rank, finish_reason=f.finish_reason, usage=_usage(f),
                               timings=Timings(queue_s=f.queue_s, ttft_s=f.ttft_s, total_s=f.total_s))
        return Reply(out.model_dump(), f.rank)

    async def _native_frames(self, sub: Submission) -> AsyncIterator[str]:
        async for ev in self.stream(sub):
            if ev.text:
                yield f"data: {StreamChunk(text=ev.text, rank=ev.rank).model_dump_json(exclude_none=True)}\n\n"
            if ev.done:
                chunk = StreamChunk(done=True, rank=ev.rank, finish_reason=ev.finish_reason, usage=_usage(ev),
                                    timings=Timings(queue_s=ev.queue_s, ttft_s=ev.ttft_s, total_s=ev.total_s))
                yield f"data: {chunk.model_dump_json()}\n\n"


def _usage(ev: Event) -> Usage:
    return Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                 total_tokens=ev.prompt_tokens + ev.completion_tokens)


def _raise_if_failed(ev: Event, engine: Engine) -> None:
    if not ev.done:
        return
    if ev.finish_reason == "timeout":
        raise DeadlineExceeded(f"the request's deadline passed after {ev.total_s:.2f} s "
                               f"({ev.completion_tokens} tokens generated)", param="timeout")
    if ev.finish_reason == "error" and engine.dead is not None:
        raise EngineDead(f"the engine stopped: {ev.error}; this replica must be restarted")
    if ev.finish_reason == "error":
        raise RequestFailed(f"this request failed in the engine and was dropped alone ({ev.error}); "
                            "the server goes on serving")
    if ev.finish_reason == "abort":
        raise ServingError("the request was aborted")
