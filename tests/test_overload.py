"""Overload and shutdown under load, short versions (the full 200-connection, 60 s run is
benchmarks/overload.py, its output benchmarks/overload.txt): every answer is a full 200 or a
429 with Retry-After; never a 5xx; memory does not grow with the load; SIGTERM drains what was
accepted and exits 0."""

from __future__ import annotations

import signal
from collections import Counter

import httpx

from conftest import Busy, ServerProcess, metric, wait_until
from server.metrics import QUEUE_DEPTH, REQUESTS_TOTAL, RUNNING_REQUESTS

TOKENS = 16


def body(i: int) -> dict:
    return {"prompt": "Ada has", "max_new_tokens": TOKENS, "ignore_eos": True}


def assert_full(responses) -> None:
    """Every 200 carries its whole output."""
    for status, b in responses:
        if status == 200:
            assert b["usage"]["completion_tokens"] == TOKENS and b["finish_reason"] == "length", b


def rss_mib(pid: int) -> float:
    line = next(x for x in open(f"/proc/{pid}/status").read().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_overload_gives_full_200s_or_429s_with_retry_after_and_nothing_else(tiny_model_dir, tiny_checkpoint):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--calibrate-steps", "0",
                        "--max-batch-size", "2", "--max-queue", "2").wait_ready()
    try:
        with Busy(srv.url, 12, body) as load:  # 12 senders for 4 places: some are always refused
            counts = lambda: Counter(s for s, _ in load.responses)  # noqa: E731
            assert wait_until(lambda: counts()[200] >= 4, timeout=90), counts()
            warm = rss_mib(srv.proc.pid)  # after warm-up: every code path has run and allocated once
            assert wait_until(lambda: counts()[200] >= 24 and counts()[429] >= 20, timeout=90), counts()
        assert rss_mib(srv.proc.pid) <= 1.10 * warm, (warm, rss_mib(srv.proc.pid))  # nothing accumulates
        assert set(counts()) <= {200, 429}, [r for r in load.responses if r[0] not in (200, 429)][:3]
        assert_full(load.responses)
        assert all(int(v) >= 1 for v in load.retry_after) and len(load.retry_after) == counts()[429]
        refused = next(b for s, b in load.responses if s == 429)
        assert refused["error"]["type"] == "overloaded_error" and "--max-queue 2" in refused["error"]["message"]
        with httpx.Client(base_url=srv.url) as http:
            assert http.get("/health").status_code == 200
            assert wait_until(lambda: metric(http, RUNNING_REQUESTS) == 0, timeout=30)
            assert metric(http, REQUESTS_TOTAL, status="error") == 0
    finally:
        assert srv.stop() == 0


def test_sigterm_under_load_turns_ready_false_completes_what_was_accepted_and_exits_0(tiny_model_dir,
                                                                                      tiny_checkpoint):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--calibrate-steps", "0",
                        "--max-batch-size", "2", "--max-queue", "8", "--grace-period-s", "120").wait_ready()
    with Busy(srv.url, 10, body) as load, httpx.Client(base_url=srv.url) as http:
        assert wait_until(lambda: metric(http, QUEUE_DEPTH) >= 4, timeout=60)  # a queue to drain
        srv.proc.send_signal(signal.SIGTERM)
        assert http.get("/ready").status_code == 503  # at once, while the queue still drains
        assert srv.proc.wait(120) == 0
    statuses = Counter(s for s, _ in load.responses)
    assert statuses[200] >= 4 and set(statuses) <= {200, 429, 503, 0}, statuses  # 0: refused connection
    assert_full(load.responses)
    srv.stop()
