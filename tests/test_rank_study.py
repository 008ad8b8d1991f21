"""The rank-accuracy study script, end to end at its `smoke` budget on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from trainer.data import demo_records

ROOT = Path(__file__).resolve().parents[1]


def test_the_study_runs_end_to_end_and_resumes(tiny_model_dir, tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    for name, n in (("train.jsonl", 16), ("test.jsonl", 4)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in demo_records(n, seed=len(name))))
    cmd = [sys.executable, "benchmarks/rank_study.py", "--budget", "smoke", "--model", str(tiny_model_dir),
           "--data", str(data), "--run-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert set(summary["methods"]) == {"lora", "dylora", "matryoshka", "matryoshka-rank", "svd"}
    assert summary["select_metric"] == "nll"
    for method, lr in summary["chosen_lr"].items():  # the pick is the sweep's best held-out AURAC
        scores = summary["sweep_aurac"][method]
        assert lr == min(scores, key=scores.get)
    mat = summary["methods"]["matryoshka"]
    assert len(mat["checkpoints"]) == 2 and list(mat["per_rank"]) == ["0", "1", "2", "4", "8"]
    assert len(mat["per_rank"]["8"]["nll"]["values"]) == 2  # one value per seed, and their mean
    assert mat["per_rank"]["8"]["nll"]["mean"] == sum(mat["per_rank"]["8"]["nll"]["values"]) / 2
    assert "| MatryoshkaLoRA (sqrt) | 2 |" in (tmp_path / "results" / "tables.md").read_text()
    assert (tmp_path / "results" / "rank_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results" / "eval" / "test-svd" / "results.json").is_file()
    # a rerun finds every step done: no training, no evaluation
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "trainer train" not in again.stdout and "trainer eval" not in again.stdout
