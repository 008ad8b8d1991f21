"""HTTP request/response models: the one definition the server and the client share.

Unknown fields are rejected (400 naming the field) rather than silently ignored. Types are
strict (``true`` is not a rank, ``"1"`` is not a number; an integer is a number), numbers are
finite, and every bound below is what the engine can really take: a request
the engine could not serve is refused here, with a 4xx, before it reaches the engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

INT64 = (-2**63, 2**63 - 1)  # torch.Generator.manual_seed takes a 64-bit seed
MAX_STOPS, MAX_STOP_CHARS = 8, 64  # each generated token is checked against every stop's prefixes
MAX_TOP_K = 2**31 - 1
MAX_NAME_CHARS = 256  # model and user names
MAX_MESSAGES = 256
MAX_BIAS = 300  # logit_bias entries (OpenAI's limit)
MAX_PROMPTS, MAX_N, MAX_CHOICES = 256, 16, 256  # prompts per request, samples per prompt, their product
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default cap; OpenAI's is 5 for completions)
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


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
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below min_p × the top token's probability")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted once from a token already generated")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0,
                                     description="subtracted per time a token was already generated")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="CTRL-style, over prompt and output "
                                      "tokens (1 = off)")
    logit_bias: dict[str, float] | None = Field(None, description=f"token id → bias in [-100, 100] added to its "
                                                f"logit (at most {MAX_BIAS} entries)")
    stop: Annotated[list[Stop], Field(max_length=MAX_STOPS), BeforeValidator(_one_or_many)] | None = Field(
        None, description=f"stop strings (not included in the text): one string or a list of up to "
        f"{MAX_STOPS}, 1 to {MAX_STOP_CHARS} characters each")
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1], description="reproducible sampling (64-bit)")
    stream: bool = False
    ignore_eos: bool = Field(False, description="generate exactly the maximum number of tokens")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_BIAS:
            raise ValueError(f"at most {MAX_BIAS} logit_bias entries, got {len(v)}")
        for key, bias in v.items():
            if not key.isascii() or not key.isdigit() or len(key) > 9:
                raise ValueError(f"logit_bias keys are token ids (decimal strings), got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{key}] must be in [-100, 100], got {bias}")
        return v

    def to_sampling_params(self, max_new_tokens: int, logprobs: int | None = None, grammar=None):
        """The engine's SamplingParams (imported here: the client uses this module without torch)."""
        from server.sampling import SamplingParams

        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              logit_bias={int(k): float(b) for k, b in (self.logit_bias or {}).items()},
                              stop=list(self.stop or []), seed=self.seed, ignore_eos=self.ignore_eos,
                              logprobs=logprobs, grammar=grammar)


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
    compute: dict = Field(default_factory=dict, description="how the server computes: device, dtype, torch threads, "
                          "GEMM mode, fused siblings, decode path (lean | transformers), rank-0 decode compiled, prefill pieces "
                          "mixed in")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- OpenAI-compatible API ------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="a last chunk with the whole request's usage")
    continuous_usage_stats: bool = Field(False, description="with include_usage: every chunk also carries "
                                         "the usage so far (vLLM's extension; guidellm sends it)")


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


class JsonSchemaFormat(_Strict):
    name: Name = "response"
    description: Text | None = None
    schema_: dict = Field(alias="schema", description="a JSON Schema the output must validate against")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON that follows a schema
    (enforced token by token: the output always parses, and validates against the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class _OpenAIBase(_Sampling):
    model: Name
    rank: RankField | None = Field(None, description="extension: overrides a rank in the model name")
    rank_policy: Literal["fixed", "elastic"] = "fixed"
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N, description="samples per prompt")
    user: Name | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    timeout: float | None = Field(None, gt=0)

    def prompt_count(self) -> int:
        return 1

    @model_validator(mode="after")
    def _bounded_choices(self):
        total = self.prompt_count() * self.n
        if total > MAX_CHOICES:
            raise ValueError(f"{self.prompt_count()} prompts × n {self.n} = {total} choices; at most "
                             f"{MAX_CHOICES} per request")
        if self.response_format is not None and self.response_format.type != "text" and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a JSON response_format (the JSON ends the output)")
        return self


PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


def _prompt_shape(v):
    """One clear error for a prompt of the wrong shape (a union's per-member errors say nothing)."""
    def ids(x, where: str) -> None:
        if not x:
            raise ValueError(f"{where} is an empty token list")
        bad = next((t for t in x if type(t) is not int or not 0 <= t < 2**31), None)
        if bad is not None:
            raise ValueError(f"{where} holds {bad!r}: token ids are integers in [0, 2^31)")

    if isinstance(v, str):
        if not v:
            raise ValueError("prompt must not be empty")
        return v
    if not isinstance(v, list) or not v:
        raise ValueError(f"prompt must be {PROMPT_SHAPES}; got "
                         + ("an empty list" if isinstance(v, list) else type(v).__name__))
    if len(v) > MAX_PROMPTS and not all(type(t) is int for t in v):
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
    if all(isinstance(t, str) for t in v):
        for i, t in enumerate(v):
            if not t:
                raise ValueError(f"prompt[{i}] must not be empty")
    elif all(isinstance(t, list) for t in v):
        for i, t in enumerate(v):
            ids(t, f"prompt[{i}]")
    elif all(type(t) is int for t in v):
        ids(v, "prompt")
    else:
        raise ValueError(f"prompt must be {PROMPT_SHAPES}; got a list of "
                         + " and ".join(sorted({type(t).__name__ for t in v})))
    return v


class CompletionRequest(_OpenAIBase):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "mlora@4", "prompt": "Ada has",
                                                               "max_tokens": 4}]})

    prompt: Annotated[Text | list[Text] | list[TokenId] | list[list[TokenId]], BeforeValidator(_prompt_shape)] = \
        Field(description=PROMPT_SHAPES + "; each prompt is its own request, answered in order")
    max_tokens: int | None = Field(None, ge=0, description="0 (with echo): score the prompt, generate nothing")
    echo: bool = Field(False, description="return the prompt before the completion (with logprobs: the "
                       "prompt tokens' own logprobs, the first null)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="logprob of each token and of the "
                                 "n most likely alternatives")
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt on its own: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def prompt_count(self) -> int:
        return len(self.prompts())

    @model_validator(mode="after")
    def _supported(self):
        if self.suffix:
            raise ValueError("suffix (fill in the middle) is not supported: this model only continues a prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of {self.best_of} is not supported (only best_of = n: every sample is returned)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it is only meaningful with echo (prompt logprobs)")
        return self


class ChatCompletionRequest(_OpenAIBase):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "mlora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}]})

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token (nothing predicts it)
    top_logprobs: list[dict[str, float] | None]  # the n most likely, and the chosen token
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    rank: int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    rank: int | None = None  # the first choice's (extension)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    rank: int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    rank: int | None = None


class TokenizeRequest(_Strict):
    """vLLM's ``/tokenize``: a prompt, or chat messages through the model's template."""

    model: Name | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: Name | None = None
    tokens: list[TokenId]


def openai_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
