"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, and
vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``. Each is one call into
:class:`server.openai_serving.OpenAIServing`, which owns the whole request."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.deps import accepting, app_state, authorised, respond
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorBody, TokenizeRequest

router = APIRouter(dependencies=[Depends(authorised)])
ERRORS = {400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 429: {"model": ErrorBody}}


def handler(request: Request):
    return app_state(request).openai


@router.get("/v1/models")
async def models(request: Request):
    return handler(request).list_models()


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, s=Depends(accepting)):
    return respond(await s.openai.create_completion(body, request.is_disconnected))


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, s=Depends(accepting)):
    return respond(await s.openai.create_chat_completion(body, request.is_disconnected))


@router.post("/tokenize", responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request):
    return handler(request).tokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    return handler(request).tokenizer_info()


@router.post("/detokenize", responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request):
    return handler(request).detokenize(body)
