"""trainer eval: answer extraction, prompts, batched generation, answer NLL, outputs, bad input."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from decimal import Decimal

import pytest
import torch
from torch import nn

from conftest import GSM8K, load_tiny
from conftest import trained_adapter
from trainer import evaluate as ev
from trainer.aurac import aurac, log_aurac
from trainer.checkpoint import load_adapter, read_meta, save_adapter
from trainer.cli import main
from trainer.data import DataError, demo_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("completion, strict, flexible", [
    ("16 - 3 = 13.\n#### 13", "13", "13"),
    ("#### 1,234\n", "1234", "1234"),
    ("It costs $18.\n#### 18.", "18", "18"),
    ("#### 18.00", "18", "18"),  # compared by value
    ("#### -5", "-5", "-5"),
    ("so 3 + 4 = 7", None, "7"),  # no '####': strict fails, flexible takes the last number
    ("#### 4\nthen 5 more", "4", "5"),  # strict: the first '####'; flexible: the last number
    ("The answer is $1,000.50 total", None, "1000.50"),
    ("no number here", None, None),
])
def test_answers_are_extracted_strict_and_flexible(completion, strict, flexible):
    as_number = lambda s: None if s is None else Decimal(s)  # noqa: E731
    assert ev.strict_answer(completion) == as_number(strict)
    assert ev.flexible_answer(completion) == as_number(flexible)


def test_text_after_the_next_question_is_not_scored():
    assert ev.cut_at_stop(" 2 + 2 = 4\n#### 4\n\nQuestion: x\nAnswer: #### 9") == " 2 + 2 = 4\n#### 4\n\n"


def test_scoring_counts_exact_matches_per_rule(monkeypatch, tiny_model_dir, tmp_path):
    """Three questions: one right both ways, one right only by the last number, one wrong."""
    rows = [{"question": f"q{i}", "answer": f"steps\n#### {a}"} for i, a in enumerate([7, 12, 3])]
    task = ev.load_task(str(write_jsonl(tmp_path / "t.jsonl", rows)), None, 0, None)
    outputs = ["so #### 7", "it is 12", "#### 4"]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: (outputs, 9))
    model, tok = load_tiny(tiny_model_dir)
    row = ev.evaluate_rank(model, tok, task, ev.encode(task, tok), 2, 8, "test", progress=False)
    assert row["strict"] == pytest.approx(1 / 3) and row["flexible"] == pytest.approx(2 / 3)
    assert row["n"] == 3 and row["generated_tokens"] == 9 and row["nll"] > 0


def test_fewshot_prompts_follow_the_reference_format(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"tq{i}", "answer": f"ta{i}\n#### {i}"}
                                                    for i in range(5)])
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": "Q?", "answer": "#### 1"}])
    task = ev.load_task(str(data), None, 2, None)  # default exemplars: train.jsonl next to --data
    assert task.prompts == ["Question: tq0\nAnswer: ta0\n#### 0\n\nQuestion: tq1\nAnswer: ta1\n#### 1\n\n"
                            "Question: Q?\nAnswer: "]
    assert task.fewshot_data == str(train) and task.references == [Decimal(1)]
    assert ev.load_task(str(data), None, 0, None).prompts == ["Question: Q?\nAnswer: "]
    train.unlink()
    with pytest.raises(DataError, match="pass --fewshot-data"):
        ev.load_task(str(data), None, 2, None)
    with pytest.raises(DataError, match="has 1 records; --shots 2 needs 2"):
        ev.load_task(str(data), None, 2, str(data))


@pytest.fixture
def served(tiny_model_dir, tmp_path):
    """A tiny model with a (trained-looking) adapter at rank 2, and its tokenizer."""
    model, tok, adapter = trained_adapter(tiny_model_dir)
    adapter.set_rank(2)
    return model, tok


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(served):
    model, tok = served
    prompts = ["Question: Ada has 3 apples and gets 4 more. How many?\nAnswer: ", "Question: hi\nAnswer: ",
               "Question: Ben shares 12 coins among 3 friends.\nAnswer: "]
    ids = [tok(p)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) == 3  # different lengths: the batch is really padded
    batched, n_batched = ev.generate(model, tok, ids, batch_size=3, max_new_tokens=8)
    alone = [ev.generate(model, tok, [i], batch_size=1, max_new_tokens=8) for i in ids]
    assert batched == [c[0][0] for c in alone]
    assert n_batched == sum(n for _, n in alone) <= 3 * 8


class Scripted(nn.Module):
    """An lm_head that emits ``script`` one token per forward call, whatever the input."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, h):  # (B, T, H) -> (B, T, V)
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("text, stop, expected", [
    (" 6 + 1 = 7.\n#### 7\n\nQuestion: Ada has 3", "Question:", " 6 + 1 = 7.\n#### 7\n\n"),
    (" so #### 3", "eos", " so #### 3"),
])
def test_generation_stops_at_the_next_question_or_at_eos(tiny_model_dir, text, stop, expected):
    model, tok = load_tiny(tiny_model_dir)
    script = tok(text, add_special_tokens=False)["input_ids"]
    if stop == "eos":
        script = script + [tok.eos_token_id] + script
    model.lm_head = Scripted(script, model.config.vocab_size)
    prompts = [tok("Question: q\nAnswer: ")["input_ids"], tok("Question: a longer q\nAnswer: ")["input_ids"]]
    completions, n = ev.generate(model, tok, prompts, batch_size=2, max_new_tokens=40)
    assert completions == [expected, expected]
    emitted = tok(expected if stop == "eos" else expected + "Question:", add_special_tokens=False)["input_ids"]
    assert n == 2 * len(emitted) < 2 * 40  # stopped early, counted up to the stop


def hand_nll(model, tok, records) -> float:
    """Σ −log p(answer + EOS | prompt) / #tokens, one unpadded sequence at a time."""
    total, count = 0.0, 0
    for r in records:
        p = tok(f"Question: {r['question']}\nAnswer: ")["input_ids"]
        ids = p + tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        total -= sum(float(logp[t - 1, ids[t]]) for t in range(len(p), len(ids)))
        count += len(ids) - len(p)
    return total / count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_answer_nll_is_the_token_mean_over_answers_whatever_the_batching(served, tmp_path, batch_size):
    model, tok = served
    records = demo_records(5)
    task = ev.load_task(str(write_jsonl(tmp_path / "t.jsonl", records)), None, 0, None)
    _, examples = ev.encode(task, tok)
    nll = ev.answer_scores(model, examples, tok.pad_token_id, batch_size)[0]
    assert nll == pytest.approx(hand_nll(model, tok, records), rel=1e-5)


def test_exact_is_greedy_decodings_exact_match_of_the_reference(served):
    """exact counts an example iff greedy decoding from its prompt reproduces its answer: answers
    made of the model's own greedy tokens score 1, one changed token makes that example miss."""
    from trainer.data import Example

    model, tok = served
    examples = []
    for prompt in ["Ada has 12 apples", "Question: how many", "Ben gives"]:
        ids = tok(prompt)["input_ids"]
        n_prompt = len(ids)
        with torch.no_grad():
            for _ in range(4):  # greedy, one token at a time
                ids = ids + [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
        examples.append(Example(ids, n_prompt))
    assert ev.answer_scores(model, examples, tok.pad_token_id, 2)[1] == 1.0
    wrong = examples[1].input_ids[:-1] + [(examples[1].input_ids[-1] + 1) % 300]
    examples[1] = Example(wrong, examples[1].n_prompt)
    assert ev.answer_scores(model, examples, tok.pad_token_id, 2)[1] == pytest.approx(2 / 3)


# -- the command --------------------------------------------------------------------------------------
@pytest.fixture
def two_checkpoints(tiny_model_dir, tmp_path):
    paths = []
    for name, seed in [("mat", 1), ("other", 2)]:
        _, _, adapter = trained_adapter(tiny_model_dir, seed=seed)
        paths.append(save_adapter(tmp_path / name, adapter, str(tiny_model_dir), {"step": 1}))
    data = write_jsonl(tmp_path / "test.jsonl", demo_records(6))
    return paths, data


def test_eval_writes_json_csv_png_and_the_checkpoint_table(two_checkpoints, tmp_path, tiny_model_dir, capsys):
    (a, b), data = two_checkpoints
    out = tmp_path / "results"
    assert main(["eval", str(a), str(b), "--data", str(data), "--max-new-tokens", "6", "--batch-size", "8",
                 "--dtype", "float32", "--out", str(out), "--no-progress"]) == 0  # fp32: compared in-process below
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("trainer eval ") and "torch" in results["versions"]
    assert results["settings"]["n"] == 6 and results["settings"]["shots"] == 0
    entries = {e["label"]: e for e in results["checkpoints"]}
    assert set(entries) == {"mat", "other"}
    for e in entries.values():
        assert list(e["per_rank"]) == ["0", "1", "2", "4", "8"]
        for row in e["per_rank"].values():
            assert 0 <= row["strict"] <= 1 and 0 <= row["flexible"] <= 1
            assert row["n"] == 6 and row["seconds"] > 0 and row["nll"] > 0
        ranks = [1, 2, 4, 8]
        for m in ev.METRICS:  # the summaries are AURAC of the stored rows, rank 0 excluded
            assert e["aurac"][m] == pytest.approx(aurac(ranks, [e["per_rank"][str(k)][m] for k in ranks]))
            assert e["log_aurac"][m] == pytest.approx(log_aurac(ranks, [e["per_rank"][str(k)][m] for k in ranks]))
        # the checkpoint carries the same table for the server
        stored = read_meta(e["checkpoint"])["eval"]
        assert stored["per_rank"] == json.loads(json.dumps(e["per_rank"])) and stored["n"] == 6
        assert stored["aurac"] == e["aurac"] and stored["data"] == str(data)
    # rank 0 is the base model: one evaluation shared by both; the adapters change the NLL
    assert entries["mat"]["per_rank"]["0"] == entries["other"]["per_rank"]["0"]
    assert entries["mat"]["per_rank"]["8"]["nll"] != entries["mat"]["per_rank"]["0"]["nll"]
    assert entries["mat"]["per_rank"]["8"]["nll"] != entries["other"]["per_rank"]["8"]["nll"]
    model, tok = load_tiny(tiny_model_dir)
    _, examples = ev.encode(ev.load_task(str(data), None, 0, None), tok)
    assert entries["mat"]["per_rank"]["0"]["nll"] == pytest.approx(ev.answer_scores(model, examples, tok.pad_token_id, 4)[0])
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["rank"] for r in rows} == {"0", "1", "2", "4", "8"}
    assert float(rows[0]["nll"]) == pytest.approx(results["checkpoints"][0]["per_rank"]["0"]["nll"])
    assert_png(out / "rank_curve.png")
    assert not list(out.glob("*.tmp")) and not list(a.glob("*.tmp"))
    capsys.readouterr()
    assert main(["info", str(a)]) == 0  # the table, as a user reads it back
    shown = capsys.readouterr().out
    assert "eval         " + str(data) + "  n=6  shots=0" in shown
    assert f"rank    8  strict {entries['mat']['per_rank']['8']['strict']:.4f}" in shown and "  aurac " in shown


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 400 and height > 200


def test_eval_of_a_subset_of_ranks_keeps_the_checkpoint_loadable(two_checkpoints, tmp_path, tiny_model_dir):
    (a, _), data = two_checkpoints
    assert main(["eval", str(a), "--data", str(data), "--ranks", "2,8", "--limit", "2", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    meta = read_meta(a)
    assert list(meta["eval"]["per_rank"]) == ["0", "2", "8"] and meta["eval"]["n"] == 2
    load_adapter(a, load_tiny(tiny_model_dir)[0])  # the tensors' digest still matches
    assert main(["eval", str(a), "--data", str(data), "--ranks", "0", "--limit", "2", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "r0"), "--no-progress"]) == 0
    assert list(read_meta(a)["eval"]["per_rank"]) == ["0"] and read_meta(a)["eval"]["aurac"] == {}


def test_nll_only_eval_of_a_held_out_tail(two_checkpoints, tmp_path, tiny_model_dir):
    """--skip 4 --no-generate: records 5..6 only, no accuracy, AURAC of the NLL alone (a sweep's cheap score)."""
    (a, _), data = two_checkpoints
    out = tmp_path / "held"
    assert main(["eval", str(a), "--data", str(data), "--skip", "4", "--no-generate", "--out", str(out),
                 "--dtype", "float32", "--no-progress"]) == 0
    entry = json.loads((out / "results.json").read_text())["checkpoints"][0]
    assert entry["n"] == 2 and entry["skip"] == 4
    assert all(row["strict"] is None and row["flexible"] is None and row["generated_tokens"] == 0
               for row in entry["per_rank"].values())
    assert set(entry["aurac"]) == {"exact", "nll"} and set(entry["log_aurac"]) == {"exact", "nll"}
    model, tok = load_tiny(tiny_model_dir)
    _, examples = ev.encode(ev.load_task(str(data), None, 0, None, skip=4), tok)
    assert entry["per_rank"]["0"]["nll"] == pytest.approx(ev.answer_scores(model, examples, tok.pad_token_id, 4)[0])
    assert len(examples) == 2
    assert_png(out / "rank_curve.png")


@pytest.mark.parametrize("case, message", [
    ("no_meta", "no matryoshka.json"),
    ("skip_all", "--skip 6 leaves nothing to evaluate; the file holds 6 records"),
    ("bad_rank", r"--ranks \[3\] not in the rank set of .*valid ranks are \[0, 1, 2, 4, 8\]"),
    ("empty_data", "holds no records"),
    ("chat_data", "GSM8K-style {question, answer} records; this file's records are chat"),
    ("no_answer", "record 1 has no '#### <number>'"),
    ("shots", "pass --fewshot-data"),
    ("limit", "--limit must be >= 1, got 0"),
])
def test_bad_input_exits_2_with_a_clear_message(two_checkpoints, tmp_path, capsys, case, message):
    (a, _), data = two_checkpoints
    ckpt, extra = str(a), []
    if case == "no_meta":
        ckpt = str(tmp_path / "plain")
        (tmp_path / "plain").mkdir()
    elif case == "bad_rank":
        extra = ["--ranks", "3"]
    elif case == "empty_data":
        data.write_text("\n")
    elif case == "chat_data":
        write_jsonl(data, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    elif case == "no_answer":
        write_jsonl(data, [{"question": "q", "answer": "no number marker"}])
    elif case == "shots":
        extra = ["--shots", "2"]
    elif case == "limit":
        extra = ["--limit", "0"]
    elif case == "skip_all":
        extra = ["--skip", "6"]
    before = (a / "matryoshka.json").read_text()
    capsys.readouterr()  # drop the fixture's model-loading output
    code = main(["eval", ckpt, "--data", str(data), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("trainer eval: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists() and (a / "matryoshka.json").read_text() == before


@pytest.mark.slow
@pytest.mark.skipif(not (GSM8K / "test.jsonl").exists(), reason="../shared/data/gsm8k not present")
def test_eval_on_embedded_smollm2_writes_every_output(tmp_path):
    """Train a tiny rank-8 adapter on SmolLM2-135M, then evaluate 8 GSM8K test questions at ranks 0, 1, 8
    (every rank takes as long as the base model here; the tiny-model tests cover all of R)."""
    from trainer.inject import AdapterConfig
    from trainer.train import TrainConfig, train

    cfg = TrainConfig(model="smollm2-135m", data=str(GSM8K / "train.jsonl"), limit=8, max_steps=2,
                      adapter=AdapterConfig(r=8),
                      batch_size=4, max_length=96, progress=False, out=str(tmp_path / "smol"))
    train(cfg)
    t0 = time.perf_counter()
    assert main(["eval", cfg.out, "--data", str(GSM8K / "test.jsonl"), "--limit", "8", "--max-new-tokens", "32",
                 "--ranks", "1,8", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    seconds = time.perf_counter() - t0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    per_rank = results["checkpoints"][0]["per_rank"]
    assert list(per_rank) == ["0", "1", "8"] and all(r["n"] == 8 for r in per_rank.values())
    assert all(0 <= r["strict"] <= 1 and 0 <= r["flexible"] <= 1 and 0 < r["nll"] < 10 for r in per_rank.values())
    assert sum(r["seconds"] for r in per_rank.values()) <= seconds
    assert read_meta(cfg.out)["eval"]["per_rank"] == per_rank
    assert (tmp_path / "eval" / "results.csv").read_text().count("\n") == 1 + 3
    assert per_rank["8"]["nll"] < per_rank["0"]["nll"]  # two steps on GSM8K answers already help them
    assert_png(tmp_path / "eval" / "rank_curve.png")
    shutil.rmtree(tmp_path / "smol")
