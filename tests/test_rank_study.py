"""The rank-accuracy study script end to end on a tiny model: its `smoke` budget (held-out
selection) and the paper's protocol (every rate and seed, lm-evaluation-harness's gsm8k 8-shot,
selection by mean AURAC over seeds). Each trainer command runs in the script's process
(``--in-process``: no interpreter start-up per step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import OFFLINE
from trainer.data import demo_records

ROOT = Path(__file__).resolve().parents[1]


def gsm8k_like(tmp_path, n_train: int = 16) -> Path:
    data = tmp_path / "gsm8k"
    data.mkdir()
    for name, n in (("train.jsonl", n_train), ("test.jsonl", 4)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in demo_records(n, seed=len(name))))
    return data


def test_the_study_runs_end_to_end_and_resumes(tiny_model_dir, tmp_path):
    data = gsm8k_like(tmp_path)
    cmd = [sys.executable, "benchmarks/rank_study.py", "--budget", "smoke", "--model", str(tiny_model_dir),
           "--data", str(data), "--run-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
           "--in-process"]
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


def test_the_papers_protocol_runs_end_to_end(harness_python, tiny_model_dir, tmp_path):
    """--budget paper with a smaller grid: every (method, rate, seed) trained with the authors'
    options and scored by the harness's gsm8k; each rate the best mean strict AURAC over seeds."""
    data = gsm8k_like(tmp_path, n_train=32)  # one global batch of the paper's 32
    cmd = [harness_python, "benchmarks/rank_study.py", "--budget", "paper", "--model", str(tiny_model_dir),
           "--data", str(data), "--run-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
           "--in-process", "--methods", "lora,matryoshka", "--lrs", "1e-3,3e-3", "--seeds", "42,666",
           "--rank", "4", "--epochs", "1", "--train-limit", "32", "--test-limit", "1", "--max-new-tokens", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf-home")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["select_metric"] == "strict" and set(summary["methods"]) == {"lora", "matryoshka", "svd"}
    for method, lr in summary["chosen_lr"].items():  # the pick is the best mean over the seeds
        scores = summary["sweep_aurac"][method]
        assert lr == max(scores, key=scores.get) and len(scores) == 2
    mat = summary["methods"]["matryoshka"]
    assert len(mat["checkpoints"]) == 2 and list(mat["per_rank"]) == ["0", "1", "2", "4"]
    assert set(mat["per_rank"]["4"]) == {"strict", "flexible"}  # the harness's two extractions
    meta = json.loads((tmp_path / "runs" / "ckpt" / "matryoshka-lr0.001-s42" / "matryoshka.json").read_text())
    t = meta["training"]
    assert (t["adapter"]["a_init"], t["batch_size"] * t["grad_accum"], t["warmup_steps"]) == ("reference", 32, 0)
    assert meta["eval_harness"]["gsm8k"]["shots"] == 8
    assert (tmp_path / "results" / "rank_curve.png").read_bytes()[:4] == b"\x89PNG"
