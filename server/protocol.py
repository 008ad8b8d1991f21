"""HTTP request/response models: the one definition the server and the client share.

Unknown fields are rejected (422 naming the field) rather than silently ignored. Types are
strict (``true`` is not a rank, ``"1"`` is not a number; an integer is a number), numbers are
finite, and every bound below is what the engine can really take: a request
the engine could not serve is refused here, with a 4xx, before it reaches the engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

INT64 = (-2**63, 2**63 - 1)  # torch.Generator.manual_seed takes a 64-bit seed
MAX_STOPS, MAX_STOP_CHARS = 8, 64  # each generated token is checked against every stop's prefixes
MAX_TOP_K = 2**31 - 1
MAX_NAME_CHARS = 256  # model and user names
MAX_MESSAGES = 256


def _unicode(s: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"): that is no text a tokenizer can take."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: {e.reason} at position {e.start}") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_unicode)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]


def _one_or_many(v):
    return [v] if isinstance(v, str) else v
RankField = int | Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Sampling(_Strict):
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 = no top-k cut")
    stop: Annotated[list[Stop], Field(max_length=MAX_STOPS), BeforeValidator(_one_or_many)] | None = Field(
        None, description=f"stop strings (not included in the text): one string or a list of up to "
        f"{MAX_STOPS}, 1 to {MAX_STOP_CHARS} characters each")
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1], description="reproducible sampling (64-bit)")
    stream: bool = False
    ignore_eos: bool = Field(False, description="generate exactly the maximum number of tokens")

    def sampling(self, max_new_tokens: int):
        """The engine's SamplingParams (imported here: the client uses this module without torch)."""
        from server.sampling import SamplingParams

        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=list(self.stop or []), seed=self.seed,
                              ignore_eos=self.ignore_eos)


# -- native API ---------------------------------------------------------------------------------------
class GenerateRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Question: Ada has 12 apples and gets 7 more. How many?\nAnswer: ", "rank": 4,
         "max_new_tokens": 4}]})

    prompt: Text = Field(min_length=1)
    rank: RankField | None = Field(None, description="a rank in {0} ∪ R, or 'auto'; default: the server's")
    rank_policy: Literal["fixed", "elastic"] = Field(
        "fixed", description="elastic: the rank is a ceiling the controller may lower under load")
    max_new_tokens: int = Field(128, ge=1)
    timeout: float | None = Field(None, gt=0, description="seconds; the request is dropped after it")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = 0


class Timings(BaseModel):
    queue_s: float | None
    ttft_s: float | None
    total_s: float | None


class GenerateResponse(BaseModel):
    text: str
    rank: int
    finish_reason: str
    usage: Usage
    timings: Timings


class StreamChunk(BaseModel):
    """One server-sent event of ``/generate`` with ``stream: true``: token deltas, then a final
    event (``done: true``) with rank, finish_reason, usage and timings."""

    text: str = ""
    done: bool = False
    rank: int | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None


class RankInfo(BaseModel):
    ranks: list[int]
    r: int
    scaling: str
    method: str
    default_rank: RankField
    inference: dict = Field(default_factory=dict, description="rule and coefficients c_k: rank k serves "
                            "W x + B[:, :k] (c_k ⊙ A[:k] x)")
    eval: dict = Field(default_factory=dict)
    throughput: dict[str, float] = Field(default_factory=dict, description="measured decode tokens/s per rank")
    controller: dict = Field(default_factory=dict)
    merge: dict = Field(default_factory=dict, description="mode (off | fixed | auto) and the rank merged now")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- OpenAI-compatible API ------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAIBase(_Sampling):
    model: Name
    rank: RankField | None = Field(None, description="extension: overrides a rank in the model name")
    rank_policy: Literal["fixed", "elastic"] = "fixed"
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    user: Name | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: must be 0")
    timeout: float | None = Field(None, gt=0)


class CompletionRequest(_OpenAIBase):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "mlora@4", "prompt": "Ada has",
                                                               "max_tokens": 4}]})

    prompt: Text | list[Text]
    echo: bool = Field(False, description="not supported: must be false")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError(f"exactly one prompt is supported, got {len(v)}")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


def _text_parts_only(v):
    """OpenAI's content parts: text parts pass; any other part is refused, saying which (this
    server serves a text-only model)."""
    if isinstance(v, list):
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"content[{i}] is a {kind!r} part; this model reads text only, so only "
                                 "parts {\"type\": \"text\", \"text\": ...} are accepted")
    return v


def _join_parts(v: str | list[TextPart]) -> str:
    return v if isinstance(v, str) else "\n".join(p.text for p in v)  # as vLLM joins text parts


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # a string, or a list of text parts (joined by newlines): what the openai SDK and guidellm send
    content: Annotated[Text | list[TextPart], BeforeValidator(_text_parts_only), AfterValidator(_join_parts)] = \
        Field(description="a string, or a list of text parts [{\"type\": \"text\", \"text\": ...}]")
    name: Name | None = None


class ChatCompletionRequest(_OpenAIBase):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "mlora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}]})

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)


def openai_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
