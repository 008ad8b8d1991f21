"""The batched sampler against one-row references, logprobs, seeds, and structured (JSON) output."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from server.errors import InvalidRequest
from server.sampling import (RowSampling, SamplingParams, filter_batch, filter_logits, make_generator, process,
                             sample)

V = 32  # a small vocabulary: references loop over it in Python


def make_row(params: SamplingParams, prompt=(), output=(), seed=0) -> RowSampling:
    row = RowSampling(params, list(prompt), make_generator(seed))
    for t in output:
        row.accept(t)
    return row


def reference_penalties(x: torch.Tensor, p: SamplingParams, prompt, output) -> torch.Tensor:
    """One row, plain Python, in the documented order: logit_bias → repetition → presence/frequency."""
    x = x.clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in collections.Counter(output).items():
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    return x


def reference_min_p(x: torch.Tensor, temperature: float, min_p: float) -> torch.Tensor:
    x = x / temperature
    probs = x.softmax(-1)
    return torch.tensor([x[t] if probs[t] >= min_p * probs.max() else float("-inf") for t in range(len(x))])


FEATURES = {  # feature → settings of the rows that use it (each batch adds rows that do not)
    "logit_bias": [dict(logit_bias={3: 5.0, 7: -100.0}), dict(logit_bias={0: 0.5, 3: -2.0, 31: 10.0})],
    "repetition_penalty": [dict(repetition_penalty=1.3), dict(repetition_penalty=0.7)],
    "presence_penalty": [dict(presence_penalty=0.8), dict(presence_penalty=-1.5)],
    "frequency_penalty": [dict(frequency_penalty=0.6), dict(frequency_penalty=2.0)],
    "all": [dict(logit_bias={5: 3.0}, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3,
                 temperature=0.9, top_k=8)],
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_penalties_and_bias_equal_the_one_row_reference_and_leave_other_rows_alone(feature):
    gen = torch.Generator().manual_seed(0)
    settings = [*FEATURES[feature], {}, dict(temperature=1.0)]  # the last two use no feature
    history = [([int(t) for t in torch.randint(V, (6,), generator=gen)],
                [int(t) for t in torch.randint(V, (9,), generator=gen)]) for _ in settings]
    rows = [make_row(SamplingParams(**s), prompt, out[:5]) for s, (prompt, out) in zip(settings, history)]
    for step in range(2):  # the second step checks the counts kept incrementally since the first
        if step:
            for row, (_, out) in zip(rows, history):
                for t in out[5:]:
                    row.accept(t)
        logits = torch.randn(len(rows), V, generator=gen)
        got = process(logits.clone(), rows)
        for i, (row, (prompt, _)) in enumerate(zip(rows, history)):
            want = reference_penalties(logits[i], row.params, prompt, row.output)
            torch.testing.assert_close(got[i], want)  # rows without the feature: want == logits[i]
        assert torch.equal(got[-2:], logits[-2:])


def test_a_greedy_row_takes_the_argmax_after_bias_and_penalties():
    logits = torch.zeros(3, V)
    logits[:, 4], logits[:, 9] = 2.0, 1.5  # 4 leads, 9 runs second
    rows = [make_row(SamplingParams(frequency_penalty=0.4), output=[4, 4]),  # 2 - 0.8 < 1.5
            make_row(SamplingParams(logit_bias={9: 1.0})),
            make_row(SamplingParams(), output=[4, 4])]  # plain greedy: untouched
    assert [s.token for s in sample(logits, rows)] == [9, 9, 4]


def test_min_p_keeps_exactly_the_tokens_the_reference_keeps():
    gen = torch.Generator().manual_seed(1)
    params = [SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(temperature=0.7, min_p=0.3),
              SamplingParams(temperature=1.3), SamplingParams(temperature=1.0, min_p=1.0)]
    logits = torch.randn(len(params), V, generator=gen) * 2
    got = filter_batch(logits.clone(), params)
    for i, p in enumerate(params):
        torch.testing.assert_close(got[i], reference_min_p(logits[i], p.temperature, p.min_p))
    assert torch.isfinite(got[3]).sum() == 1  # min_p = 1: only the most likely token survives


def test_batched_temperature_top_k_top_p_equal_filter_logits_row_by_row():
    gen = torch.Generator().manual_seed(2)
    settings = [(1.0, 0, 1.0), (0.5, 5, 1.0), (1.5, 0, 0.8), (0.8, 10, 0.5), (1.0, V, 0.99), (2.0, 1, 0.3)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in settings]
    logits = torch.randn(len(params), V, generator=gen) * 3
    got = filter_batch(logits.clone(), params)
    for i, (t, k, p) in enumerate(settings):
        torch.testing.assert_close(got[i], filter_logits(logits[i], t, k, p))


def test_logprobs_are_the_raw_log_softmax_with_sorted_top_n():
    gen = torch.Generator().manual_seed(3)
    rows = [make_row(SamplingParams(logprobs=3)),
            make_row(SamplingParams(logprobs=0)),
            make_row(SamplingParams()),
            make_row(SamplingParams(logprobs=5, temperature=1.0, presence_penalty=2.0, logit_bias={1: 50.0},
                                    seed=4), output=[0, 2])]
    logits = torch.randn(len(rows), V, generator=gen)
    out = sample(logits, rows)
    raw = logits.float().log_softmax(-1)
    for i, (row, s) in enumerate(zip(rows, out)):
        n = row.params.logprobs
        if n is None:
            assert s.logprob is None
            continue
        assert s.logprob.token == s.token
        assert s.logprob.logprob == pytest.approx(float(raw[i, s.token]), abs=1e-6)  # the raw one, not the biased
        assert [t for t, _ in s.logprob.top] == raw[i].topk(n).indices.tolist()
        values = [lp for _, lp in s.logprob.top]
        assert values == sorted(values, reverse=True) and len(values) == n
        assert values == pytest.approx(raw[i].topk(n).values.tolist(), abs=1e-6)
    assert out[1].logprob.top == [] and out[3].token == 1  # the bias chose the token: +50


def test_mixed_greedy_and_sampling_rows_are_reproducible_and_independent_of_the_batch():
    gen = torch.Generator().manual_seed(5)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.8, top_p=0.9,
              seed=8), SamplingParams(temperature=1.2, top_k=10, min_p=0.05, seed=9)]
    steps = [torch.randn(len(params), V, generator=gen) for _ in range(20)]

    def run(batch: list[int]) -> dict[int, list[int]]:
        rows = {i: make_row(params[i], seed=params[i].seed or 0) for i in batch}
        for logits in steps:
            for i, s in zip(batch, sample(logits[batch], [rows[i] for i in batch])):
                rows[i].accept(s.token)
        return {i: rows[i].output for i in batch}

    together = run([0, 1, 2, 3])
    assert together == run([0, 1, 2, 3])  # the same seeds, the same tokens
    assert together[0] == [int(x[0].argmax()) for x in steps]
    assert together[1] != together[2]
    assert together[1] == run([1])[1] and together[3] == run([3, 0])[3]  # a row's tokens ignore its neighbours


def test_bfloat16_logits_choose_like_their_float32_copy_and_report_float32_logprobs():
    logits = (torch.randn(3, V, generator=torch.Generator().manual_seed(10)) * 3).to(torch.bfloat16)
    params = [SamplingParams(logprobs=2), SamplingParams(repetition_penalty=1.5, logprobs=1),
              SamplingParams(temperature=1.0, top_k=4, seed=1)]
    half = sample(logits, [make_row(p, prompt=[0, 1], seed=1) for p in params])
    full = sample(logits.float(), [make_row(p, prompt=[0, 1], seed=1) for p in params])
    assert [s.token for s in half] == [s.token for s in full]
    assert half[0].logprob == full[0].logprob and isinstance(half[0].logprob.logprob, float)


# -- structured output --------------------------------------------------------------------------------------
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
                 "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def structured(tokenizer):
    from server.structured import StructuredOutput

    return StructuredOutput(tokenizer)


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def generate(grammar, tokenizer, seed: int, width: int | None = None, max_tokens: int = 300,
             **params) -> tuple[str, str, list[int]]:
    """Token by token through sample() + accept() on random logits: (text, how it ended, tokens)."""
    width = width or len(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    row = make_row(SamplingParams(grammar=grammar, temperature=1.0, seed=seed, **params), seed=seed)
    for _ in range(max_tokens):
        logits = torch.randn(1, width, generator=gen) * 2
        logits[0, len(tokenizer):] = 50.0  # padding ids past the vocabulary: the model's favourites
        tok = sample(logits, [row])[0].token
        if tok == tokenizer.eos_token_id:
            assert row.matcher.accepting
            return tokenizer.decode(row.output), "eos", row.output
        row.accept(tok)
        if row.done:
            return tokenizer.decode(row.output), "done", row.output
    return tokenizer.decode(row.output), "length", row.output


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_parses_and_validates(structured, tokenizer, seed):
    text, ended, _ = generate(structured.compile(json_schema(ANSWER_SCHEMA)), tokenizer, seed)
    assert ended == "done", text
    value = json.loads(text)
    assert set(value) == {"answer"} and type(value["answer"]) is int


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_output_is_a_dict(structured, tokenizer, seed):
    closing = {tokenizer.encode(c)[0]: 4.0 for c in '"]}'}  # random text rarely closes its strings
    text, ended, _ = generate(structured.compile({"type": "json_object"}), tokenizer, seed, logit_bias=closing)
    assert ended == "done", text
    assert isinstance(json.loads(text), dict)


def test_logits_wider_than_the_vocabulary_never_yield_padding_ids(structured, tokenizer):
    text, ended, tokens = generate(structured.compile(json_schema(ANSWER_SCHEMA)), tokenizer, 3,
                                   width=len(tokenizer) + 20)
    assert ended == "done" and max(tokens) < len(tokenizer)
    assert type(json.loads(text)["answer"]) is int


def test_the_mask_is_the_grammars_own_token_set(structured, tokenizer):
    from server.structured import allowed_tokens

    matcher = structured.compile({"type": "json_object"}).matcher()
    for piece in ["{", '"', "a"]:
        matcher.accept(tokenizer.encode(piece)[0])
        theirs = torch.tensor(list(matcher._m.compute_logit_bias())) > 0  # llguidance: one byte per id
        assert torch.equal(allowed_tokens([matcher], len(tokenizer), "cpu")[0], theirs)


def test_bias_cannot_bring_back_a_token_the_grammar_forbids(structured, tokenizer):
    letter = tokenizer.encode("x")[0]  # JSON cannot start with x
    row = make_row(SamplingParams(grammar=structured.compile(json_schema(ANSWER_SCHEMA)), logit_bias={letter: 100.0},
                                  repetition_penalty=0.5, presence_penalty=-2.0), prompt=[letter], output=[])
    logits = torch.zeros(1, len(tokenizer))
    logits[0, letter] = 10.0
    assert sample(logits, [row])[0].token != letter


def test_eos_is_allowed_exactly_when_the_grammar_is_satisfied(structured, tokenizer):
    grammar = structured.compile(json_schema({"type": "integer"}))
    eos = tokenizer.eos_token_id
    logits = torch.zeros(1, len(tokenizer))
    logits[0, eos] = 100.0
    row = make_row(SamplingParams(grammar=grammar))
    assert sample(logits, [row])[0].token != eos  # nothing yet: not a JSON integer
    for t in tokenizer.encode("12"):
        row.accept(t)
    assert not row.done and sample(logits, [row])[0].token == eos  # "12" may end, or go on
    row.accept(eos)
    assert row.done


def test_a_closed_object_is_done_and_allows_only_eos(structured, tokenizer):
    row = make_row(SamplingParams(grammar=structured.compile({"type": "json_object"})))
    for t in tokenizer.encode("{}"):
        assert not row.done
        row.accept(t)
    assert row.done
    logits = torch.randn(1, len(tokenizer), generator=torch.Generator().manual_seed(0))
    assert sample(logits, [row])[0].token == tokenizer.eos_token_id


def test_a_token_the_grammar_refuses_raises_value_error(structured, tokenizer):
    row = make_row(SamplingParams(grammar=structured.compile({"type": "json_object"})))
    with pytest.raises(ValueError, match="does not fit the response_format grammar"):
        row.accept(tokenizer.encode("x")[0])
    assert row.output == []


def test_text_format_needs_no_grammar(structured):
    assert structured.compile({"type": "text"}) is None and structured.compile(None) is None


@pytest.mark.parametrize("response_format, names", [
    (json_schema({"type": "nonsense"}), "nonsense"),
    (json_schema({"type": "string", "pattern": "(?<=a)b"}), "look-around"),
    (json_schema({"type": "array", "contains": {"type": "integer"}}), "contains"),
    (json_schema({"$ref": "#/definitions/missing"}), "missing"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "yaml"}, "'yaml'"),
    ("json_object", "must be an object"),
])
def test_a_bad_response_format_is_an_invalid_request_naming_the_problem(structured, response_format, names):
    with pytest.raises(InvalidRequest, match=names) as e:
        structured.compile(response_format)
    assert e.value.param == "response_format"


def test_rows_with_and_without_a_grammar_share_a_batch(structured, tokenizer):
    grammar = structured.compile(json_schema(ANSWER_SCHEMA))
    rows = [make_row(SamplingParams()), make_row(SamplingParams(grammar=grammar)),
            make_row(SamplingParams(temperature=1.0, seed=3))]
    logits = torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(6))
    out = sample(logits, rows)
    assert out[0].token == int(logits[0].argmax())
    rows[1].accept(out[1].token)  # the grammar's row chose a token its grammar allows (else ValueError)
