"""Typed clients for the server: :class:`Client` (sync) and :class:`AsyncClient`, on httpx.

Request and response models are the server's own (``server.protocol``). HTTP errors come back
as typed exceptions (:mod:`client.errors`); with ``retries > 0``, 429 and 503 are retried with
exponential backoff that honours ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from client.errors import from_response
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                             GenerateRequest, GenerateResponse, RankInfo, StreamChunk)

DEFAULT_URL = "http://127.0.0.1:8000"
RETRYABLE = (429, 503)


def _payload(prompt: str, rank: int | str | None, stream: bool, params: dict[str, Any]) -> dict:
    """Validated request body (bad options fail here, before any network)."""
    body = GenerateRequest(prompt=prompt, rank=rank, stream=stream, **params)
    return body.model_dump(exclude_none=True, exclude_defaults=False)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _chat_body(messages: list[dict], rank: int | str | None, model: str, params: dict) -> dict:
    """Validated ``/v1/chat/completions`` body (the server's own model: bad options fail here)."""
    body = ChatCompletionRequest.model_validate({"model": model, "messages": messages, "rank": rank, **params})
    return body.model_dump(exclude_unset=True, by_alias=True)


def _completion_body(prompt, rank: int | str | None, model: str, params: dict) -> dict:
    """Validated ``/v1/completions`` body: ``prompt`` a string, strings, token ids or lists of them."""
    body = CompletionRequest.model_validate({"model": model, "prompt": prompt, "rank": rank, **params})
    return body.model_dump(exclude_unset=True, by_alias=True)


def _delay(attempt: int, backoff: float, response: httpx.Response) -> float:
    retry_after = response.headers.get("retry-after")
    try:
        return max(float(retry_after), 0.0) if retry_after else backoff * 2 ** attempt
    except ValueError:
        return backoff * 2 ** attempt


def _sse_data(line: str) -> str | None:
    return line[6:] if line.startswith("data: ") else None


class Client:
    """``Client(url, api_key=None, timeout=300, retries=0, backoff=0.5)``."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 300.0,
                 retries: int = 0, backoff: float = 0.5, model: str = "mlora"):
        self.retries, self.backoff, self.model = retries, backoff, model
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            r = self._http.request(method, path, **kw)
            if r.status_code not in RETRYABLE or attempt == self.retries:
                break
            time.sleep(_delay(attempt, self.backoff, r))
        if r.status_code >= 400:
            raise from_response(r)
        return r

    def generate(self, prompt: str, rank: int | str | None = None, **params) -> GenerateResponse:
        """``params``: max_new_tokens, temperature, top_p, top_k, stop, seed, timeout, ignore_eos."""
        r = self._request("POST", "/generate", json=_payload(prompt, rank, False, params))
        return GenerateResponse.model_validate(r.json())

    def stream(self, prompt: str, rank: int | str | None = None, **params) -> Iterator[StreamChunk]:
        """Token deltas as :class:`StreamChunk`; the last has ``done=True`` with rank and usage."""
        with self._http.stream("POST", "/generate", json=_payload(prompt, rank, True, params)) as r:
            if r.status_code >= 400:
                r.read()
                raise from_response(r)
            for line in r.iter_lines():
                if (data := _sse_data(line)) is not None:
                    yield StreamChunk.model_validate_json(data)

    def chat(self, messages: list[dict], rank: int | str | None = None, **params) -> str:
        """The assistant's reply through the OpenAI-compatible chat endpoint."""
        return self.chat_completion(messages, rank, **params).choices[0].message.content

    def chat_completion(self, messages: list[dict], rank: int | str | None = None, **params) -> ChatCompletionResponse:
        """``/v1/chat/completions`` whole; ``params`` are its fields (n, logprobs, top_logprobs,
        response_format, presence_penalty, logit_bias, ...), checked before sending."""
        r = self._request("POST", "/v1/chat/completions", json=_chat_body(messages, rank, self.model, params))
        return ChatCompletionResponse.model_validate(r.json())

    def completion(self, prompt, rank: int | str | None = None, **params) -> CompletionResponse:
        """``/v1/completions``; ``params`` are its fields (max_tokens, n, logprobs, echo, ...)."""
        r = self._request("POST", "/v1/completions", json=_completion_body(prompt, rank, self.model, params))
        return CompletionResponse.model_validate(r.json())

    def ranks(self) -> RankInfo:
        return RankInfo.model_validate(self._request("GET", "/ranks").json())

    def health(self) -> bool:
        return self._http.get("/health").status_code == 200

    def ready(self) -> bool:
        return self._http.get("/ready").status_code == 200

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text


class AsyncClient:
    """The same API as :class:`Client`, awaitable; ``stream`` is an async iterator."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 300.0,
                 retries: int = 0, backoff: float = 0.5, model: str = "mlora"):
        self.retries, self.backoff, self.model = retries, backoff, model
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            r = await self._http.request(method, path, **kw)
            if r.status_code not in RETRYABLE or attempt == self.retries:
                break
            await asyncio.sleep(_delay(attempt, self.backoff, r))
        if r.status_code >= 400:
            raise from_response(r)
        return r

    async def generate(self, prompt: str, rank: int | str | None = None, **params) -> GenerateResponse:
        r = await self._request("POST", "/generate", json=_payload(prompt, rank, False, params))
        return GenerateResponse.model_validate(r.json())

    async def stream(self, prompt: str, rank: int | str | None = None, **params) -> AsyncIterator[StreamChunk]:
        async with self._http.stream("POST", "/generate", json=_payload(prompt, rank, True, params)) as r:
            if r.status_code >= 400:
                await r.aread()
                raise from_response(r)
            async for line in r.aiter_lines():
                if (data := _sse_data(line)) is not None:
                    yield StreamChunk.model_validate_json(data)

    async def chat(self, messages: list[dict], rank: int | str | None = None, **params) -> str:
        return (await self.chat_completion(messages, rank, **params)).choices[0].message.content

    async def chat_completion(self, messages: list[dict], rank: int | str | None = None,
                              **params) -> ChatCompletionResponse:
        r = await self._request("POST", "/v1/chat/completions",
                                json=_chat_body(messages, rank, self.model, params))
        return ChatCompletionResponse.model_validate(r.json())

    async def completion(self, prompt, rank: int | str | None = None, **params) -> CompletionResponse:
        r = await self._request("POST", "/v1/completions", json=_completion_body(prompt, rank, self.model, params))
        return CompletionResponse.model_validate(r.json())

    async def ranks(self) -> RankInfo:
        return RankInfo.model_validate((await self._request("GET", "/ranks")).json())

    async def health(self) -> bool:
        return (await self._http.get("/health")).status_code == 200

    async def ready(self) -> bool:
        return (await self._http.get("/ready")).status_code == 200

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

