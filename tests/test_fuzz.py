"""schemathesis over /openapi.json against a real server on 127.0.0.1: every generated request,
valid or hostile, gets an answer that is not a 5xx (but the documented deadline 504), and the
server serves afterwards. A budget run here (>= 300 cases, < 2 min); the full run (>= 2000) is
benchmarks/fuzz_api.py, its output benchmarks/fuzz_api.txt.

schemathesis lives in a venv of its own (its dependencies never meet the project's): .ci/run
makes ``.venv-fuzz``; if it is missing this test makes it; without PyPI the test is skipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from conftest import REPO, ServerProcess

SCHEMATHESIS = "schemathesis==4.32.5"
VENV = REPO / ".venv-fuzz"
CONFIG = '[checks.not_a_server_error]\nexpected-statuses = ["2xx", "3xx", "4xx", "504"]\n'  # 504: deadline


@pytest.fixture(scope="module")
def schemathesis() -> str:
    exe = os.environ.get("MLORA_SCHEMATHESIS") or str(VENV / "bin" / "schemathesis")
    if not Path(exe).exists():
        made = subprocess.run(f"{sys.executable} -m venv {VENV} && {VENV}/bin/pip install -q '{SCHEMATHESIS}'",
                              shell=True, capture_output=True, text=True, timeout=600)
        if made.returncode != 0 or not Path(exe).exists():
            pytest.skip(f"cannot install {SCHEMATHESIS} into {VENV} (is PyPI reachable?): {made.stderr[-500:]}")
    return exe


def test_schemathesis_finds_no_server_error_and_the_server_serves_after(schemathesis, tiny_model_dir,
                                                                        tiny_checkpoint, tmp_path):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--calibrate-steps", "0",
                        "--max-new-tokens-limit", "4", "--max-body-bytes", "16384").wait_ready()
    try:
        (tmp_path / "schemathesis.toml").write_text(CONFIG)
        t0 = time.monotonic()
        run = subprocess.run([schemathesis, "--config-file", str(tmp_path / "schemathesis.toml"), "run",
                              srv.url + "/openapi.json", "--checks", "not_a_server_error", "-n", "30", "--seed", "1",
                              "--request-timeout", "120", "--report", "ndjson", "--report-dir", str(tmp_path / "report")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        took = time.monotonic() - t0
        out = run.stdout + run.stderr
        cases = re.search(r"(\d+) generated, (\d+) passed", out)
        assert run.returncode == 0 and cases, out[-3000:]
        assert int(cases[1]) >= 300 and cases[1] == cases[2], cases[0]
        assert took < 120, f"{cases[0]} took {took:.0f} s"
        statuses = Counter(int(s) for s in re.findall(r'"status_code":\s*(\d+)', next(
            (tmp_path / "report").glob("*.ndjson")).read_text()))
        assert statuses[200] > 0 and all(s < 500 or s == 504 for s in statuses), statuses
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/health").json() == {"status": "ok"} and http.get("/ready").status_code == 200
            r = http.post("/generate", json={"prompt": "Ada", "max_new_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert "Traceback" not in srv.output(), srv.output()
    finally:
        assert srv.stop() == 0
