"""FastAPI dependencies shared by the native and OpenAI routes."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import Draining, EngineDead, Unauthorized


def app_state(request: Request):
    """The :class:`server.app.AppState` the lifespan built."""
    return request.app.state.mlora


def key_ok(key: str | None, headers) -> bool:
    """True without ``--api-key``; else whether ``headers`` carry it (``Authorization: Bearer
    KEY`` or ``X-API-Key: KEY``)."""
    if not key:
        return True
    given = headers.get("authorization", "").removeprefix("Bearer ").strip() or headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


async def authorised(request: Request) -> None:
    """With ``--api-key``: require ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``)."""
    if not key_ok(request.app.state.settings.api_key, request.headers):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


async def accepting(request: Request):
    """The app state, if new requests are accepted (not starting, not draining): else 503."""
    s = getattr(request.app.state, "mlora", None)
    if s is not None and s.engine.dead is not None:
        raise EngineDead(f"the engine stopped: {s.engine.dead}; this replica must be restarted")
    if s is None or s.draining or not s.ready:
        raise Draining("the server is not accepting requests (starting or shutting down); retry elsewhere")
    return s


def respond(out):
    """A serving layer's answer as HTTP: a :class:`~server.serving.Reply` is JSON, a
    :class:`~server.serving.Streamed` server-sent events; both carry the rank in ``X-Rank``."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from server.serving import Streamed

    headers = {"X-Rank": str(out.rank)}
    if isinstance(out, Streamed):
        return StreamingResponse(out.frames, media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    return JSONResponse(out.body, headers=headers)
