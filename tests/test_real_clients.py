"""The field's own clients, unchanged, drive a real server on 127.0.0.1:

* **lm-evaluation-harness** (``local-completions``): it tokenises through our ``/tokenize``
  (``tokenizer_backend=remote``), sends token-id prompts (``tokenized_requests=True``) four to a
  request (``--batch_size 4``), and runs two tasks defined here on local data: a multiple-choice
  (loglikelihood) task on generated arithmetic, and ``generate_until`` on the first 8 GSM8K
  problems. What it scores must be what the served rank computes in this process.
* **guidellm**: a short synchronous benchmark of chat and of text completions, with the tiny
  model's folder as its tokenizer: every request must succeed and produce tokens at the rank named.

Each client lives in a venv of its own (its dependencies never meet the project's): .ci/run makes
``.venv-lmeval`` and ``.venv-guidellm``; if one is missing this file makes it; without PyPI that
client's tests are skipped. Nothing is fetched from a model or dataset hub (``HF_*_OFFLINE``)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from conftest import (
    GSM8K,
    MC_TASK,
    REPO,
    ServerProcess,
    arithmetic_questions,
    encode_pair,
    metric,
    scored,
    wait_metric,
    write_jsonl,
)
from server.metrics import GENERATED_TOKENS_TOTAL

KEY = "k"
RANK = 4  # lm-eval's rank: the model it is given is mlora@4
GUIDELLM_RANK = 2  # a rank no other test here serves, so that its token counter is guidellm's alone
OTHER_RANKS = (0, 1, 2, 8)  # the tiny checkpoint's ranks but RANK
BATCH = 4  # lm-eval's --batch_size: prompts per /v1/completions request
MAX_GEN_TOKS = 16
LM_EVAL = "lm-eval[api]==0.4.13"
GUIDELLM = "guidellm==0.8.1"
TORCH = "torch==2.13.0"  # guidellm needs torch: the CPU build the project pins, first, so pip pulls no CUDA build
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# -- the clients, each in its own venv --------------------------------------------------------------
def client(env_var: str, venv: Path, exe_name: str, *requirements: str) -> str:
    """The client's executable: ``env_var`` if set, else ``venv``'s; a missing venv is made, its
    ``requirements`` installed one after the other (or the tests that need it are skipped)."""
    exe = os.environ.get(env_var) or str(venv / "bin" / exe_name)
    if not Path(exe).exists():
        made = subprocess.run(" && ".join([f"{sys.executable} -m venv {venv}",
                                           *(f"{venv}/bin/pip install -q '{r}'" for r in requirements)]),
                              shell=True, capture_output=True, text=True, timeout=1200)
        if made.returncode != 0 or not Path(exe).exists():
            pytest.skip(f"{exe} is missing ({env_var} names another) and {requirements[-1]} cannot be installed "
                        f"into {venv} (is PyPI reachable?): {made.stderr[-500:]}")
    return exe


@pytest.fixture(scope="module")
def lm_eval() -> str:
    return client("MLORA_LM_EVAL", REPO / ".venv-lmeval", "lm_eval", LM_EVAL)


@pytest.fixture(scope="module")
def guidellm() -> str:
    return client("MLORA_GUIDELLM", REPO / ".venv-guidellm", "guidellm", TORCH, GUIDELLM)


def tool_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Our environment less what could make a tool's venv see our packages, offline, caches in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **OFFLINE, "HF_HOME": str(tmp / "hf-home"), **extra}


def run_tool(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# -- the server and the same model in this process ------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_checkpoint):
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--api-key", KEY,
                        "--calibrate-steps", "0").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def access_log(srv: ServerProcess, start: int) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request uvicorn logged after byte ``start`` of the server's log."""
    text = Path(srv.log.name).read_text()[start:]
    return [(m, p, int(s)) for m, p, s in re.findall(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})', text)]


# -- lm-evaluation-harness ---------------------------------------------------------------------------
# the bare question: after it this tiny checkpoint at RANK writes text of varied lengths, some of it
# up to a newline (after "Answer:" it writes a newline at once, which would leave nothing to compare)
GEN_TASK = """\
task: gsm8k_head
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def lm_eval_run(lm_eval, server, tmp_path_factory):
    """One ``lm_eval`` run of both tasks at mlora@RANK; its samples, results, and what the server saw."""
    tmp = tmp_path_factory.mktemp("lm-eval")
    tasks = tmp / "tasks"
    tasks.mkdir()
    mc_rows = arithmetic_questions()
    (tasks / "arith_mc.yaml").write_text(MC_TASK.format(data=write_jsonl(tmp / "arith.jsonl", mc_rows)))
    names = ["arith_mc"]
    gen_rows = []
    if (GSM8K / "test.jsonl").exists():
        with open(GSM8K / "test.jsonl") as f:
            gen_rows = [json.loads(next(f)) for _ in range(8)]
        (tasks / "gsm8k_head.yaml").write_text(GEN_TASK.format(data=write_jsonl(tmp / "gsm8k8.jsonl", gen_rows),
                                                               max_gen_toks=MAX_GEN_TOKS))
        names.append("gsm8k_head")
    model_args = ",".join([f"model=mlora@{RANK}", f"base_url={server.url}/v1/completions",
                           "tokenizer_backend=remote", "tokenized_requests=True", "num_concurrent=1",
                           "max_retries=1", "max_length=512", f"auth_token={KEY}"])
    cmd = [lm_eval, "--model", "local-completions", "--model_args", model_args, "--tasks", ",".join(names),
           "--include_path", str(tasks), "--batch_size", str(BATCH), "--log_samples", "--output_path", str(tmp / "out")]
    start = Path(server.log.name).stat().st_size
    done = run_tool(cmd, tmp, tool_env(tmp, OPENAI_API_KEY=KEY))  # the completions' Bearer token
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)}\n{out[-4000:]}\nserver:\n{server.output()}"

    def samples(task: str) -> list[dict]:
        (path,) = (tmp / "out").glob(f"*/samples_{task}_*.jsonl")
        return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])

    (results,) = (tmp / "out").glob("*/results_*.json")
    return {"samples": {t: samples(t) for t in names}, "results": json.loads(results.read_text())["results"],
            "requests": access_log(server, start), "mc_rows": mc_rows, "gen_rows": gen_rows}


def in_process(served_in_process, rank: int, sample: dict) -> list[tuple[float, bool]]:
    from trainer.evaluate import loglikelihood

    model, tok, adapter = served_in_process
    adapter.set_rank(rank)
    with torch.no_grad():
        return [loglikelihood(model, *encode_pair(tok, ctx, cont)) for ctx, cont, _, _ in scored(sample)]


def test_lm_eval_multiple_choice_loglikelihoods_are_the_served_ranks_in_process_ones(lm_eval_run, served_in_process):
    samples = lm_eval_run["samples"]["arith_mc"]
    assert len(samples) == len(lm_eval_run["mc_rows"])
    for sample in samples:
        got = scored(sample)
        assert len(got) == len(sample["doc"]["choices"])
        for (ctx, cont, ll, greedy), (expected, expected_greedy) in zip(got, in_process(served_in_process, RANK, sample)):
            assert ll == pytest.approx(expected, abs=1e-4), (ctx, cont)
            assert greedy == expected_greedy, (ctx, cont)
    # what each other rank computes is not what was served: the rank in the model name took effect
    served = [ll for s in samples for _, _, ll, _ in scored(s)]
    for k in OTHER_RANKS:
        other = [ll for s in samples for ll, _ in in_process(served_in_process, k, s)]
        assert max(abs(a - b) for a, b in zip(served, other)) > 1e-3, f"rank {k} scores as rank {RANK} does"


def test_lm_eval_accuracy_is_the_one_its_loglikelihoods_imply(lm_eval_run, served_in_process):
    samples = lm_eval_run["samples"]["arith_mc"]
    right = []
    for sample, row in zip(samples, lm_eval_run["mc_rows"]):
        assert sample["doc"] == row
        lls = [ll for ll, _ in in_process(served_in_process, RANK, sample)]
        right.append(float(max(range(len(lls)), key=lls.__getitem__) == row["label"]))  # the first best, as argmax
        assert sample["acc"] == right[-1], sample["doc"]
    assert lm_eval_run["results"]["arith_mc"]["acc,none"] == pytest.approx(sum(right) / len(right))


def test_lm_eval_sends_each_batch_as_one_request_and_every_request_succeeds(lm_eval_run):
    requests = lm_eval_run["requests"]
    assert requests and all(status == 200 for _, _, status in requests), [r for r in requests if r[2] != 200]
    choices = sum(len(r["choices"]) for r in lm_eval_run["mc_rows"])
    batches = math.ceil(choices / BATCH) + math.ceil(len(lm_eval_run["gen_rows"]) / BATCH)
    assert sum(path == "/v1/completions" for _, path, _ in requests) == batches
    assert any(path == "/tokenize" for _, path, _ in requests)  # it tokenised through the server


def test_lm_eval_gsm8k_generations_equal_the_servers_answer_to_each_prompt_alone(lm_eval_run, http):
    if not lm_eval_run["gen_rows"]:
        pytest.skip(f"{GSM8K / 'test.jsonl'} not present")
    samples = lm_eval_run["samples"]["gsm8k_head"]
    assert [s["doc"] for s in samples] == lm_eval_run["gen_rows"]
    eos = http.get("/tokenizer_info").json()["eos_token"]
    responses = []
    for sample in samples:
        assert len(sample["resps"]) == 1 and len(sample["resps"][0]) == 1 and isinstance(sample["resps"][0][0], str)
        context, gen = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
        assert gen["max_gen_toks"] == MAX_GEN_TOKS and gen["until"] == ["\n"]
        # lm-eval stops at its `until` and at the EOS text; greedy (temperature 0), so one answer
        alone = http.post("/v1/completions", json={"model": f"mlora@{RANK}", "prompt": context, "temperature": 0,
                                                   "max_tokens": MAX_GEN_TOKS, "stop": [*gen["until"], eos]})
        assert alone.status_code == 200, alone.text
        responses.append(sample["resps"][0][0])
        assert responses[-1] == alone.json()["choices"][0]["text"], context
    assert any(responses), "every response is empty: nothing was compared (choose a prompt that writes text)"
    assert "gsm8k_head" in lm_eval_run["results"]


# -- guidellm ------------------------------------------------------------------------------------------
GUIDELLM_REQUESTS = 4
GUIDELLM_OUTPUT_TOKENS = 8  # guidellm asks exactly this many (max_tokens with ignore_eos)


@pytest.mark.parametrize("request_format", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_benchmark_completes_every_request_with_the_tokens_it_asked_at_the_named_rank(
        guidellm, server, http, tiny_model_dir, tmp_path, request_format):
    """guidellm as benchmarks run it: its defaults (streamed, with usage), a synchronous profile."""
    out = tmp_path / "benchmarks.json"
    cmd = [guidellm, "run",
           "--backend", f"kind=openai_http,target={server.url},model=mlora@{GUIDELLM_RANK},api_key={KEY},"
                        f"request_format={request_format}",
           "--profile", "kind=synchronous",
           "--constraint", f"kind=max_requests,count={GUIDELLM_REQUESTS}",
           "--data", f"kind=synthetic_text,prompt_tokens=16,output_tokens={GUIDELLM_OUTPUT_TOKENS}",
           "--tokenizer", f"kind=huggingface_auto,model={tiny_model_dir}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    tokens_before = metric(http, GENERATED_TOKENS_TOTAL, rank=str(GUIDELLM_RANK))
    start = Path(server.log.name).stat().st_size
    done = run_tool(cmd, tmp_path, tool_env(tmp_path))
    assert done.returncode == 0 and out.exists(), f"{' '.join(cmd)}\n{(done.stdout + done.stderr)[-4000:]}"
    (benchmark,) = json.loads(out.read_text())["benchmarks"]
    requests = benchmark["requests"]
    refused = [r for r in access_log(server, start) if r[2] != 200]
    assert not requests["errored"] and not requests["incomplete"], (
        f"{len(requests['errored'])} errored, {len(requests['incomplete'])} incomplete; first: "
        f"{(requests['errored'] or requests['incomplete'])[0]['info']['error']}; the server answered {refused}")
    assert len(requests["successful"]) == GUIDELLM_REQUESTS and not refused
    for r in requests["successful"]:
        assert r["input_metrics"]["text_tokens"] > 0
        assert r["output_metrics"]["text_tokens"] == GUIDELLM_OUTPUT_TOKENS  # ignore_eos: all it asked, no fewer
    assert wait_metric(http, GENERATED_TOKENS_TOTAL, tokens_before + GUIDELLM_REQUESTS * GUIDELLM_OUTPUT_TOKENS,
                       rank=str(GUIDELLM_RANK)) == tokens_before + GUIDELLM_REQUESTS * GUIDELLM_OUTPUT_TOKENS
