"""Hostile input at the HTTP boundary: every field of every endpoint at and past its bounds
(types, ranges, sizes, encodings, nesting, duplicates, unknown fields). Each gets a 4xx in the
one error shape — never a 5xx — and the server goes on serving. (schemathesis covers the same
ground generatively: tests/test_fuzz.py.)"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from conftest import ServerProcess, metric
from server.metrics import ENGINE_HEALTHY, REQUESTS_TOTAL

LIMIT = 8  # --max-new-tokens-limit of this module's server
MAX_BODY = 16384  # --max-body-bytes


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_checkpoint):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--calibrate-steps", "0",
                        "--max-new-tokens-limit", str(LIMIT), "--max-body-bytes", str(MAX_BODY)).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


GEN, CMPL, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
BASE = {GEN: {"prompt": "Ada", "max_new_tokens": 2}, CMPL: {"model": "mlora", "prompt": "Ada", "max_tokens": 2},
        CHAT: {"model": "mlora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
SAMPLING = [  # (field, value, the error names) for the fields every endpoint shares
    ("seed", 10**30, "less than or equal to 9223372036854775807"), ("seed", -2**63 - 1, "greater than or equal"),
    ("seed", True, "valid integer"), ("seed", 1.5, "valid integer"), ("seed", "7", "valid integer"),
    ("rank", True, "rank"), ("rank", False, "rank"), ("rank", 1.0, "rank"), ("rank", "1", "rank"),
    ("rank", -1, "not served"), ("rank", 2**70, "not served"), ("rank", [1], "rank"), ("rank", {"k": 1}, "rank"),
    ("top_k", -1, "greater than or equal to 0"), ("top_k", 2**31, "less than or equal"), ("top_k", True, "integer"),
    ("temperature", -0.1, "greater than or equal to 0"), ("temperature", 5.01, "less than or equal to 5"),
    ("temperature", "hot", "valid number"), ("temperature", True, "valid number"),
    ("top_p", 0, "greater than 0"), ("top_p", 1.5, "less than or equal to 1"), ("top_p", None, "valid number"),
    ("stop", [""], "at least 1 character"), ("stop", "x" * 65, "at most 64 characters"),
    ("stop", ["a"] * 9, "at most 8 items"), ("stop", [1], "valid string"), ("stop", [["a"]], "valid string"),
    ("stream", 1, "valid boolean"), ("stream", "true", "valid boolean"), ("ignore_eos", None, "valid boolean"),
    ("timeout", 0, "greater than 0"), ("timeout", -1, "greater than 0"), ("timeout", "1", "valid number"),
    ("rank_policy", "loose", "'fixed' or 'elastic'"), ("unknown_field", 1, "Extra inputs are not permitted"),
    ("presence_penalty", 2.5, "less than or equal to 2"), ("frequency_penalty", -3, "greater than or equal to -2"),
    ("repetition_penalty", 0, "greater than 0"), ("min_p", 1.5, "less than or equal to 1"),
    ("logit_bias", {"5": 101}, "must be in [-100, 100]"), ("logit_bias", {"a": 1}, "token ids"),
    ("logit_bias", {"999999": 1}, "logit_bias names token 999999"), ("logit_bias", [5], "valid dictionary"),
    ("logit_bias", {str(i): 1 for i in range(301)}, "at most 300"),
]
PER_ENDPOINT = [
    (GEN, "prompt", "", "at least 1 character"), (GEN, "prompt", 5, "valid string"),
    (GEN, "prompt", ["Ada"], "valid string"), (GEN, "prompt", {"text": "Ada"}, "valid string"),
    (GEN, "prompt", None, "valid string"), (GEN, "max_new_tokens", 0, "greater than or equal to 1"),
    (GEN, "max_new_tokens", LIMIT + 1, f"limit of {LIMIT}"), (GEN, "max_new_tokens", 2**64, f"limit of {LIMIT}"),
    (GEN, "max_new_tokens", 2.0, "valid integer"), (GEN, "max_new_tokens", True, "valid integer"),
    (CMPL, "prompt", [], "got an empty list"), (CMPL, "prompt", [[]], "empty token list"),
    (CMPL, "prompt", "", "must not be empty"), (CMPL, "prompt", [[1, "a"]], "token ids are integers"),
    (CMPL, "prompt", [1.5], "a list of float"), (CMPL, "prompt", [2**40], "token ids are integers"),
    (CMPL, "prompt", [True], "a list of bool"), (CMPL, "prompt", ["a", ""], "prompt[1] must not be empty"),
    (CMPL, "prompt", [10**6], "out of range"), (CMPL, "prompt", ["a"] * 257, "at most 256 prompts"),
    (CMPL, "model", "gpt-4", "not served here"), (CMPL, "model", "mlora@3", "valid ranks are"),
    (CMPL, "model", "mlora@\u00b2", "not served here"), (CMPL, "model", "m" * 257, "at most 256 characters"),
    (CMPL, "model", None, "valid string"), (CMPL, "echo", 1, "valid boolean"),
    (CMPL, "n", 17, "less than or equal to 16"), (CMPL, "n", 0, "greater than or equal to 1"),
    (CMPL, "n", True, "valid integer"), (CMPL, "max_tokens", 0, "only meaningful with echo"),
    (CMPL, "max_tokens", LIMIT + 1, f"limit of {LIMIT}"), (CMPL, "suffix", "x", "suffix"),
    (CMPL, "best_of", 2, "best_of 2 is not supported"), (CMPL, "logprobs", 21, "less than or equal to 20"),
    (CMPL, "logprobs", True, "valid integer"), (CMPL, "response_format", {"type": "xml"}, "'json_schema'"),
    (CMPL, "response_format", {"type": "json_schema"}, "json_schema is required"),
    (CMPL, "response_format", {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}, "response_format"),
    (CMPL, "stream_options", {"include_usage": 1}, "valid boolean"), (CMPL, "stream_options", {"x": 1}, "Extra"),
    (CMPL, "user", "u" * 257, "at most 256 characters"),
    (CHAT, "top_logprobs", 2, "top_logprobs needs logprobs"), (CHAT, "logprobs", 1, "valid boolean"),
    (CHAT, "n", 17, "less than or equal to 16"),
    (CHAT, "messages", [], "at least 1 item"), (CHAT, "messages", [{"role": "user"}], "Field required"),
    (CHAT, "messages", [{"role": "robot", "content": "hi"}], "'system', 'user'"),
    (CHAT, "messages", [{"role": "user", "content": "hi", "extra": 1}], "Extra inputs"),
    (CHAT, "messages", [{"role": "user", "content": 5}], "valid string"),
    (CHAT, "messages", [{"role": "assistant", "content": "hi"}], "must not be the assistant's"),
    (CHAT, "messages", [{"role": "user", "content": "hi"}] * 257, "at most 256 items"),
    (CHAT, "max_completion_tokens", 0, "greater than or equal to 1"),
]
CASES = [(ep, f, v, m) for ep in BASE for f, v, m in SAMPLING] + PER_ENDPOINT


def assert_error_shape(r: httpx.Response, status: set[int], message: str | None = None) -> dict:
    assert r.status_code in status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param"} and err["message"] and err["type"].endswith("_error"), err
    if message is not None:
        assert message in err["message"], err["message"]
    return err


@pytest.mark.parametrize("endpoint, field, value, message", CASES,
                         ids=[f"{ep}-{f}-{json.dumps(v)[:20]}" for ep, f, v, _ in CASES])
def test_every_field_past_its_bounds_gets_a_4xx_naming_it(http, endpoint, field, value, message):
    r = http.post(endpoint, json={**BASE[endpoint], field: value})
    err = assert_error_shape(r, {400, 404}, message)
    assert err["param"] is None or err["param"].split(".")[0] == field, err  # names the field the client sent


RAW = [  # bodies JSON tools would not write: (endpoint, raw bytes, content type, status)
    (GEN, b'{"prompt": "x", "temperature": NaN}', "application/json", 400),
    (GEN, b'{"prompt": "x", "timeout": Infinity}', "application/json", 400),
    (GEN, b'{"prompt": "\\ud800"}', "application/json", 400),  # a lone surrogate
    (CHAT, b'{"model": "mlora", "messages": [{"role": "user", "content": "\\udfff"}]}', "application/json", 400),
    (GEN, b'{"prompt": "x", "prompt": 5}', "application/json", 400),  # duplicate key: the last wins
    (GEN, b'{"prompt": "\xff\xfe"}', "application/json", 400),  # not UTF-8
    (GEN, b"[" * 2000 + b"]" * 2000, "application/json", 400),  # deep nesting
    (GEN, b'{"prompt": {"a": {"b": {"c": [[[[[]]]]]}}}}', "application/json", 400),
    (GEN, b"{not json", "application/json", 400), (GEN, b"", "application/json", 400),
    (GEN, b"null", "application/json", 400), (GEN, b'"x"', "application/json", 400),
    (GEN, b"[]", "application/json", 400), (GEN, b'{"prompt": "x"}', "text/plain", 400),
    (GEN, b"x" * (MAX_BODY + 1), "application/json", 413),
    (CMPL, b'{"model": "mlora", "prompt": "x"' + b" " * MAX_BODY + b"}", "application/json", 413),
]


@pytest.mark.parametrize("endpoint, raw, ctype, status", RAW, ids=[f"{ep}-{r[:24]!r}" for ep, r, _, _ in RAW])
def test_malformed_bodies_get_a_4xx_in_the_one_error_shape(http, endpoint, raw, ctype, status):
    assert_error_shape(http.post(endpoint, content=raw, headers={"content-type": ctype}), {status})


def test_wrong_methods_routes_and_headers_get_4xx(http, server):
    assert_error_shape(http.get(GEN), {405})
    assert_error_shape(http.get("/nope"), {404})
    assert_error_shape(http.post("/ranks"), {405})
    for length, status in [("99999999999", "413"), ("12abc", "400"), ("-1", "400")]:  # lies httpx cannot tell
        assert raw_status(server.port, f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       f"Content-Length: {length}\r\n\r\n{{}}") == status, length


def raw_status(port: int, request: str) -> str:
    """The status code of the answer to a hand-written HTTP request."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.encode())
        return s.recv(64).decode().split(" ")[1]


def test_a_seed_that_once_killed_the_engine_is_refused_on_every_endpoint_and_the_server_goes_on(http):
    """The original report: a 30-digit seed reached manual_seed, the engine died for good and
    /health stayed 200. Now: 400 at the boundary, and the engine never notices."""
    for endpoint in BASE:
        err = assert_error_shape(http.post(endpoint, json={**BASE[endpoint], "seed": 10**30, "temperature": 1}),
                                 {400}, "seed")
        assert err["param"] == "seed"
    edge = http.post(GEN, json={**BASE[GEN], "seed": 2**63 - 1, "temperature": 1.0, "top_k": 2**31 - 1})
    assert edge.status_code == 200, edge.text  # the bounds themselves are served
    tiny_t = http.post(GEN, json={**BASE[GEN], "temperature": 1e-300, "seed": 1})
    assert tiny_t.status_code == 200 and tiny_t.json()["finish_reason"] in ("length", "stop")  # greedy, not NaN


def test_after_all_of_it_the_server_is_healthy_and_serves(http):
    """Runs last in this module: nothing above hurt the engine."""
    assert http.get("/health").json() == {"status": "ok"} and http.get("/ready").json() == {"ready": True}
    r = http.post(GEN, json={"prompt": "Ada has", "max_new_tokens": LIMIT, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == LIMIT
    assert metric(http, REQUESTS_TOTAL, status="error") == 0
    assert metric(http, ENGINE_HEALTHY) == 1
