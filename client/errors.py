"""Typed exceptions for the server's HTTP errors (the inverse of the server's one error map)."""

from __future__ import annotations

import json

import httpx


class ClientError(Exception):
    """Base class: ``status``, ``message`` and ``param`` from the server's error body."""

    def __init__(self, message: str, status: int, param: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.message, self.status, self.param = message, status, param


class InvalidRequest(ClientError):
    """400 / 404 / 413 / 422: the request itself is wrong; retrying will not help."""


class Unauthorized(ClientError):
    """401: missing or wrong API key."""


class Overloaded(ClientError):
    """429: the server's queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, status: int, param: str | None = None, retry_after: float = 1.0):
        super().__init__(message, status, param)
        self.retry_after = retry_after


class ServerError(ClientError):
    """5xx: the server could not answer (503 draining, 504 deadline passed, …)."""


def parse_error_body(response: httpx.Response) -> tuple[str, str | None]:
    """(message, param) from the server's ``{"error": {...}}`` shape, or the raw text."""
    try:
        err = response.json()["error"]
        return err["message"], err.get("param")
    except (json.JSONDecodeError, KeyError, TypeError):
        return response.text[:500] or f"HTTP {response.status_code}", None


def from_response(response: httpx.Response) -> ClientError:
    message, param = parse_error_body(response)
    status = response.status_code
    if status == 401:
        return Unauthorized(message, status, param)
    if status == 429:
        try:
            retry_after = float(response.headers.get("retry-after", "1"))
        except ValueError:
            retry_after = 1.0
        return Overloaded(message, status, param, retry_after)
    if status >= 500:
        return ServerError(message, status, param)
    return InvalidRequest(message, status, param)
