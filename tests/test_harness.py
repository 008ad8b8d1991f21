"""``trainer eval --harness``: lm-evaluation-harness's own tasks, in-process, at every rank.

The harness runs in ``.venv-harness`` (this project with its ``harness`` extra; the conftest
fixture ``harness_python`` makes it if missing, or ``MLORA_HARNESS_PYTHON`` names one; without
PyPI the tests are skipped), so that its many dependencies never meet the test environment's. What it computes at rank k is checked
against what this process computes for the same checkpoint at rank k."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import GSM8K, MC_TASK, OFFLINE, arithmetic_questions, encode_pair, load_tiny, scored, write_jsonl
from trainer.checkpoint import load_adapter, read_meta
from trainer.evaluate import loglikelihood

def harness(python: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dtype = [] if "--dtype" in args else ["--dtype", "float32"]  # the in-process references are fp32
    proc = subprocess.run([python, "-m", "trainer", "eval", *dtype, *args], cwd=tmp, capture_output=True, text=True,
                          timeout=900, env={**env, **OFFLINE, "HF_HOME": str(tmp / "hf-home")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_harness_scores_each_rank_with_the_loglikelihoods_of_that_rank(harness_python, tiny_model_dir,
                                                                           tiny_checkpoint, tmp_path):
    """A multiple-choice task: every loglikelihood the harness logged at rank k is the one this
    process computes at rank k (to 1e-4), its accuracy is the one they imply, and the ranks differ."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = arithmetic_questions()
    (tasks / "arith_mc.yaml").write_text(MC_TASK.format(data=write_jsonl(tmp_path / "arith.jsonl", rows)))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)  # eval_harness is written into it
    harness(harness_python, tmp_path, str(ckpt), "--harness", "arith_mc", "--include-path", str(tasks),
            "--ranks", "2,8", "--model", str(tiny_model_dir), "--batch-size", "4", "--log-samples",
            "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "harness.json").read_text())
    (entry,) = report["checkpoints"]
    assert list(entry["per_rank"]) == ["0", "2", "8"] and entry["task"] == "arith_mc"
    assert read_meta(ckpt)["eval_harness"]["arith_mc"]["per_rank"] == entry["per_rank"]
    model, tok = load_tiny(tiny_model_dir)
    adapter, _ = load_adapter(ckpt, model)
    per_rank_ll = {}
    for k in ("0", "2", "8"):
        samples = [json.loads(line) for line in
                   (tmp_path / "out" / f"samples_ckpt_arith_mc_rank{k}.jsonl").read_text().splitlines()]
        assert len(samples) == len(rows)
        adapter.set_rank(int(k))
        correct, lls = 0, []
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            got = scored(sample)
            with torch.no_grad():
                ours = [loglikelihood(model, *encode_pair(tok, ctx, cont))[0] for ctx, cont, _, _ in got]
            for (_, _, ll, _), expected in zip(got, ours):
                assert ll == pytest.approx(expected, abs=1e-4)
            lls += ours
            correct += max(range(len(ours)), key=ours.__getitem__) == sample["doc"]["label"]
        assert entry["per_rank"][k]["acc,none"] == pytest.approx(correct / len(rows))
        per_rank_ll[k] = lls
    for k in ("2", "8"):  # the adapter's rank took effect: each rank scores differently from rank 0
        assert max(abs(a - b) for a, b in zip(per_rank_ll[k], per_rank_ll["0"])) > 1e-3


@pytest.mark.skipif(not (GSM8K / "test.jsonl").exists(), reason="needs ../shared/data/gsm8k")
def test_the_harness_gsm8k_task_runs_on_local_files(harness_python, tiny_model_dir, tiny_checkpoint, tmp_path):
    """The harness's own gsm8k task (prompts, 8-shot exemplars from train, regexes), its data read
    from local JSONL instead of the hub: what a GPU machine without a dataset hub runs."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    out = harness(harness_python, tmp_path, str(ckpt), "--harness", "gsm8k", "--harness-data", str(GSM8K),
                  "--shots", "8", "--limit", "1", "--ranks", "8", "--max-new-tokens", "16", "--model", str(tiny_model_dir),
                  "--log-samples", "--out", str(tmp_path / "out"))
    assert "include:" in (tmp_path / "out" / "tasks" / "gsm8k_local.yaml").read_text()
    (entry,) = json.loads((tmp_path / "out" / "harness.json").read_text())["checkpoints"]
    assert set(entry["per_rank"]) == {"0", "8"}, out.stdout
    for row in entry["per_rank"].values():  # the harness's two answer extractions, as its gsm8k reports them
        assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(row)
    assert entry["data"] == str(GSM8K) and read_meta(ckpt)["eval_harness"]["gsm8k"]["per_rank"] == entry["per_rank"]
    sample = json.loads((tmp_path / "out" / "samples_ckpt_gsm8k_rank8.jsonl").read_text().splitlines()[0])
    prompt = sample["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("Question:") == 9 and prompt.endswith("Answer:")  # 8 exemplars, then the question
