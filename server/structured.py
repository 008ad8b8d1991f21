"""Structured output: OpenAI's ``response_format`` compiled to a token grammar (llguidance).

* :class:`StructuredOutput` — one per server, built from the HF tokenizer: turns a
  ``response_format`` into a :class:`Grammar` (``{"type": "text"}`` → None, ``json_object`` → any
  JSON object, ``json_schema`` → that schema), or raises :class:`InvalidRequest` naming the problem.
* :class:`Grammar` — compiled once, immutable, shared by every request that sends the same format.
* :class:`Matcher` — one per generating row: where that row is in the grammar. Before each token it
  says which token ids may come next (:func:`allowed_tokens`, one bit per id); :meth:`Matcher.accept`
  advances it by the token the sampler chose.

End of generation: while the grammar is satisfied (``is_accepting``) the mask allows the tokenizer's
EOS; once nothing but EOS can follow (a closed JSON object), :attr:`Matcher.done` is True and the
engine ends the row with ``finish_reason`` ``stop``, without spending a step on the EOS.

JSON options follow vLLM's llguidance backend: flexible whitespace between tokens (the model may
pretty-print), and ``oneOf`` approximated by ``anyOf`` (llguidance refuses ``oneOf`` otherwise, and
schemas written for OpenAI often use it). ``json_schema.strict`` is accepted and changes nothing:
the schema is always enforced.
"""

from __future__ import annotations

import functools
import json
import logging

import llguidance
import torch

from server.errors import InvalidRequest

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": True, "coerce_one_of": True}  # as vLLM's guidance backend
ANY_JSON_OBJECT = {"type": "object"}
COMPILED_CACHE = 128  # distinct response formats kept compiled (clients usually repeat one schema)


class Grammar:
    """A compiled grammar. Immutable: rows never advance it, each gets a :meth:`matcher`."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, template: llguidance.LLMatcher, source: str):
        self.tokenizer = tokenizer
        self._template = template  # never consumes a token; rows get deep copies
        self.source = source  # what it was compiled from, for error messages
        self.vocab_size = tokenizer.vocab_size  # ids the grammar knows; wider logits are padding
        self.eos_token_ids = list(tokenizer.eos_tokens)

    def matcher(self) -> Matcher:
        return Matcher(self)

    def __repr__(self) -> str:
        return f"Grammar({self.source})"


class Matcher:
    """One row's position in its grammar."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self._m = grammar._template.deep_copy()  # ~2 µs; compiling anew costs ~0.4 ms and up

    def accept(self, token: int) -> None:
        """Advance by ``token``; a token the grammar refuses raises ValueError (the engine fails
        that request alone). The sampler masks refused tokens, so this means a caller bug."""
        if not self._m.consume_token(token):
            why = self._m.get_error().splitlines()[0] if self._m.get_error() else "refused"
            raise ValueError(f"token {token} does not fit the response_format grammar "
                             f"({self.grammar.source}): {why}")

    @property
    def accepting(self) -> bool:
        """The text so far satisfies the grammar (EOS is allowed next)."""
        return self._m.is_accepting()

    @property
    def done(self) -> bool:
        """Nothing but EOS can follow: the row is complete."""
        return self._m.is_stopped() and not self._m.is_error()

    def bitmask(self) -> torch.Tensor:
        """(ceil(vocab / 32),) int32, CPU: bit ``t % 32`` of word ``t // 32`` is set when token
        ``t`` may come next. (Not ``llguidance.torch``: importing it loads torch.compile's machinery, ~5 s.)"""
        return torch.frombuffer(bytearray(self._m.compute_bitmask()), dtype=torch.int32)


def allowed_tokens(matchers: list[Matcher], width: int, device: torch.device | str) -> torch.Tensor:
    """(G, width) bool on ``device``: True where matcher g allows the token id next.

    Ids at or past the tokenizer's vocabulary (the lm_head's padding rows when the logits are wider
    than the tokenizer) are never allowed. Plain-loop meaning, for row g and id t:
    ``allowed[g, t] = t < vocab and (bitmask[g, t // 32] >> (t % 32)) & 1``."""
    sizes = {m.grammar.vocab_size for m in matchers}
    if len(sizes) != 1:
        raise ValueError(f"one batch mixes grammars of tokenizers of sizes {sorted(sizes)}; "
                         "build every grammar with the server's one StructuredOutput")
    vocab = sizes.pop()
    bitmask = torch.stack([m.bitmask() for m in matchers])  # (G, ceil(vocab / 32))
    bits = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((bitmask.to(device).unsqueeze(-1) >> bits) & 1).bool().flatten(1)  # (G, 32 * words)
    allowed = allowed[:, :min(vocab, width)]
    if allowed.shape[1] < width:  # padding ids past the tokenizer's vocabulary: never allowed
        allowed = torch.cat([allowed, allowed.new_zeros(len(matchers), width - allowed.shape[1])], 1)
    return allowed


class StructuredOutput:
    """Compiles ``response_format`` for one tokenizer. Build once per server (wrapping the
    tokenizer costs up to ~1 s on a large vocabulary); :meth:`compile` is thread-safe and caches."""

    def __init__(self, tokenizer):
        import llguidance.hf  # imports transformers: only servers that build one pay for it

        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        except ValueError as e:
            raise ValueError(f"structured output needs a fast (Rust) HF tokenizer, got "
                             f"{type(tokenizer).__name__}: {e}") from e
        self._compile_schema = functools.lru_cache(maxsize=COMPILED_CACHE)(self._compile_uncached)

    def compile(self, response_format: dict | None) -> Grammar | None:
        """``response_format`` as OpenAI sends it → a Grammar, or None for free text.
        Raises InvalidRequest (param ``response_format``) naming what is wrong."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise _invalid(f"response_format must be an object such as {{\"type\": \"json_object\"}}, "
                           f"got {type(response_format).__name__}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return self._compile_schema(json.dumps(ANY_JSON_OBJECT), "json_object")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise _invalid("response_format.json_schema must be an object "
                               "{\"name\": ..., \"schema\": {...}}, got "
                               f"{'nothing' if spec is None else type(spec).__name__}")
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise _invalid("response_format.json_schema.schema must be a JSON Schema object, got "
                               f"{'nothing' if schema is None else type(schema).__name__}")
            name = spec.get("name") or "unnamed"
            return self._compile_schema(json.dumps(schema, sort_keys=True), f"json_schema {name!r}")
        raise _invalid(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")

    def _compile_uncached(self, schema: str, source: str) -> Grammar:
        try:
            serialized = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise _invalid(f"response_format {source}: {e}") from e
        template = llguidance.LLMatcher(self.tokenizer, serialized, log_level=0)
        if template.is_error():
            raise _invalid(f"response_format {source} cannot be enforced: {template.get_error()}")
        for warning in template.get_grammar_warnings():
            log.warning("response_format %s: %s", source, warning)
        return Grammar(self.tokenizer, template, source)


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="response_format")
