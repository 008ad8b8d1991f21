"""A real uvicorn server on 127.0.0.1 with a tiny model and a trainer-made checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest

from conftest import Busy, ServerProcess, metric, wait_http_ok, wait_metric, wait_until
from server.metrics import (
    BATCH_SIZE,
    FORWARD_SECONDS,
    CONTROLLER_DECISIONS_TOTAL,
    CURRENT_AUTO_RANK,
    GENERATED_TOKENS_TOTAL,
    INTER_TOKEN_LATENCY_SECONDS,
    MERGED_RANK,
    MERGE_SWITCHES_TOTAL,
    MODEL,
    PROMPT_TOKENS_TOTAL,
    QUEUE_DEPTH,
    QUEUE_WAIT_SECONDS,
    RANK_SWITCHES_TOTAL,
    REQUESTS_TOTAL,
    RUNNING_REQUESTS,
    TIME_TO_FIRST_TOKEN_SECONDS,
)

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_checkpoint):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--api-key", KEY,
                        "--max-new-tokens-limit", "400", "--max-body-bytes", "4096").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def sse(lines) -> list[dict | str]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_ready_and_ranks(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"ready": True}
    info = http.get("/ranks").json()
    assert info["ranks"] == [0, 1, 2, 4, 8] and info["scaling"] == "sqrt" and info["method"] == "matryoshka"
    assert info["inference"]["rule"] == "trained"  # Matryoshka's default: rank k serves p[:k]
    assert info["inference"]["coeffs"]["8"][0] == pytest.approx(1 + 2 ** -0.5 + 0.5 + 8 ** -0.5)
    compute = info["compute"]  # how it computes: the tiny Llama decodes lean, pieces mixed in
    assert compute["device"] == "cpu" and compute["decode"] == "lean" and compute["mixed_prefill"] is True
    assert compute["compiled_rank0_decode"] is False  # --compile off (the default)
    assert compute["gemm"] in ("standard", "weight-major", "packed") and compute["threads"] >= 1


def test_generate_reports_rank_usage_and_timings(http):
    r = http.post("/generate", json={"prompt": "Ada has 12 apples", "rank": 4, "max_new_tokens": 6})
    assert r.status_code == 200 and r.headers["x-rank"] == "4"
    body = r.json()
    assert body["rank"] == 4 and body["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 0
    t = body["timings"]
    assert 0 <= t["queue_s"] <= t["ttft_s"] <= t["total_s"]
    auto = http.post("/generate", json={"prompt": "Ada", "rank": "auto", "max_new_tokens": 2}).json()
    assert auto["rank"] == 8  # an idle controller holds the largest rank


def test_same_greedy_request_streamed_and_not_gives_the_same_text(http):
    req = {"prompt": "Chen shares 40 coins", "rank": 2, "max_new_tokens": 12}
    plain = http.post("/generate", json=req).json()
    with http.stream("POST", "/generate", json={**req, "stream": True}) as r:
        assert r.headers["x-rank"] == "2" and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    final = events[-1]
    assert final["done"] and final["rank"] == 2 and final["finish_reason"] == plain["finish_reason"]
    assert "".join(e["text"] for e in events) == plain["text"]
    assert final["usage"] == plain["usage"]


def test_openai_sdk_completions_chat_streaming_and_models(server):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    ids = [m.id for m in client.models.list().data]
    assert {"mlora", "mlora@0", "mlora@1", "mlora@8", "mlora@auto"} <= set(ids)
    c = client.completions.create(model="mlora@2", prompt="Ben has", max_tokens=5)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens <= 5
    raw = client.completions.with_raw_response.create(model="mlora", prompt="Ben has", max_tokens=3,
                                                      extra_body={"rank": 1})
    assert raw.headers["x-rank"] == "1"
    chat = client.chat.completions.create(model="mlora@4", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6)
    assert chat.choices[0].message.role == "assistant"
    parts = client.chat.completions.create(model="mlora@4", max_tokens=6, messages=[  # guidellm sends parts
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert parts.choices[0].message.content == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match=r"content\[1\] is a 'image_url' part"):
        client.chat.completions.create(model="mlora@4", max_tokens=6, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]}])
    stream = client.chat.completions.create(model="mlora@4", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    cstream = list(client.completions.create(model="mlora@2", prompt="Ben has", max_tokens=5, stream=True))
    assert "".join(ch.choices[0].text for ch in cstream) == c.choices[0].text


def test_openai_sdk_maps_errors(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"valid ranks are \[0, 1, 2, 4, 8\]"):
        client.completions.create(model="mlora@3", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="mlora", prompt="x", max_tokens=2)


@pytest.mark.parametrize("body, status, param, message", [
    ({"prompt": "x", "rank": 3}, 400, "rank", r"valid ranks are \[0, 1, 2, 4, 8\]"),
    ({"prompt": "x", "max_new_tokens": 401}, 400, "max_new_tokens", "limit of 400"),
    ({"prompt": "x " * 300, "max_new_tokens": 400}, 400, "max_new_tokens", "exceeds the model's context of 512"),
    ({"prompt": "x", "temprature": 0.5}, 400, "temprature", "Extra inputs are not permitted"),
    ({"prompt": ""}, 400, "prompt", "at least 1 character"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "x" * 5000}, 413, None, "exceeds 4096 bytes"),
])
def test_bad_input_gets_one_error_shape(http, body, status, param, message):
    r = http.post("/generate", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param"} and err["param"] == param
    assert __import__("re").search(message, err["message"]), err["message"]


def test_malformed_json_and_wrong_key_and_unknown_route(server, http):
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/generate", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/metrics").status_code == 200  # scraping needs no key
    assert http.get("/nope").status_code == 404


def test_deadline_gives_504_and_frees_the_slot(http):
    """A deadline no machine can meet: it passes before the engine thread can even look at the
    request (a nanosecond; waking a thread takes microseconds). Running rows that hit their
    deadline: tests/test_isolation.py, where the engine's timing is fixed by construction."""
    before = metric(http, REQUESTS_TOTAL, status="timeout")
    r = http.post("/generate", json={"prompt": "Ada", "max_new_tokens": 400, "timeout": 1e-9,
                                       "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert wait_metric(http, REQUESTS_TOTAL, before + 1, status="timeout") == before + 1
    assert wait_metric(http, RUNNING_REQUESTS, 0) == 0


def test_client_disconnect_aborts_the_request(http, server):
    before = metric(http, REQUESTS_TOTAL, status="abort")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        with c.stream("POST", "/generate", json={"prompt": "Ada", "max_new_tokens": 400, "stream": True,
                                                      "ignore_eos": True}) as r:
            next(r.iter_lines())  # one event, then hang up
    assert wait_metric(http, REQUESTS_TOTAL, before + 1, status="abort") == before + 1
    assert wait_metric(http, RUNNING_REQUESTS, 0) == 0


def test_metrics_count_requests_and_tokens_by_rank(http):
    before = metric(http, GENERATED_TOKENS_TOTAL, rank="1")
    body = http.post("/generate", json={"prompt": "Ben", "rank": 1, "max_new_tokens": 4}).json()
    expected = before + body["usage"]["completion_tokens"] + (body["finish_reason"] == "stop")  # + the EOS
    assert wait_metric(http, GENERATED_TOKENS_TOTAL, expected, rank="1") == expected
    text = http.get("/metrics").text
    for name in [QUEUE_DEPTH, TIME_TO_FIRST_TOKEN_SECONDS + "_bucket", BATCH_SIZE + "_bucket",
                 INTER_TOKEN_LATENCY_SECONDS + "_bucket", "mlora_e2e_request_latency_seconds_bucket",
                 QUEUE_WAIT_SECONDS + "_bucket", PROMPT_TOKENS_TOTAL, MODEL + "_info"]:
        assert name in text
    assert "# HELP mlora_queue_depth" in text
    assert metric(http, FORWARD_SECONDS + "_count", phase="prefill") >= 1  # the prompt's forward, timed
    assert metric(http, FORWARD_SECONDS + "_count", phase="decode") >= 1
    assert metric(http, FORWARD_SECONDS + "_sum", phase="decode") > 0


@pytest.mark.slow
def test_embedded_smollm2_served_at_rank_0_answers_like_the_base_model(tmp_path):
    """The real model: rank 0 through the server is token-identical to plain greedy ``generate``."""
    import torch

    from trainer.checkpoint import save_adapter
    from trainer.inject import AdapterConfig, NestedAdapter
    from trainer.models import load_model

    model, tok = load_model("smollm2-135m", "cpu", torch.float32)
    prompt = "Question: Ada has 12 apples and gets 7 more. How many apples does she have?\nAnswer: "
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    adapter = NestedAdapter.inject(model, AdapterConfig(r=8))
    save_adapter(tmp_path / "ckpt", adapter, "smollm2-135m")
    srv = ServerProcess("--model", "smollm2-135m", "--adapter", str(tmp_path / "ckpt")).wait_ready()
    try:
        r = httpx.post(srv.url + "/generate", json={"prompt": prompt, "rank": 0, "max_new_tokens": 16}, timeout=120)
        assert r.status_code == 200 and r.json()["text"] == expected and "19" in expected
    finally:
        assert srv.stop() == 0


def test_controller_lowers_the_rank_under_a_burst_and_raises_it_again(tiny_model_dir, tiny_checkpoint):
    """The control loop end to end. The tiny model's ranks all cost its Python overhead (a flat
    cost curve, on which the default --min-gain would rightly hold the top rank): --min-gain 0
    makes every rank a rung, so the loop itself is what is tested."""
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--max-batch-size", "2",
                        "--dwell-s", "0.5", "--down-queue", "2", "--smooth-s", "0.5", "--calibrate-steps", "2",
                        "--min-gain", "0").wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            info = http.get("/ranks").json()
            assert set(info["throughput"]) == {"0", "1", "2", "4", "8"} and info["controller"]["rank"] == 8
            tput = [info["throughput"][k] for k in ("0", "1", "2", "4", "8")]
            assert all(a >= b for a, b in zip(tput, tput[1:]))  # a higher rank is never cheaper

            def body(i):  # half the senders ask for auto, half for "at most 8" (elastic)
                return {"prompt": "Ada", "max_new_tokens": 60, "ignore_eos": True,
                        "rank": 8 if i % 2 else "auto", "rank_policy": "elastic" if i % 2 else "fixed"}

            with Busy(srv.url, 16, body) as burst:
                # downshifted under the burst, and requests admitted since then saw it
                assert wait_until(lambda: metric(http, CURRENT_AUTO_RANK) < 8, timeout=60), srv.output()[-4000:]
                assert wait_until(lambda: any(b["rank"] < 8 for _, b in burst.responses), timeout=60)
            assert {status for status, _ in burst.responses} == {200}
            assert {b["rank"] for _, b in burst.responses} <= {0, 1, 2, 4, 8}
            assert metric(http, RANK_SWITCHES_TOTAL, direction="down") >= 1
            t_idle = time.monotonic()
            assert wait_metric(http, CURRENT_AUTO_RANK, 8, timeout=30) == 8  # back up once idle
            recovered = time.monotonic() - t_idle
            assert recovered < 30
            assert metric(http, CONTROLLER_DECISIONS_TOTAL) > 0
            assert metric(http, RANK_SWITCHES_TOTAL, direction="up") >= 1
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the prometheus binary (Debian package)")
def test_replicas_downshift_together_through_a_real_prometheus(tiny_model_dir, tiny_checkpoint, tmp_path):
    """Replica A is idle; replica B is swamped. With --prometheus-url, A reads the cluster-wide
    queue depth (sum over replicas, via PromQL) and lowers its auto rank too."""
    from conftest import free_port

    busy = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--max-batch-size", "1",
                         "--calibrate-steps", "0")
    prom_port = free_port()
    idle = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--calibrate-steps", "0",
                         "--prometheus-url", f"http://127.0.0.1:{prom_port}", "--dwell-s", "0.5",
                         "--down-queue", "3", "--smooth-s", "0.5")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                   "scrape_configs:\n  - job_name: mlora\n    static_configs:\n"
                   f"      - targets: ['127.0.0.1:{busy.port}', '127.0.0.1:{idle.port}']\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load = Busy(busy.url, 12, lambda i: {"prompt": "Ada", "max_new_tokens": 100, "ignore_eos": True})
    try:
        busy.wait_ready()
        idle.wait_ready()
        wait_http_ok(f"http://127.0.0.1:{prom_port}/-/ready", timeout=60)
        # the busy replica stays swamped until the idle one has reacted (its queue never drains first)
        with load, httpx.Client(base_url=idle.url) as http:
            assert wait_until(lambda: metric(http, CURRENT_AUTO_RANK) < 8, timeout=90), idle.output()[-4000:]
            assert metric(http, QUEUE_DEPTH) == 0  # A itself was idle all along
    finally:
        prom.terminate()
        prom.wait(30)
        busy.stop()
        idle.stop()


@pytest.mark.parametrize("args, message", [
    (["--merge-rank", "3"], "--merge-rank 3 is not a rank of this adapter; valid ranks are [0, 1, 2, 4, 8]"),
    (["--merge-rank", "top"], "--merge-rank takes 'auto' or an integer rank, got 'top'"),
    (["--default-rank", "16"], "--default-rank 16 is not a rank of this adapter"),
    (["--max-batch-size", "0"], "--max-batch-size: Input should be greater than or equal to 1"),
    (["--fuse", "maybe"], "--fuse: Input should be 'auto', 'true' or 'false'"),
    (["--prefill-chunk-tokens", "-1"], "--prefill-chunk-tokens: Input should be greater than or equal to 0"),
])
def test_bad_settings_exit_2_before_any_model_loads(tiny_checkpoint, capsys, args, message):
    from server.cli import main

    assert main(["--model", "/nonexistent-model", "--adapter", str(tiny_checkpoint), *args]) == 2
    assert message in capsys.readouterr().err


def test_every_setting_has_one_flag_and_the_flags_parse(tiny_checkpoint):
    from server.cli import FLAGS, settings_from_args
    from server.settings import ServerSettings

    assert sorted(name for name, _ in FLAGS.values()) == sorted(ServerSettings.model_fields)
    s = settings_from_args(["--fuse", "false", "--prefill-chunk-tokens", "0"])
    assert s.fuse == "false" and s.prefill_chunk_tokens == 0


def test_merge_without_an_adapter_is_refused(capsys):
    from server.cli import main

    assert main(["--model", "/nonexistent-model", "--merge-rank", "auto"]) == 2
    assert "--merge-rank auto needs an --adapter" in capsys.readouterr().err


def test_auto_merge_follows_the_traffic_and_answers_like_the_unmerged_server(tiny_model_dir, tiny_checkpoint, http):
    """--merge-rank auto starts with the top rank merged, re-merges rank 2 once rank-2 traffic
    dominates, and every answer equals the unmerged server's (the `server` fixture)."""
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--merge-rank", "auto",
                        "--merge-dwell-s", "0.2", "--calibrate-steps", "2").wait_ready()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as merged:
            info = merged.get("/ranks").json()
            assert info["merge"] == {"mode": "auto", "rank": 8}
            # every rank runs merged at the base cost: one measurement stands for all of them
            assert set(info["throughput"]) == {"0", "1", "2", "4", "8"} and len(set(info["throughput"].values())) == 1
            assert metric(merged, MERGED_RANK) == 8
            body = {"prompt": "Ada has 3 apples", "max_new_tokens": 12}
            want = {k: http.post("/generate", json={**body, "rank": k}).json()["text"] for k in (0, 2, 8)}
            assert merged.post("/generate", json={**body, "rank": 8}).json()["text"] == want[8]
            rank2 = {"prompt": "Ada", "max_new_tokens": 150, "ignore_eos": True, "rank": 2}
            with Busy(srv.url, 3, lambda i: rank2) as load:  # rank 2 takes over the traffic
                assert wait_metric(merged, MERGED_RANK, 2, timeout=60) == 2
            assert {status for status, _ in load.responses} == {200}
            assert metric(merged, MERGE_SWITCHES_TOTAL) >= 1
            assert merged.get("/ranks").json()["merge"] == {"mode": "auto", "rank": 2}
            for k in (0, 2, 8):  # rank 2 merged now: every rank still answers exactly as unmerged
                assert merged.post("/generate", json={**body, "rank": k}).json()["text"] == want[k]
    finally:
        assert srv.stop() == 0


def test_the_start_up_curl_line_asks_the_checkpoints_own_example_and_pastes_into_a_shell():
    """The line `make run` prints: the stored example (rank 0 wrong, full rank right) at full
    rank, with what each rank answers; quoted so that a shell passes the body through unchanged."""
    import shlex
    from types import SimpleNamespace

    from server.app import try_line
    from server.settings import ServerSettings

    example = {"prompt": "The code of O'Neil is", "reference": " 5104", "max_new_tokens": 5,
               "answers": {"0": " a name", "1": " 2016", "2": " 5104"}}
    st = SimpleNamespace(meta={"eval": {"example": example}}, serving=SimpleNamespace(ranks=[1, 2]))
    line = try_line(ServerSettings(model="m", adapter="a"), st)
    argv = shlex.split(line.split("   (each rank answers")[0])
    assert json.loads(argv[argv.index("-d") + 1]) == {"prompt": "The code of O'Neil is", "rank": 2, "max_new_tokens": 5}
    assert "0: ' a name', 1: ' 2016', 2: ' 5104'" in line
    plain = try_line(ServerSettings(model="m", adapter="a"), SimpleNamespace(meta={}, serving=SimpleNamespace(ranks=[1, 2])))
    assert "Ada has 12 apples" in plain and '"rank": 2' in plain
