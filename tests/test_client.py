"""The typed client and its CLI against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import httpx
import pytest

from client import AsyncClient, Client, InvalidRequest, Overloaded, ServerError, Unauthorized
from conftest import ServerProcess

KEY = "k3y"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_checkpoint):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--api-key", KEY,
                        "--max-batch-size", "1", "--max-queue", "1").wait_ready()
    yield srv
    srv.stop()


def test_generate_stream_chat_ranks(server):
    with Client(server.url, api_key=KEY) as c:
        assert c.health() and c.ready()
        res = c.generate("Ada has", rank=2, max_new_tokens=6)
        assert res.rank == 2 and res.usage.completion_tokens <= 6
        chunks = list(c.stream("Ada has", rank=2, max_new_tokens=6))
        assert chunks[-1].done and chunks[-1].rank == 2
        assert "".join(ch.text for ch in chunks) == res.text  # greedy: the same text either way
        assert isinstance(c.chat([{"role": "user", "content": "hi"}], rank=1, max_tokens=4), str)
        info = c.ranks()
        assert info.ranks == [0, 1, 2, 4, 8] and info.scaling == "sqrt"


def test_async_client_matches_the_sync_one(server):
    async def go():
        async with AsyncClient(server.url, api_key=KEY) as c:
            res = await c.generate("Ben", rank=4, max_new_tokens=5)
            streamed = [ch async for ch in c.stream("Ben", rank=4, max_new_tokens=5)]
            return res, streamed, await c.ranks()

    res, streamed, info = asyncio.run(go())
    with Client(server.url, api_key=KEY) as c:
        assert c.generate("Ben", rank=4, max_new_tokens=5).text == res.text
    assert "".join(ch.text for ch in streamed) == res.text and info.r == 8


def test_errors_map_to_typed_exceptions(server):
    with Client(server.url, api_key=KEY) as c:
        with pytest.raises(InvalidRequest) as e:
            c.generate("x", rank=3)
        assert e.value.status == 400 and e.value.param == "rank" and "[0, 1, 2, 4, 8]" in e.value.message
        with pytest.raises(ServerError) as e:
            c.generate("Ada", max_new_tokens=400, timeout=0.05, ignore_eos=True)
        assert e.value.status == 504
    with Client(server.url, api_key="nope") as c, pytest.raises(Unauthorized):
        c.generate("x")
    with pytest.raises(ValueError, match="top_p"):  # refused before any network
        Client(server.url).generate("x", top_p=0)


def test_overloaded_carries_retry_after_and_retries_honour_it(server):
    def occupy():  # one request runs, one waits: the queue (max 1) is full
        with Client(server.url, api_key=KEY) as c:
            c.generate("Ada", max_new_tokens=300, ignore_eos=True)

    blockers = [threading.Thread(target=occupy) for _ in range(2)]
    with httpx.Client(base_url=server.url) as http:
        blockers[0].start()
        _wait(http, "mlora_running_requests 1.0")
        blockers[1].start()
        _wait(http, "mlora_queue_depth 1.0")
    with Client(server.url, api_key=KEY) as c, pytest.raises(Overloaded) as e:
        c.generate("x", max_new_tokens=2)
    assert e.value.retry_after >= 1
    with Client(server.url, api_key=KEY, retries=30, backoff=0.1) as c:  # waits until a slot frees
        assert c.generate("x", max_new_tokens=2).usage.completion_tokens <= 2
    for t in blockers:
        t.join()


def _wait(http: httpx.Client, line: str, timeout: float = 20) -> None:
    import time

    end = time.monotonic() + timeout
    while line not in http.get("/metrics").text:
        assert time.monotonic() < end, f"never saw {line!r}"
        time.sleep(0.05)


def test_cli_generate_and_errors(server):
    base = [sys.executable, "-m", "client", "--url", server.url, "--api-key", KEY]
    ok = subprocess.run(base + ["generate", "Ada has", "--rank", "4", "--max-new-tokens", "5", "--json"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and '"rank": 4' in ok.stdout
    streamed = subprocess.run(base + ["generate", "Ada has", "--rank", "auto", "--stream", "--max-new-tokens", "3"],
                              capture_output=True, text=True, timeout=60)
    assert streamed.returncode == 0 and "[rank 8," in streamed.stderr
    bad = subprocess.run(base + ["generate", "x", "--rank", "3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "valid ranks are [0, 1, 2, 4, 8]" in bad.stderr
    ranks = subprocess.run(base + ["ranks"], capture_output=True, text=True, timeout=60)
    assert ranks.returncode == 0 and '"scaling": "sqrt"' in ranks.stdout


def test_cli_bench_writes_report_and_plot(server, tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "client", "--url", server.url, "--api-key", KEY, "bench",
                           "--schedule", "4:2,1:1", "--max-new-tokens", "4", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    doc = json.loads((out / "report.json").read_text())
    assert [p["rate"] for p in doc["schedule"]] == [4.0, 1.0]
    assert doc["requests"] and all(r["status"] in ("ok", "overloaded") for r in doc["requests"])
    assert any(r["status"] == "ok" and r["completion_tokens"] == 4 for r in doc["requests"])
    assert len(doc["seconds"]) >= 3 and doc["seconds"][0]["auto_rank"] == 8
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "phase" in proc.stdout and "p95" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "client", "bench", "--schedule", "fast", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "RATE:SECONDS" in bad.stderr


def test_schedule_arrivals_are_seeded_poisson():
    from client.loadgen import arrivals, parse_schedule

    phases = parse_schedule("10:20,0:5,2:10")
    a, b = arrivals(phases, 1), arrivals(phases, 1)
    assert a == b and a != arrivals(phases, 2)
    counts = [sum(1 for _, p in a if p == i) for i in range(3)]
    assert 150 < counts[0] < 250 and counts[1] == 0 and 8 < counts[2] < 35
    assert all(20 <= t < 25 for t, p in a if p == 1) or counts[1] == 0
