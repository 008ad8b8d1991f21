"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

The rank comes from the body's extra field ``rank``, else from the model name: ``NAME@16`` is
rank 16, ``NAME@auto`` the controller's rank, ``NAME`` the server's default rank, ``NAME@0`` (or
the base model's own name) the base model.
"""

from __future__ import annotations

import json
import re

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.deps import accepting, app_state, authorised
from server.engine import AUTO
from server.errors import InvalidRequest, ServingError
from server.protocol import ChatCompletionRequest, CompletionRequest, ErrorBody, _OpenAIBase, now, openai_id
from server.serving import ClientGone, Serving, Submission

router = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])
ERRORS = {422: {"model": ErrorBody}, 404: {"model": ErrorBody}, 429: {"model": ErrorBody}}


class ModelNotFound(ServingError):
    status = 404
    type = "not_found_error"


def served_names(request: Request) -> dict[str, int | str]:
    """Every model name this server answers to → the rank it selects."""
    s = app_state(request)
    name = s.settings.served_name
    names: dict[str, int | str] = {name: s.settings.default_rank, f"{name}@{AUTO}": AUTO,
                                   f"{name}@0": 0, s.settings.model: 0}
    names.update({f"{name}@{k}": k for k in s.serving.ranks})
    return names


def rank_for(request: Request, body: _OpenAIBase) -> int | str:
    names = served_names(request)
    serving = app_state(request).serving
    prefix = app_state(request).settings.served_name + "@"
    if body.model not in names and re.fullmatch(re.escape(prefix) + "[0-9]+", body.model):
        return serving.resolve_rank(int(body.model[len(prefix):]), param="model")  # 422 naming the valid ranks
    if body.model not in names:
        raise ModelNotFound(f"model {body.model!r} is not served here; available: {sorted(names, key=str)}",
                            param="model")
    return serving.resolve_rank(body.rank if body.rank is not None else names[body.model])


@router.get("/models")
async def models(request: Request):
    created = now()
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "mlora",
                                        "rank": r} for n, r in served_names(request).items()]}


@router.post("/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, s=Depends(accepting)):
    serving: Serving = s.serving
    sub = serving.submit(serving.encode_prompt(body.prompt), rank_for(request, body),
                         body.sampling(serving.max_new_tokens(body.max_tokens, "max_tokens")), body.timeout,
                         elastic=body.rank_policy == "elastic", stream=body.stream)
    return await _respond(serving, sub, body, request, chat=False)


@router.post("/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, s=Depends(accepting)):
    serving: Serving = s.serving
    if body.messages[-1].role == "assistant":
        raise InvalidRequest("the last message must not be the assistant's: there is nothing to answer",
                             param="messages")
    ids = serving.encode_chat([m.model_dump(exclude_none=True) for m in body.messages])
    n, param = (body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens \
        else (body.max_tokens, "max_tokens")
    sub = serving.submit(ids, rank_for(request, body), body.sampling(serving.max_new_tokens(n, param)), body.timeout,
                         elastic=body.rank_policy == "elastic", stream=body.stream)
    return await _respond(serving, sub, body, request, chat=True)


async def _respond(serving: Serving, sub: Submission, body: _OpenAIBase, request: Request, chat: bool):
    rid = openai_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        first = await serving.start(sub, request.is_disconnected)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_chunks(serving, sub, body.model, rid, chat, include_usage),
                                 media_type="text/event-stream", headers={"X-Rank": str(first.rank)})
    try:
        res = await serving.collect(sub, request.is_disconnected)
    except ClientGone:
        return Response(status_code=499)
    f = res.final
    choice = ({"index": 0, "message": {"role": "assistant", "content": res.text}} if chat
              else {"index": 0, "text": res.text, "logprobs": None})
    choice["finish_reason"] = f.finish_reason
    out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
           "model": body.model, "choices": [choice], "rank": f.rank,
           "usage": {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                     "total_tokens": f.prompt_tokens + f.completion_tokens}}
    return JSONResponse(out, headers={"X-Rank": str(f.rank)})


async def _chunks(serving: Serving, sub: Submission, model: str, rid: str, chat: bool, include_usage: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = now()

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

    first = True
    async for ev in serving.stream(sub):
        if ev.text or first:
            yield chunk(ev.text, None, first)
            first = False
        if ev.done:
            yield chunk(None, ev.finish_reason)
            if include_usage:
                usage = {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                         "total_tokens": ev.prompt_tokens + ev.completion_tokens}
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                             "choices": [], "usage": usage}) + "\n\n"
    yield "data: [DONE]\n\n"
