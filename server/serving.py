"""Serving logic between the HTTP routes and the engine: tokenise, resolve the rank, submit,
and turn the engine's event stream into a result or an async stream. No FastAPI here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from jinja2 import TemplateError

from server.engine import AUTO, Engine, Event, GenerationRequest
from server.errors import DeadlineExceeded, EngineDead, InvalidRequest, RequestFailed, ServingError
from server.sampling import SamplingParams
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


class Serving:
    def __init__(self, engine: Engine, tokenizer, settings: ServerSettings, ranks: list[int]):
        self.engine, self.tok, self.settings = engine, tokenizer, settings
        self.ranks = ranks  # R (without 0)

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

    def encode_prompt(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise InvalidRequest("this model has no chat template; use /v1/completions or /generate",
                                 param="messages")
        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # templates raise on what they refuse (e.g. roles out of order)
            raise InvalidRequest(f"the model's chat template refused these messages: {e}", param="messages") from e
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def deadline(self, timeout: float | None) -> float:
        t = self.settings.request_timeout_s if timeout is None else min(timeout, self.settings.request_timeout_s)
        return time.monotonic() + t

    def submit(self, prompt_ids: list[int], rank: int | str, params: SamplingParams,
               timeout: float | None, elastic: bool = False, stream: bool = False) -> Submission:
        """Queue the request (raises InvalidRequest / Overloaded / Draining at once)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(ev: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, ev)

        req = GenerationRequest(prompt_ids, rank, params, sink, deadline=self.deadline(timeout), elastic=elastic,
                                stream=stream)
        rid = self.engine.submit(req)
        return Submission(rid, events, self.engine)

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
        parts = [ev.text]
        while not ev.done:
            ev = await self._next(sub, is_disconnected)
            parts.append(ev.text)
        _raise_if_failed(ev, self.engine)
        return Result("".join(parts), ev)

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
