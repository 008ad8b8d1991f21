"""The OpenAI-compatible surface as real clients use it, through the openai SDK against a real
server on 127.0.0.1: prompt lists and token ids, n, logprobs, echo (prompt scoring), sampling
options, structured output, the tokenizer routes, and 400s for what is refused."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from conftest import ServerProcess

KEY = "k"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_checkpoint):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--api-key", KEY,
                        "--max-new-tokens-limit", "200").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sdk(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_a_list_of_prompts_is_answered_in_order_as_each_alone(sdk):
    prompts = ["Ada has 12 apples", "Ben", "How many coins does Chen keep?"]
    alone = [sdk.completions.create(model="mlora@4", prompt=p, max_tokens=6).choices[0].text for p in prompts]
    batch = sdk.completions.create(model="mlora@4", prompt=prompts, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == alone
    assert batch.usage.completion_tokens == sum(
        sdk.completions.create(model="mlora@4", prompt=p, max_tokens=6).usage.completion_tokens for p in prompts)


def test_token_id_prompts_equal_their_text(sdk, served_in_process):
    tok = served_in_process[1]
    text = ["Ada has 12 apples", "Ben shares"]
    ids = [tok(t)["input_ids"] for t in text]
    by_text = sdk.completions.create(model="mlora@2", prompt=text, max_tokens=5)
    by_ids = sdk.completions.create(model="mlora@2", prompt=ids, max_tokens=5)
    one = sdk.completions.create(model="mlora@2", prompt=ids[0], max_tokens=5)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert one.choices[0].text == by_text.choices[0].text


def test_n_samples_per_prompt_in_openai_order_reproducible_with_a_seed(sdk):
    kw = dict(model="mlora@8", prompt=["Ada has", "Ben has"], max_tokens=8, n=3, temperature=1.0, seed=7)
    a, b = sdk.completions.create(**kw), sdk.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the seed fixes every sample
    assert len({c.text for c in a.choices[:3]}) > 1  # sample j uses seed + j: the samples differ
    chat = sdk.chat.completions.create(model="mlora@8", messages=[{"role": "user", "content": "hi"}], n=2,
                                       max_tokens=4)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: n copies


def test_completion_logprobs_are_the_served_ranks_own(sdk, served_in_process):
    model, tok, adapter = served_in_process
    prompt = "Ada has 12 apples and"
    for k in (0, 2, 8):
        c = sdk.completions.create(model=f"mlora@{k}", prompt=prompt, max_tokens=4, logprobs=3).choices[0]
        lp = c.logprobs
        assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        ids = tok(prompt)["input_ids"]
        adapter.set_rank(k)
        expected = []
        with torch.no_grad():  # greedy in-process at rank k: the served tokens and their logprobs
            for _ in lp.tokens:
                logp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
                ids.append(int(logp.argmax()))
                expected.append(float(logp.max()))
        for j, (t, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
            assert t == pytest.approx(expected[j], abs=1e-4)
            assert max(top.values()) == pytest.approx(t, abs=1e-6)  # greedy: the chosen is the most likely
            # the 3 most likely, most likely first (ids that decode to one string, e.g. two halves of
            # a UTF-8 character both "\ufffd", share one key: OpenAI's shape is keyed by text)
            assert 1 <= len(top) <= 3 and list(top.values()) == sorted(top.values(), reverse=True)


def test_echo_scores_the_prompt_as_the_in_process_loglikelihood_at_every_rank(sdk, served_in_process):
    """What lm-evaluation-harness's loglikelihood tasks send: token ids, echo, max_tokens 1,
    logprobs 1; they sum token_logprobs[len(context):-1]."""
    from trainer.evaluate import loglikelihood

    model, tok, adapter = served_in_process
    context = tok("Question: Ada has 12 apples and gets 7 more. How many?\nAnswer:")["input_ids"]
    conts = [tok(" 19", add_special_tokens=False)["input_ids"], tok(" 5 apples", add_special_tokens=False)["input_ids"]]
    for k in (0, 1, 4, 8):
        out = sdk.completions.create(model=f"mlora@{k}", prompt=[context + c for c in conts], max_tokens=1,
                                     logprobs=1, echo=True, temperature=0)
        adapter.set_rank(k)
        for choice, cont in zip(out.choices, conts):
            lp = choice.logprobs
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert len(lp.token_logprobs) == len(context) + len(cont) + 1  # the prompt, then the generated
            served = sum(lp.token_logprobs[len(context):-1])
            expected, greedy = loglikelihood(model, context, cont)
            assert served == pytest.approx(expected, abs=1e-4)
            assert all(t == max(top.values()) for t, top in zip(
                lp.token_logprobs[len(context):-1], lp.top_logprobs[len(context):-1])) == greedy
    scored = sdk.completions.create(model="mlora@8", prompt="Ada has", max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == "Ada has" and scored.usage.completion_tokens == 0


def test_streamed_completions_with_n_and_logprobs_match_the_whole_response(server, sdk):
    kw = dict(model="mlora@4", prompt=["Ada has", "Ben"], max_tokens=6, n=2, logprobs=2)
    whole = sdk.completions.create(**kw)
    texts, tokens = {}, {}
    for chunk in sdk.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.logprobs:
                tokens[ch.index] = tokens.get(ch.index, []) + ch.logprobs.tokens
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [tokens[i] for i in range(4)] == [c.logprobs.tokens for c in whole.choices]


def test_chat_logprobs_and_top_logprobs(sdk):
    chat = sdk.chat.completions.create(model="mlora@2", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token


def test_logit_bias_and_penalties_steer_the_batched_sampler(sdk, served_in_process):
    model, tok, adapter = served_in_process
    forced = tok(" apples", add_special_tokens=False)["input_ids"][0]
    c = sdk.completions.create(model="mlora@4", prompt="Ada has", max_tokens=4, logit_bias={str(forced): 100})
    assert c.choices[0].text == tok.decode([forced] * 4)
    adapter.set_rank(4)
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([tok("Ada has")["input_ids"]])).logits[0, -1].argmax())
    plain = sdk.completions.create(model="mlora@4", prompt="Ada has", max_tokens=1, logprobs=0).choices[0]
    banned = sdk.completions.create(model="mlora@4", prompt="Ada has", max_tokens=1, logprobs=0,
                                    logit_bias={str(first): -100}).choices[0]
    # logprobs are the model's own (unbiased): the runner-up it took instead is less likely
    assert banned.logprobs.token_logprobs[0] < plain.logprobs.token_logprobs[0]
    rep = sdk.completions.create(model="mlora@4", prompt="Ada has", max_tokens=24, frequency_penalty=2.0,
                                 presence_penalty=2.0, extra_body={"repetition_penalty": 1.5, "min_p": 0.05})
    assert rep.choices[0].finish_reason in ("length", "stop")


def test_json_schema_output_parses_and_validates(sdk):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    for k in (0, 8):
        out = sdk.chat.completions.create(model=f"mlora@{k}", messages=[{"role": "user", "content": "answer"}],
                                          max_tokens=60, temperature=1.0, seed=3,
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "a", "schema": schema}})
        value = json.loads(out.choices[0].message.content)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
        assert out.choices[0].finish_reason == "stop"
    obj = sdk.completions.create(model="mlora@4", prompt="JSON:", max_tokens=120, temperature=0.7, seed=1,
                                 extra_body={"response_format": {"type": "json_object"}})
    if obj.choices[0].finish_reason == "stop":  # a random model may write one long string; if it ends, it parses
        assert isinstance(json.loads(obj.choices[0].text), dict)


def test_refused_requests_are_400s_the_sdk_raises_as_bad_request(sdk):
    import openai

    cases = [
        (dict(model="mlora", prompt="x", max_tokens=2, suffix="y"), "suffix"),
        (dict(model="mlora", prompt="x", max_tokens=2, best_of=3), "best_of"),
        (dict(model="mlora", prompt="x", max_tokens=0), "only meaningful with echo"),
        (dict(model="mlora", prompt=[[1, 2], []], max_tokens=2), r"prompt\[1\] is an empty token list"),
        (dict(model="mlora", prompt=[10**6], max_tokens=2), "token id 1000000 is out of range"),
        (dict(model="mlora", prompt="x", max_tokens=2, logit_bias={"999999": 1}), "logit_bias names token 999999"),
        (dict(model="mlora", prompt="x", max_tokens=2, logprobs=21), "less than or equal to 20"),
        (dict(model="mlora", prompt="x", max_tokens=2, presence_penalty=3), "less than or equal to 2"),
        (dict(model="mlora", prompt=["x"] * 20, n=16, max_tokens=2), "320 choices"),
        (dict(model="mlora", prompt="x", max_tokens=2, extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}}), "response_format"),
    ]
    for kw, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            sdk.completions.create(**kw)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        sdk.chat.completions.create(model="mlora", messages=[{"role": "user", "content": "x"}], top_logprobs=2)


def test_tokenizer_routes_and_model_entries(server, served_in_process):
    tok = served_in_process[1]
    h = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(server.url + "/tokenize", json={"prompt": "Ada has 12 apples"}, headers=h).json()
    assert t["tokens"] == tok("Ada has 12 apples")["input_ids"] and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == 512
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                      headers=h).json()
    assert tok.decode(chat["tokens"]).endswith("<|assistant|>")
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d == {"prompt": "Ada has 12 apples"}
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    info = httpx.get(server.url + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    models = httpx.get(server.url + "/v1/models", headers=h).json()["data"]
    by_id = {m["id"]: m for m in models}
    base = by_id["mlora@0"]["root"]
    assert by_id["mlora@4"]["parent"] == base and by_id[base]["parent"] is None
    assert all(m["max_model_len"] == 512 for m in models)


def test_logprobs_are_finite_and_consistent_under_sampling(sdk):
    c = sdk.completions.create(model="mlora@8", prompt="Ada", max_tokens=10, temperature=1.5, seed=2, logprobs=5)
    lp = c.choices[0].logprobs
    assert all(math.isfinite(t) and t <= 0 for t in lp.token_logprobs)
    assert all(lp.tokens[j] in top for j, top in enumerate(lp.top_logprobs))  # the chosen is always listed


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(sdk):
    """vLLM's stream_options extension, which guidellm always sends."""
    kw = dict(model="mlora@2", prompt="Ada has", max_tokens=6, extra_body={"ignore_eos": True})
    whole = sdk.completions.create(**kw)
    chunks = list(sdk.completions.create(**kw, stream=True, stream_options={"include_usage": True,
                                                                           "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and counts == sorted(counts)
    assert chunks[-1].usage == whole.usage and not chunks[-1].choices  # the include_usage chunk, last
    plain = list(sdk.completions.create(**kw, stream=True))
    assert all(c.usage is None for c in plain)  # neither option: no usage anywhere
