"""The OpenAI-compatible API as one serving object: each route is one call into it, as
``await handler.create_completion(request, is_disconnected)``. No FastAPI here.

The rank comes from the body's extra field ``rank``, else from the model name: ``NAME@16`` is
rank 16, ``NAME@auto`` the controller's rank, ``NAME`` the server's default rank, ``NAME@0`` (or
the base model's own name) the base model.

A completion request holds P prompts (text or token ids) and asks for n samples of each; each
of the P·n is its own engine request, answered as ``choices[p·n + j]`` (OpenAI's order). With
``echo`` and ``logprobs`` the prompt's own tokens are scored in the same prefill (first entry
null), which is what lm-evaluation-harness's loglikelihood tasks read.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from functools import lru_cache

from server.engine import AUTO, Event
from server.errors import InvalidRequest, ServingError
from server.protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                             CompletionChoice, CompletionRequest, CompletionResponse, DetokenizeRequest,
                             TokenizeRequest, Usage, _OpenAIBase, now, openai_id)
from server.sampling import TokenLogprob
from server.serving import Reply, Result, Serving, Streamed, Submission


class ModelNotFound(ServingError):
    status = 404
    type = "not_found_error"


class OpenAIServing:
    def __init__(self, serving: Serving, served_name: str, base_name: str, default_rank: int | str,
                 max_model_len: int):
        self.serving, self.tok = serving, serving.tok
        self.name, self.base_name, self.default_rank = served_name, base_name, default_rank
        self.max_model_len = max_model_len
        self.token_str = lru_cache(maxsize=65536)(self._token_str)

    # -- model names ---------------------------------------------------------------------------------
    def served_names(self) -> dict[str, int | str]:
        """Every model name this server answers to → the rank it selects."""
        names: dict[str, int | str] = {self.name: self.default_rank, f"{self.name}@{AUTO}": AUTO,
                                       f"{self.name}@0": 0, self.base_name: 0}
        names.update({f"{self.name}@{k}": k for k in self.serving.ranks})
        return names

    def rank_for(self, body: _OpenAIBase) -> int | str:
        names = self.served_names()
        prefix = self.name + "@"
        if body.model not in names and re.fullmatch(re.escape(prefix) + "[0-9]+", body.model):
            return self.serving.resolve_rank(int(body.model[len(prefix):]), param="model")  # names the valid ranks
        if body.model not in names:
            raise ModelNotFound(f"model {body.model!r} is not served here; available: {sorted(names, key=str)}",
                                param="model")
        return self.serving.resolve_rank(body.rank if body.rank is not None else names[body.model])

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_names():
            raise ModelNotFound(f"model {model!r} is not served here; available: "
                                f"{sorted(self.served_names(), key=str)}", param="model")

    def list_models(self) -> dict:
        """``/v1/models``: each rank's entry names the base model as its parent."""
        created = now()
        data = []
        for n, r in self.served_names().items():
            base = n == self.base_name
            data.append({"id": n, "object": "model", "created": created, "owned_by": "mlora", "rank": r,
                         "root": self.base_name, "parent": None if base else self.base_name,
                         "max_model_len": self.max_model_len})
        return {"object": "list", "data": data}

    # -- completions ----------------------------------------------------------------------------------
    async def create_completion(self, body: CompletionRequest, is_disconnected) -> Reply | Streamed:
        serving = self.serving
        rank = self.rank_for(body)
        prompts = body.prompts()
        ids = [serving.encode_prompt(p, "prompt") for p in prompts]
        limit = serving.max_new_tokens(body.max_tokens, "max_tokens")
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        subs = serving.submit_all([
            dict(prompt_ids=p, rank=rank, params=serving.sampling(body, limit, body.logprobs, j), timeout=body.timeout,
                 elastic=body.rank_policy == "elastic", stream=body.stream, prompt_logprobs=scored)
            for p in ids for j in range(body.n)])
        echoes = [(p if isinstance(p, str) else self.tok.decode(p)) if body.echo else "" for p in prompts]
        if body.stream:
            first = await serving.start(subs[0], is_disconnected)
            return Streamed(self._completion_frames(body, subs, ids, echoes), first.rank)
        results = await serving.collect_all(subs, is_disconnected)
        choices = [CompletionChoice(index=i, text=echoes[i // body.n] + res.text, finish_reason=res.final.finish_reason,
                                    rank=res.final.rank,
                                    logprobs=None if body.logprobs is None else self.completion_logprobs(
                                        res, ids[i // body.n] if body.echo else None))
                   for i, res in enumerate(results)]
        out = CompletionResponse(id=openai_id("cmpl"), created=now(), model=body.model, choices=choices,
                                 usage=_usage(results, ids), rank=results[0].final.rank)
        return Reply(out.model_dump(), out.rank)

    def completion_logprobs(self, res: Result, prompt_ids: list[int] | None, offset: int = 0) -> dict:
        """OpenAI's completion shape: tokens, token_logprobs, top_logprobs ({token: logprob},
        the chosen token always included), text_offset; with the prompt first when echoed."""
        entries = list(res.logprobs or [])
        token_ids = [e.token for e in entries]
        if prompt_ids is not None:
            entries = list(res.prompt_logprobs or [None] * len(prompt_ids)) + entries
            token_ids = list(prompt_ids) + token_ids
        tokens = [self.token_str(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": [None if e is None else self._top_dict(e) for e in entries],
                "text_offset": offsets}

    def _top_dict(self, e: TokenLogprob) -> dict[str, float]:
        top: dict[str, float] = {}
        for t, lp in [*e.top, (e.token, e.logprob)]:  # most likely first: a string two ids share keeps the higher
            top.setdefault(self.token_str(t), lp)
        return top

    async def _completion_frames(self, body: CompletionRequest, subs: list[Submission], ids: list[list[int]],
                                 echoes: list[str]) -> AsyncIterator[str]:
        chunks = _Chunks("cmpl", "text_completion", body, sum(len(p) for p in ids), len(subs))
        frame = chunks.frame
        offsets = [0] * len(subs)
        started = [False] * len(subs)
        try:
            async for i, ev in self.serving.stream_all(subs):
                p = i // body.n
                text, prompt_ids = ev.text, None
                if not started[i]:
                    started[i] = True
                    text = echoes[p] + text
                    prompt_ids = ids[p] if body.echo else None
                lp = None
                if body.logprobs is not None and (ev.token_ids or prompt_ids):
                    res = Result(text, ev, ev.token_ids, ev.logprobs, ev.prompt_logprobs)
                    lp = self.completion_logprobs(res, prompt_ids, offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
                chunks.count(i, ev)
                if text or lp is not None or ev.done:
                    yield frame([{"index": i, "text": text, "logprobs": lp,
                                  "finish_reason": ev.finish_reason if ev.done else None}])
        except ServingError as e:
            yield _error_frame(e)
            return
        for last in chunks.close():
            yield last

    # -- chat -------------------------------------------------------------------------------------------
    async def create_chat_completion(self, body: ChatCompletionRequest, is_disconnected) -> Reply | Streamed:
        serving = self.serving
        if body.messages[-1].role == "assistant":
            raise InvalidRequest("the last message must not be the assistant's: there is nothing to answer",
                                 param="messages")
        rank = self.rank_for(body)
        ids = serving.encode_chat([m.model_dump(exclude_none=True) for m in body.messages])
        n, param = (body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens \
            else (body.max_tokens, "max_tokens")
        limit = serving.max_new_tokens(n, param)
        subs = serving.submit_all([
            dict(prompt_ids=ids, rank=rank, params=serving.sampling(body, limit, body.logprob_count(), j),
                 timeout=body.timeout, elastic=body.rank_policy == "elastic", stream=body.stream)
            for j in range(body.n)])
        if body.stream:
            first = await serving.start(subs[0], is_disconnected)
            return Streamed(self._chat_frames(body, subs, ids), first.rank)
        results = await serving.collect_all(subs, is_disconnected)
        choices = [ChatChoice(index=j, message=AssistantMessage(content=res.text), finish_reason=res.final.finish_reason,
                              logprobs=self.chat_logprobs(res) if body.logprobs else None, rank=res.final.rank)
                   for j, res in enumerate(results)]
        out = ChatCompletionResponse(id=openai_id("chatcmpl"), created=now(), model=body.model, choices=choices,
                                     usage=_usage(results, [ids]), rank=results[0].final.rank)
        return Reply(out.model_dump(), out.rank)

    def chat_logprobs(self, res: Result) -> dict:
        def entry(t: int, lp: float) -> dict:
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in res.logprobs or []], "refusal": None}

    async def _chat_frames(self, body: ChatCompletionRequest, subs: list[Submission],
                           ids: list[int]) -> AsyncIterator[str]:
        chunks = _Chunks("chatcmpl", "chat.completion.chunk", body, len(ids), len(subs))
        frame = chunks.frame
        started = [False] * len(subs)
        try:
            async for j, ev in self.serving.stream_all(subs):
                delta = {"content": ev.text} if ev.text else {}
                if not started[j]:
                    started[j] = True
                    delta = {"role": "assistant", "content": ev.text}
                lp = self.chat_logprobs(Result("", ev, ev.token_ids, ev.logprobs)) \
                    if body.logprobs and ev.logprobs else None
                chunks.count(j, ev)
                if delta or lp is not None:
                    yield frame([{"index": j, "delta": delta, "logprobs": lp, "finish_reason": None}])
                if ev.done:
                    yield frame([{"index": j, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}])
        except ServingError as e:
            yield _error_frame(e)
            return
        for last in chunks.close():
            yield last

    # -- tokenizer routes (vLLM's shapes) --------------------------------------------------------------
    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        if body.messages is not None:
            ids = self.serving.encode_chat([m.model_dump(exclude_none=True) for m in body.messages],
                                           add_generation_prompt=body.add_generation_prompt)
        else:
            ids = self.tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        out = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = self.tok.convert_ids_to_tokens(ids)
        return out

    def tokenizer_info(self) -> dict:
        """vLLM's ``/tokenizer_info``: what a remote client needs to tokenise as we do
        (lm-evaluation-harness's ``tokenizer_backend=remote`` reads it)."""
        t = self.tok
        return {"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "bos_token": t.bos_token,
                "pad_token": t.pad_token, "unk_token": t.unk_token, "model_max_length": self.max_model_len,
                "chat_template": getattr(t, "chat_template", None)}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        ids = self.serving.encode_prompt(body.tokens, "tokens")
        return {"prompt": self.tok.decode(ids)}

    def _token_str(self, t: int) -> str:
        return self.tok.decode([t])


class _Chunks:
    """The frames of one streamed response: one id, the object type, and usage — a last chunk
    with the request's usage under ``stream_options.include_usage``, and the usage so far in every
    chunk as well with ``continuous_usage_stats`` (as vLLM: only together with include_usage)."""

    def __init__(self, prefix: str, obj: str, body: _OpenAIBase, prompt_tokens: int, choices: int):
        self.rid, self.created, self.obj, self.model = openai_id(prefix), now(), obj, body.model
        options = body.stream_options
        self.include = options is not None and options.include_usage
        self.continuous = self.include and options.continuous_usage_stats
        self.prompt_tokens, self.generated = prompt_tokens, [0] * choices

    def count(self, i: int, ev: Event) -> None:
        self.generated[i] = ev.completion_tokens if ev.done else self.generated[i] + len(ev.token_ids)

    def usage(self) -> dict:
        done = sum(self.generated)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done,
                     total_tokens=self.prompt_tokens + done).model_dump()

    def frame(self, choices: list[dict], usage: bool = False) -> str:
        out = {"id": self.rid, "object": self.obj, "created": self.created, "model": self.model, "choices": choices}
        if usage or self.continuous:
            out["usage"] = self.usage()
        return "data: " + json.dumps(out) + "\n\n"

    def close(self) -> list[str]:
        return ([self.frame([], usage=True)] if self.include else []) + ["data: [DONE]\n\n"]


def _usage(results: list[Result], prompts: list[list[int]]) -> Usage:
    """Prompt tokens once per prompt (not per sample), completion tokens over every choice."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(r.final.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _error_frame(e: ServingError) -> str:
    """A failure after the stream began (the status line is gone): an error event, as vLLM sends."""
    return "data: " + json.dumps({"error": {"message": e.message, "type": e.type, "param": e.param,
                                            "code": e.status}}) + "\n\n"
