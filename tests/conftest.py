"""Shared fixtures: a tiny random Llama with a real (small, trained-here) tokenizer, saved as an
HF folder so that every code path that takes ``--model PATH`` runs on it in milliseconds."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest
import torch

from server.engine import Engine, EngineConfig, Event, GenerationRequest
from server.runner import ModelRunner
from trainer.data import demo_records
from trainer.inject import AdapterConfig, NestedAdapter
from trainer.kernels import gemm_mode, packing_error, use_gemm

REPO = Path(__file__).resolve().parents[1]
# GSM8K lives beside the checkout (../shared); MLORA_GSM8K_DIR overrides, /work/shared is the
# workplace's fixed location for clones made elsewhere
GSM8K = next((p for p in [Path(os.environ.get("MLORA_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k")),
                          Path("/work/shared/data/gsm8k")] if p.exists()), REPO.parent / "shared" / "data" / "gsm8k")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [r["question"] + "\n" + r["answer"] for r in demo_records(200)]
    corpus += ["Question: Answer: #### the a an of to is was how many more"] * 3
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tests off the user's cache unless MLORA_CACHE is set (CI sets it to reuse SmolLM2)."""
    os.environ.setdefault("MLORA_CACHE", str(tmp_path_factory.mktemp("mlora-cache")))


def trained_adapter(model_dir, r=8, scaling="sqrt", method="matryoshka", seed=1, inference_rule="auto"):
    model, tok = load_tiny(model_dir)
    torch.manual_seed(seed)
    adapter = NestedAdapter.inject(model, AdapterConfig(method=method, r=r, scaling=scaling,
                                                        inference_rule=inference_rule))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=0.05)  # as if trained: B = 0 would hide every bug
    return model, tok, adapter


def skip_unless_packable(dtype: torch.dtype) -> None:
    """Skip where oneDNN cannot pack ``dtype`` weights on this CPU (bf16 on an AVX2-only one)."""
    if packing_error(dtype):
        pytest.skip(f"packed GEMMs cannot run in {dtype} on this CPU: {packing_error(dtype)}")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_tiny(folder: Path, dtype: torch.dtype = torch.float32):
    from trainer.models import load_model

    return load_model(str(folder), "cpu", dtype)


# -- the engine without HTTP: a fixture, a reference, a sink and a driver ------------------------
PROMPTS = ["Ada has 12 apples and gets 7 more.", "Question: how many", "Ben",
           "Chen shares 40 coins equally among 4 friends. How many does each friend get?",
           "Dara had 30 stamps", "the a an of to is was"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, tok = load_tiny(tiny_model_dir)
    torch.manual_seed(3)
    adapter = NestedAdapter.inject(model, AdapterConfig(r=8))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=0.3)  # strong enough that every rank answers differently
    adapter.fuse()  # the fused path (server --fuse true) under the engine tests; reference() runs unfused
    use_gemm(model, "packed")  # oneDNN-packed weights (server --gemm packed); reference() runs F.linear
    return model, tok, adapter


def make_engine(setup, **cfg) -> Engine:
    model, tok, adapter = setup
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    runner.enable_mixed()  # as the server does: prefill pieces ride on decode steps
    runner.enable_lean_decode()  # and decode steps run lean
    return Engine(runner, tok, EngineConfig(**cfg), adapter.config.ranks, auto_rank=lambda: 8)


def reference(setup, prompt_ids: list[int], rank: int, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """One request alone, the plain way: full forward over the whole sequence at each step, every
    adapted module its own three ops, every linear ``F.linear`` (unfused and standard-layout, even
    where the engine under test runs fused and packed)."""
    model, tok, adapter = setup
    fused = bool(adapter.groups)
    mode = gemm_mode(model)
    adapter.unfuse()
    use_gemm(model, "standard")
    adapter.set_rank(rank)
    ids, steps = list(prompt_ids), []
    try:
        with torch.no_grad():
            for _ in range(n):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                steps.append(logits)
                nxt = int(logits.argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
    finally:
        if fused:
            adapter.fuse()
        use_gemm(model, mode)
    return ids[len(prompt_ids):], steps


class Collector:
    """A request's sink: keeps its events; ``then(ev)`` runs after each (on the engine thread)."""

    def __init__(self, then=None):
        self.events: list[Event] = []
        self.done = threading.Event()
        self.then = then

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        if self.then is not None:
            self.then(ev)
        if ev.done:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def final(self) -> Event:
        return self.events[-1]


def run_all(engine: Engine, reqs: list[GenerationRequest]) -> None:
    engine.start()
    try:
        for r in reqs:
            engine.submit(r)
        for r in reqs:
            assert r.sink.done.wait(60)
    finally:
        engine.stop()




# -- a real server on loopback ----------------------------------------------------------------------
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m server`` on 127.0.0.1 and a random port, in its own process; in fp32 unless
    ``args`` name a ``--dtype``: the tests' in-process references are fp32, and ``--dtype auto``
    serves bf16 on a CPU with native bf16 (tests/test_dtype.py covers that choice)."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        dtype = [] if "--dtype" in args else ["--dtype", "float32"]
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *dtype, *args]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    """A nested adapter trained for a few steps by the real trainer on the tiny model."""
    from trainer.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-ckpt") / "ckpt"
    train(TrainConfig(model=str(tiny_model_dir), adapter=AdapterConfig(r=8), lr=2e-2, batch_size=4,
                      max_length=64, limit=32, max_steps=4, progress=False, out=str(out)))
    return out


@pytest.fixture(scope="module")
def served_in_process(tiny_model_dir, tiny_checkpoint):
    """(model, tokenizer, adapter): the tiny model and checkpoint a test server serves, in this
    process — what each rank must compute."""
    from trainer.checkpoint import load_adapter
    from trainer.models import load_model

    model, tok = load_model(str(tiny_model_dir), "cpu", torch.float32)
    adapter, _ = load_adapter(tiny_checkpoint, model)
    return model, tok, adapter


# -- reading a running server -------------------------------------------------------------------
def metric(http, name: str, **labels) -> float:
    """Sum of the series of ``name`` whose labels include ``labels`` (0 if none)."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def wait_metric(http, name: str, expected: float, timeout: float = 10, **labels) -> float:
    """Metrics are recorded at the end of the engine step that answered: poll briefly."""
    end = time.monotonic() + timeout
    while (v := metric(http, name, **labels)) != expected and time.monotonic() < end:
        time.sleep(0.05)
    return v


def wait_http_ok(url: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200 (a freshly started Prometheus takes a moment)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not become ready in {timeout} s")


class Busy:
    """``n`` senders that resubmit ``body(i)`` to ``url`` until the block exits, so that a load
    lasts until the reaction under test is seen, however fast this machine decodes (a fixed burst
    can drain first). ``responses`` collects (status, body) of every request: the JSON, or the
    text / the exception when there is none (status 0), so that no failure goes unseen."""

    def __init__(self, url: str, n: int, body, path: str = "/generate"):
        self.url, self.body, self.path, self.responses = url, body, path, []
        self.retry_after: list[str | None] = []  # the Retry-After header of every 429
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(n)]

    def _send(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as c:
            while not self._done.is_set():
                try:
                    r = c.post(self.path, json=self.body(i))
                except httpx.HTTPError as e:
                    self.responses.append((0, repr(e)))
                    continue
                if r.status_code == 429:
                    self.retry_after.append(r.headers.get("retry-after"))
                try:
                    self.responses.append((r.status_code, r.json()))
                except ValueError:
                    self.responses.append((r.status_code, r.text))

    def __enter__(self) -> Busy:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for t in self._threads:
            t.join(300)


def wait_until(check, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while not (ok := check()) and time.monotonic() < end:
        time.sleep(step)
    return bool(ok)


# -- lm-evaluation-harness: a multiple-choice task on local data, and how it encodes a pair ------------
MC_TASK = """\
task: arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

def arithmetic_questions(n: int = 6, seed: int = 0) -> list[dict]:
    """``n`` sums with 3 or 4 choices each, the right one at a random place (seed 0: this tiny
    checkpoint at RANK picks 3 of 6 right, so an accuracy of 0 or 1 would show a miscount)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        wrong = rng.sample([a + b + d for d in (-10, -3, -2, -1, 1, 2, 3, 10) if a + b + d > 0], rng.choice([2, 3]))
        choices = [str(c) for c in [a + b, *wrong]]
        rng.shuffle(choices)
        rows.append({"question": f"Ada has {a} apples and gets {b} more. How many apples does she have?",
                     "choices": choices, "label": choices.index(str(a + b))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``TemplateLM._encode_pair`` for a causal model, with the remote tokenizer (which asks
    ``/tokenize`` with ``add_special_tokens: false``): the context's trailing spaces move to the
    continuation; the continuation's tokens are those of the whole after the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tok(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def scored(sample: dict) -> list[tuple[str, str, float, bool]]:
    """(context, continuation, loglikelihood, is_greedy) of each choice, as lm-eval logged them."""
    args = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["arguments"]))]
    return [(a["arg_0"], a["arg_1"], float(r[0][0]), r[0][1] in (True, "True")) for a, r in zip(args, sample["resps"])]


# -- the project with lm-evaluation-harness, in a venv of its own (trainer eval --harness) ----------
HARNESS_VENV = REPO / ".venv-harness"
HARNESS_TORCH = "torch==2.13.0"  # the CPU build the project pins, first, so that pip pulls no CUDA build
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # no hub


@pytest.fixture(scope="module")
def harness_python() -> str:
    exe = os.environ.get("MLORA_HARNESS_PYTHON") or str(HARNESS_VENV / "bin" / "python")
    if not Path(exe).exists() or not (Path(exe).parent / "lm_eval").exists():  # a venv half made is remade
        v = HARNESS_VENV
        made = subprocess.run(f"{sys.executable} -m venv {v} && {v}/bin/pip install -q '{HARNESS_TORCH}' && "
                              f"{v}/bin/pip install -q -e '{REPO}[harness]'", shell=True, capture_output=True,
                              text=True, timeout=1200)
        if made.returncode != 0 or not Path(exe).exists():
            pytest.skip(f"cannot make {HARNESS_VENV} (is PyPI reachable?): {made.stderr[-500:]}")
    return exe
