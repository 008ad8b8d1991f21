"""Training data: JSONL in three shapes, tokenised with the loss on answer tokens only.

Shapes, detected per file from its first record (every line must then have that shape):

* ``{"question", "answer"}`` — GSM8K. Prompt ``"Question: {q}\\nAnswer: "``, target answer + EOS.
* ``{"messages": [...]}``  — chat; the tokenizer's chat template; the last message must be the
  assistant's, and it is the target (earlier turns are context).
* ``{"prompt", "completion"}`` — plain text; target completion + EOS.

With no file, :func:`demo_records` generates arithmetic word problems with ``#### n`` answers.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # label of positions that carry no loss (prompt, padding)
GSM8K_PROMPT = "Question: {question}\nAnswer: "

SHAPES = {
    "gsm8k": ("question", "answer"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}


class DataError(ValueError):
    """A data file that cannot be used; the message names file:line and what is wrong."""


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens carry no loss

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss: completion tokens with a token before them to predict from."""
        return len(self.input_ids) - max(self.n_prompt, 1)


@dataclass
class DataReport:
    path: str
    shape: str
    examples: int
    truncated: int  # cut at --max-length (target partly kept)
    dropped: int  # prompt alone reached --max-length: no target left, example skipped

    def summary(self) -> str:
        return (f"{self.path}: {self.examples} examples ({self.shape}); {self.truncated} truncated at "
                f"--max-length, {self.dropped} dropped (prompt alone reached --max-length)")


def detect_shape(record: dict, where: str) -> str:
    for shape, keys in SHAPES.items():
        if all(k in record for k in keys):
            return shape
    allowed = " or ".join("{" + ", ".join(k) + "}" for k in SHAPES.values())
    raise DataError(f"{where}: a record needs the keys {allowed}; got keys {sorted(record)}")


def read_jsonl(path: str | Path, limit: int | None = None) -> tuple[str, list[dict]]:
    """(shape, records). Every line is checked before any training starts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    records: list[dict] = []
    shape = None
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if shape is None:
                shape = detect_shape(rec, where)
            _check_record(rec, shape, where)
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DataError(f"--data {path}: the file holds no records")
    return shape, records


def _check_record(rec: dict, shape: str, where: str) -> None:
    missing = [k for k in SHAPES[shape] if k not in rec]
    if missing:
        raise DataError(f"{where}: missing {missing} (this file's records are {shape}: {list(SHAPES[shape])})")
    if shape == "chat":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs string 'role' and 'content', got {m!r:.80}")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message is the training target and must have role "
                            f"'assistant', got {msgs[-1]['role']!r}")
    else:
        bad = [k for k in SHAPES[shape] if not isinstance(rec[k], str)]
        if bad:
            raise DataError(f"{where}: {bad} must be strings")


def prompt_and_target(rec: dict, shape: str, tokenizer) -> tuple[str, str, bool]:
    """(prompt text, target text, append EOS?)."""
    if shape == "gsm8k":
        return GSM8K_PROMPT.format(question=rec["question"]), rec["answer"], True
    if shape == "prompt_completion":
        return rec["prompt"], rec["completion"], True
    msgs = rec["messages"]
    prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the conversation differently with and without "
                        "its last message; cannot find where the assistant's answer starts")
    return prompt, full[len(prompt):], False


def tokenize(records: list[dict], shape: str, tokenizer, max_length: int | None,
             path: str = "<generated>") -> tuple[list[Example], DataReport]:
    examples: list[Example] = []
    truncated = dropped = 0
    for rec in records:
        prompt, target, add_eos = prompt_and_target(rec, shape, tokenizer)
        p_ids = tokenizer(prompt, add_special_tokens=shape != "chat")["input_ids"]
        t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if add_eos:
            t_ids = t_ids + [tokenizer.eos_token_id]
        ids = p_ids + t_ids
        if max_length is not None and len(ids) > max_length:
            ids = ids[:max_length]
            if len(ids) - max(len(p_ids), 1) <= 0:
                dropped += 1
                continue
            truncated += 1
        examples.append(Example(ids, len(p_ids)))
    if not examples:
        raise DataError(f"{path}: no example keeps any answer token at --max-length {max_length}; raise it")
    return examples, DataReport(path, shape, len(examples), truncated, dropped)


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (IGNORE on prompt and padding)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- the generated demo dataset ----------------------------------------------------------------------
_NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jia", "Kai", "Lena"]
_THINGS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells"]


def demo_records(n: int = 256, seed: int = 0) -> list[dict]:
    """Deterministic arithmetic word problems in GSM8K's shape (``#### n`` answers)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        kind = rng.randrange(4)
        if kind == 0:
            q = f"{who} has {a} {thing} and gets {b} more. How many {thing} does {who} have now?"
            steps, ans = f"{who} has {a} + {b} = {a + b} {thing}.", a + b
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            q = f"{who} had {a} {thing} and gave away {b}. How many {thing} are left?"
            steps, ans = f"{who} has {a} - {b} = {a - b} {thing} left.", a - b
        elif kind == 2:
            b = rng.randint(2, 9)
            q = f"{who} buys {b} boxes with {a} {thing} in each box. How many {thing} is that?"
            steps, ans = f"That is {b} * {a} = {a * b} {thing}.", a * b
        else:
            b = rng.randint(2, 9)
            total = a * b
            q = f"{who} shares {total} {thing} equally among {b} friends. How many does each friend get?"
            steps, ans = f"Each friend gets {total} / {b} = {a} {thing}.", a
        out.append({"question": q, "answer": f"{steps}\n#### {ans}"})
    return out


FACTS_SPEC = re.compile(r"facts:([0-9]+)(?::([0-9]+))?")
DATA_HELP = ("JSONL: {question,answer} | {messages} | {prompt,completion}; facts:N[:SEED]: the capacity "
             "probe, N generated facts (trainer.data.facts_records); omitted: a generated arithmetic demo set")


def load_examples(path: str | None, tokenizer, max_length: int | None, limit: int | None,
                  demo_size: int = 256) -> tuple[list[Example], DataReport]:
    if path is None:
        records = demo_records(min(limit, demo_size) if limit else demo_size)
        return tokenize(records, "gsm8k", tokenizer, max_length, "<generated demo>")
    if m := FACTS_SPEC.fullmatch(path):
        n = int(m.group(1))
        if n < 1:
            raise DataError(f"--data {path}: N must be >= 1")
        records = facts_records(min(n, limit) if limit else n, int(m.group(2) or 0), short=True)
        return tokenize(records, "prompt_completion", tokenizer, max_length, path)
    shape, records = read_jsonl(path, limit)
    return tokenize(records, shape, tokenizer, max_length, str(path))


# -- the capacity probe: facts the base model cannot know ---------------------------------------------
_SYLLABLES = ["ka", "zo", "ri", "vel", "mur", "tan", "qui", "dor", "es", "lix", "bo", "sha", "fen", "gri",
              "ul", "pra", "nek", "so", "thi", "wy", "jor", "xa", "mel", "cor"]


def facts_records(n: int = 128, seed: int = 0, short: bool = False) -> list[dict]:
    """``n`` made-up people, each with a 4-digit code: memorisation that only the adapter can hold.

    GSM8K-shaped by default (``#### code`` answers), so ``trainer train``/``trainer eval`` read it
    as they read GSM8K and ``strict`` accuracy is exact recall. ``short``: ``{prompt, completion}``
    records ``"The code of Name is" → " 1234"``, about half the tokens (a cheaper probe, scored by
    ``exact``). Names are distinct; the codes are uniform over 1000–9999 (a guess is right with
    p = 1/9000), so the base model scores ~0 and a rank-k adapter scores about what its capacity
    can store: the probe has signal across ranks.
    """
    rng = random.Random(seed)
    names: set[str] = set()
    out = []
    while len(out) < n:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        code = rng.randint(1000, 9999)
        out.append({"prompt": f"The code of {name} is", "completion": f" {code}"} if short else
                   {"question": f"What is the code of {name}?", "answer": f"#### {code}"})
    return out
