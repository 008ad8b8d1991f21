"""The training recipe end to end: resume exactness, accumulation/DDP equivalence, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import GSM8K, load_tiny
from trainer.checkpoint import ADAPTER_WEIGHTS, CheckpointError, load_adapter, read_meta
from trainer.train_state import read_training_state
from trainer.inject import AdapterConfig, NestedAdapter
from trainer.train import TrainConfig, train


def run(tmp_path, tiny_model_dir, name, method="matryoshka", **kw) -> TrainConfig:
    opts = dict(model=str(tiny_model_dir), lr=5e-3, batch_size=4, max_length=64, limit=64,
                max_steps=6, progress=False, out=str(tmp_path / name), dtype="float32")  # exact comparisons: fp32
    opts.update(kw)
    cfg = TrainConfig(adapter=AdapterConfig(method=method, r=8), **opts)
    train(cfg)
    return cfg


def test_max_steps_overrides_epochs_and_the_plan_is_printed(tmp_path, tiny_model_dir, capsys):
    """--max-steps 12 on 16 examples at batch 4 (4 steps per epoch) runs 12 steps (3 epochs),
    not the 4 of the default --epochs 1; the plan says so before the first step."""
    run(tmp_path, tiny_model_dir, "long", limit=16, max_steps=12)
    assert len(losses(tmp_path / "long")) == 12 and read_meta(tmp_path / "long")["step"] == 12
    assert "plan: 12 optimizer steps = 3 epochs of 4 steps" in capsys.readouterr().out


def test_eval_data_stores_and_prints_every_ranks_table_at_the_end_of_training(tmp_path, tiny_model_dir, capsys):
    """--data facts:N trains on the generated probe; --eval-data train scores rank 0 and every rank
    of R on it, prints the table and stores it where the server's /ranks reads it; the stored
    figures are the ones an in-process score of the written checkpoint gives."""
    from trainer.data import load_examples
    from trainer.evaluate import answer_scores

    cfg = run(tmp_path, tiny_model_dir, "facts", data="facts:12:3", eval_data="train", max_steps=4)
    table = read_meta(cfg.out)["eval"]
    assert list(table["per_rank"]) == ["0", "1", "2", "4", "8"] and table["n"] == 12
    assert table["data"] == "the training data (facts:12:3)" and table["inference_rule"] == "trained"
    printed = capsys.readouterr().out
    assert "eval on the training data (facts:12:3)" in printed and "     8 " in printed
    if "example" in table:  # one the tiny model's full rank got right and rank 0 wrong, if any
        ex = table["example"]
        assert list(ex["answers"]) == list(table["per_rank"])
        assert ex["answers"]["0"] != ex["reference"] and ex["answers"]["8"] == ex["reference"]
    model, tok = load_tiny(tiny_model_dir)
    adapter, _ = load_adapter(cfg.out, model)
    examples, _ = load_examples("facts:12:3", tok, 64, None)
    for k in (0, 2, 8):
        adapter.set_rank(k)
        nll, exact = answer_scores(model, examples, tok.pad_token_id, 4)
        assert table["per_rank"][str(k)]["nll"] == pytest.approx(nll, rel=1e-4)
        assert table["per_rank"][str(k)]["exact"] == exact


def test_bad_data_and_eval_data_are_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError) as e:
        TrainConfig(out=str(tmp_path), data="nope.jsonl", eval_data="facts:x").validate()
    assert "--data nope.jsonl: no such file" in str(e.value) and "--eval-data facts:x: no such file" in str(e.value)
    with pytest.raises(ValueError, match="'train' names the training data only for --eval-data"):
        TrainConfig(out=str(tmp_path), data="train").validate()


def test_training_flags_are_generated_from_the_config_fields():
    """One definition per option: every TrainConfig / AdapterConfig field is a flag whose
    default and choices come from the field, and the parsed flags rebuild the config."""
    from trainer.cli import build_parser
    from trainer.flags import flag_values

    args = build_parser().parse_args(["train", "--out", "x", "--rank", "16", "--targets", "re:.*q_proj",
                                      "--ranks", "1,4,16", "--no-progress"])
    cfg = TrainConfig.from_flags(flag_values(TrainConfig, args))
    assert cfg == TrainConfig(out="x", progress=False, adapter=AdapterConfig(r=16, ranks=[1, 4, 16],
                                                                             target_modules=".*q_proj"))
    defaults = TrainConfig.from_flags(flag_values(TrainConfig, build_parser().parse_args(["train", "--out", "x"])))
    assert defaults == TrainConfig(out="x")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--method", "svd"])  # svd is nested, not trained


def losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / ADAPTER_WEIGHTS)


@pytest.mark.parametrize("method, sampling", [("matryoshka", "batch"), ("dylora", "batch"), ("dylora", "row")])
def test_resumed_run_reproduces_the_uninterrupted_loss_sequence_exactly(tmp_path, tiny_model_dir, method, sampling):
    run(tmp_path, tiny_model_dir, "full", method=method, save_every=3, rank_sampling=sampling)
    resumed = run(tmp_path, tiny_model_dir, "resumed", method=method, save_every=3, rank_sampling=sampling,
                  resume=str(tmp_path / "full" / "step-000003"))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")[3:]
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_meta(resumed.out)["step"] == 6


def test_resume_into_the_same_folder_keeps_one_metrics_line_per_step(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, "run", save_every=2)
    before = losses(tmp_path / "run")
    run(tmp_path, tiny_model_dir, "run", save_every=2, resume=str(tmp_path / "run" / "step-000004"))
    assert losses(tmp_path / "run") == before


# Runs `trainer train` and SIGKILLs itself at the first rename onto the path given first: a real
# kill -9 at an exact point of a checkpoint save (os.replace commits a file, os.rename a folder).
KILL_AT = r"""
import os, signal, sys
from trainer.cli import main
target = sys.argv[1]
def killing(real):
    def call(src, dst, *a, **k):
        if os.fspath(dst) == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)
    return call
os.replace, os.rename = killing(os.replace), killing(os.rename)
sys.exit(main(sys.argv[2:]))
"""


def train_cli(tiny_model_dir, out, *extra, kill_at=None) -> subprocess.CompletedProcess:
    args = ["train", "--model", str(tiny_model_dir), "--limit", "64",
            "--max-length", "64", "--batch-size", "4", "--lr", "5e-3", "--max-steps", "6", "--save-every", "2",
            "--no-progress", "--out", str(out), *extra]
    cmd = [sys.executable, "-c", KILL_AT, str(kill_at), *args] if kill_at else [sys.executable, "-m", "trainer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_kill_9_during_checkpoint_saves_keeps_the_previous_one_and_resume_continues_exactly(
        tmp_path, tiny_model_dir):
    """One run killed three times, each at another point of a save, each time resumed with
    ``--resume latest``: every complete checkpoint stays loadable, nothing half-written passes for
    one, and the last resume ends with the uninterrupted run's adapter and loss sequence."""
    assert train_cli(tiny_model_dir, tmp_path / "ref").returncode == 0  # the same run, uninterrupted
    out = tmp_path / "run"
    for kill_at, resume in [
        (out / ".step-000004.partial" / ADAPTER_WEIGHTS, False),  # the first file of a periodic save
        (out / "step-000004", True),  # the periodic save, written whole, at its one rename
        (out / "training_state.safetensors", True),  # the final save: adapter written, its optimizer not
    ]:
        killed = train_cli(tiny_model_dir, out, *(["--resume", "latest"] if resume else []), kill_at=kill_at)
        assert killed.returncode == -9, killed.stderr[-2000:]
        load_adapter(out / "step-000002", load_tiny(tiny_model_dir)[0])
        if kill_at.name != "training_state.safetensors":
            assert not (out / "step-000004").exists() and (out / ".step-000004.partial").exists()
    with pytest.raises(CheckpointError, match="no trainer_state.json"):
        read_training_state(out)  # the final save had written the adapter only
    resumed = train_cli(tiny_model_dir, out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"--resume latest: {out / 'step-000004'}" in resumed.stdout + resumed.stderr
    ref = tmp_path / "ref"
    a, b = adapter_tensors(ref), adapter_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(out) == losses(ref)
    assert not list(out.glob(".*.partial")), "the next save clears the staging folder a kill left"


def test_a_training_state_is_refused_beside_another_steps_adapter(tmp_path, tiny_model_dir):
    """The final save replaces files one by one; a kill between the adapter and its training
    state leaves a pair that the digest in trainer_state.json tells apart."""
    run(tmp_path, tiny_model_dir, "run", save_every=2)
    out = tmp_path / "run"
    for name in (ADAPTER_WEIGHTS, "matryoshka.json"):  # step 4's adapter beside step 6's optimizer
        shutil.copy(out / "step-000004" / name, out / name)
    with pytest.raises(CheckpointError, match="a save was cut short"):
        read_training_state(out)


def test_resume_with_different_options_is_refused(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, "a", save_every=3)
    with pytest.raises(ValueError, match=r"--lr: checkpoint 0.005, now 0.001"):
        run(tmp_path, tiny_model_dir, "b", lr=1e-3, resume=str(tmp_path / "a" / "step-000003"))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_model_dir):
    """4 examples in one micro-batch == 2 micro-batches of 2: the loss is normalised globally."""
    run(tmp_path, tiny_model_dir, "big", batch_size=4, grad_accum=1)
    run(tmp_path, tiny_model_dir, "acc", batch_size=2, grad_accum=2)
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-5)
    a, b = adapter_tensors(tmp_path / "big"), adapter_tensors(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_two_gloo_processes_reach_the_single_process_adapter(tmp_path, tiny_model_dir):
    """torchrun × 2 with batch 2 each == 1 process with batch 4 (same global batch)."""
    run(tmp_path, tiny_model_dir, "single", batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainer", "train", "--model", str(tiny_model_dir), "--rank", "8", "--lr", "5e-3",
           "--batch-size", "2", "--max-length", "64", "--limit", "64", "--max-steps", "6", "--dtype", "float32",
           "--no-progress", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    a, b = adapter_tensors(tmp_path / "single"), adapter_tensors(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_training_lowers_the_loss_and_the_checkpoint_serves_every_rank(tmp_path, tiny_model_dir):
    cfg = run(tmp_path, tiny_model_dir, "learn", lr=2e-2, max_steps=16, limit=None)
    seq = losses(tmp_path / "learn")
    assert sum(seq[-4:]) / 4 < sum(seq[:4]) / 4 - 0.1
    model, _ = load_tiny(tiny_model_dir)
    adapter, meta = load_adapter(cfg.out, model)
    assert meta["training"]["adapter"]["method"] == "matryoshka" and meta["data"]["examples"] == 256
    ids = torch.arange(5, 25).unsqueeze(0)
    outs = {}
    for k in [0, *meta["ranks"]]:
        adapter.set_rank(k)
        with torch.no_grad():
            outs[k] = model(input_ids=ids).logits
    assert all(not torch.allclose(outs[0], outs[k]) for k in meta["ranks"])


def test_cli_reports_every_bad_option_at_once(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--model", str(tiny_model_dir),
                           "--rank", "8", "--ranks", "0,3,16", "--batch-size", "0", "--lr", "-1",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2
    for text in ["--batch-size must be >= 1, got 0", "--lr must be a positive number",
                 "integers in 1..8", "invalid: [0, 16]"]:
        assert text in proc.stderr
    assert not (tmp_path / "x").exists()


def test_cli_fails_before_training_on_a_malformed_data_line(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--model", str(tiny_model_dir),
                           "--data", str(data), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and f"{data}:2: missing ['answer']" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_too_little_data_for_one_batch_names_the_flags(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match=r"3 examples are fewer than one global batch of 4 \(--batch-size 4"):
        run(tmp_path, tiny_model_dir, "small", limit=3)


@pytest.mark.slow
@pytest.mark.skipif(not GSM8K.exists(), reason="../shared/data/gsm8k not present")
def test_real_run_on_embedded_smollm2_with_gsm8k(tmp_path):
    """SmolLM2-135M on 16 GSM8K examples: the loss goes down and the checkpoint loads."""
    cfg = TrainConfig(model="smollm2-135m", data=str(GSM8K / "train.jsonl"), limit=16, max_length=96,
                      adapter=AdapterConfig(method="matryoshka", r=8), lr=2e-3, batch_size=4, epochs=3, progress=False,
                      out=str(tmp_path / "smol"))
    train(cfg)
    seq = losses(tmp_path / "smol")
    kept = read_meta(cfg.out)["data"]["examples"]  # GSM8K prompts past --max-length are dropped
    assert kept >= 12 and len(seq) == 3 * (kept // 4)
    assert sum(seq[-4:]) / 4 < sum(seq[:4]) / 4
    from trainer.models import load_model

    model, _ = load_model("smollm2-135m", "cpu", torch.float32)
    adapter, meta = load_adapter(cfg.out, model)
    assert meta["base_model"]["name"] == "smollm2-135m" and len(adapter.layers) == 30 * 7
    shutil.rmtree(tmp_path / "smol")


def test_row_rank_sampling_trains_each_row_as_its_own_ranks_standalone_forward(tiny_model_dir):
    """--rank-sampling row: every rank of R gets an equal share (±1) of a batch's rows, and in the
    one batched forward each row computes exactly what rank k_i alone computes for it."""
    from trainer.nested import p_vector
    from trainer.train import row_rank_coeffs

    cfg = AdapterConfig(method="dylora", r=8)
    c = row_rank_coeffs(cfg, 10, torch.Generator().manual_seed(0))  # (10, 8)
    ks = [int((row > 0).sum()) for row in c]
    assert all(torch.equal(row, p_vector("dylora", 8, cfg.ranks, cfg.scaling, k)) for row, k in zip(c, ks))
    assert sorted(ks.count(k) for k in cfg.ranks) == [2, 2, 3, 3]
    model, tok = load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    adapter = NestedAdapter.inject(model, cfg)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=0.3)
    ids = torch.randint(3, 200, (4, 9))
    rows = row_rank_coeffs(cfg, 4, torch.Generator().manual_seed(1))
    adapter.set_coeffs(rows)
    batched = model(input_ids=ids).logits
    for i, row in enumerate(rows):
        adapter.set_training_coeffs(int((row > 0).sum()))
        torch.testing.assert_close(batched[i], model(input_ids=ids[i:i + 1]).logits[0], rtol=1e-5, atol=1e-5)
    assert len({int((row > 0).sum()) for row in rows}) == 4  # four rows, four ranks: a real mix
