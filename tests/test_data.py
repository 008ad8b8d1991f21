"""Data files: shape detection, answer-only loss, truncation reports, clear errors."""

from __future__ import annotations

import json

import pytest

from conftest import GSM8K, load_tiny
from trainer.data import IGNORE, DataError, collate, demo_records, load_examples, read_jsonl


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tiny(tiny_model_dir)[1]


@pytest.mark.parametrize("row, shape", [
    ({"question": "1+1?", "answer": "2\n#### 2"}, "gsm8k"),
    ({"prompt": "Say hi:", "completion": " hi"}, "prompt_completion"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "chat"),
])
def test_shapes_are_detected_and_loss_is_on_answer_tokens_only(tmp_path, tok, row, shape):
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    examples, report = load_examples(str(path), tok, max_length=256, limit=None)
    assert report.shape == shape and report.examples == 2
    batch = collate(examples, tok.pad_token_id)
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    answer = tok.decode(ids[labels != IGNORE])
    expected = {"gsm8k": "2\n#### 2</s>", "prompt_completion": " hi</s>", "chat": "hello</s>"}[shape]
    assert answer == expected
    prompt = tok.decode(ids[labels == IGNORE])
    assert {"gsm8k": "Question: 1+1?\nAnswer: ", "prompt_completion": "Say hi:",
            "chat": "<|user|>hi</s><|assistant|>"}[shape] in prompt


@pytest.mark.parametrize("lines, message", [
    (['{"question": "q", "answer": "a"}', '{"question": "q"}'], r"d\.jsonl:2: missing \['answer'\]"),
    (['{"question": "q", "answer": "a"}', "{not json"], r"d\.jsonl:2: not valid JSON"),
    (['{"text": "x"}'], r"d\.jsonl:1: a record needs the keys .*got keys \['text'\]"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"d\.jsonl:1: the last message .* 'assistant'"),
    (['{"prompt": "p", "completion": 3}'], r"d\.jsonl:1: \['completion'\] must be strings"),
    (["[1, 2]"], r"d\.jsonl:1: expected a JSON object"),
    (["", "  "], r"holds no records"),
])
def test_malformed_lines_fail_with_file_line_and_what_is_wrong(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_max_length_truncates_and_reports(tmp_path, tok):
    rows = [{"prompt": "short", "completion": " ok"}, {"prompt": "p", "completion": " word" * 50},
            {"prompt": "word " * 80, "completion": " x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_examples(str(path), tok, max_length=24, limit=None)
    assert (report.examples, report.truncated, report.dropped) == (2, 1, 1)
    assert all(len(e.input_ids) <= 24 and e.n_targets > 0 for e in examples)
    assert "1 truncated" in report.summary() and "1 dropped" in report.summary()


def test_limit_reads_only_the_first_records(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": str(i), "answer": "a"} for i in range(10)]
                       + ["{broken"])
    examples, report = load_examples(str(path), tok, max_length=64, limit=4)
    assert report.examples == 4


def test_demo_set_is_deterministic_with_gsm8k_answers():
    a, b = demo_records(50), demo_records(50)
    assert a == b
    assert all(r["answer"].splitlines()[-1].startswith("#### ") for r in a)
    for r in a:  # the arithmetic in the worked step is right
        expr, result = r["answer"].splitlines()[0].split("=")[0], r["answer"].split("#### ")[1]
        lhs = expr.split(" has ")[-1].split(" is ")[-1].split(" gets ")[-1].replace("That", "").strip()
        assert eval(lhs) == int(result)  # noqa: S307 (our own generated digits and + - * /)


@pytest.mark.skipif(not GSM8K.exists(), reason="../shared/data/gsm8k not present")
def test_gsm8k_train_file_is_read_as_gsm8k(tok):
    examples, report = load_examples(str(GSM8K / "train.jsonl"), tok, max_length=256, limit=32)
    assert report.shape == "gsm8k" and report.examples + report.dropped == 32
