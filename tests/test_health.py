"""Health that tells the truth: a stopped engine turns /health to 503 and /ready to false at
once, and new requests are refused with the engine's error (the app in-process, its model
broken the way a lost device leaves it: weights gone)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import build_app, load_state
from server.settings import ServerSettings
from server.metrics import ENGINE_HEALTHY


@pytest.fixture
def broken(tiny_model_dir, tiny_checkpoint):
    settings = ServerSettings(model=str(tiny_model_dir), adapter=str(tiny_checkpoint), calibrate_steps=0)
    state = load_state(settings)
    with TestClient(build_app(settings, state)) as client:
        yield client, state


def gauge(client, name: str) -> float:
    line = next(l for l in client.get("/metrics").text.splitlines() if l.startswith(name + " "))
    return float(line.split()[1])


def test_a_stopped_engine_turns_health_503_ready_false_and_refuses_requests(broken):
    client, state = broken
    assert client.get("/health").json() == {"status": "ok"} and gauge(client, ENGINE_HEALTHY) == 1
    ok = client.post("/generate", json={"prompt": "Ada", "max_new_tokens": 2})
    assert ok.status_code == 200  # the engine serves …
    state.engine.runner.model.to("meta")  # … until the model becomes unusable
    r = client.post("/generate", json={"prompt": "Ada", "max_new_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_error", r.text
    assert "must be restarted" in r.json()["error"]["message"]
    health = client.get("/health")
    assert health.status_code == 503 and "probe" in health.json()["error"]["message"]
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False and "stopped" in ready.json()["reason"]
    assert gauge(client, ENGINE_HEALTHY) == 0
    again = client.post("/v1/completions", json={"model": "mlora", "prompt": "x", "max_tokens": 2})
    assert again.status_code == 503 and again.json()["error"]["type"] == "engine_error"
