"""Rank-0 decode steps as one compiled graph (server.compiled): the lean step's function, and only
where it is the function the rows need."""

from __future__ import annotations

import pytest
import torch

from conftest import trained_adapter
from server.runner import ModelRunner
from test_decoder import decode_logits
from trainer.kernels import use_gemm


class Counted:
    """The compiled step, counting its calls (it still computes)."""

    def __init__(self, compiled):
        self.compiled, self.calls = compiled, 0

    def step(self, *args):
        self.calls += 1
        return self.compiled.step(*args)


@pytest.fixture(scope="module")
def compiled_runner(tiny_model_dir):
    """A fused, packed-GEMM runner whose rank-0 steps run compiled (compiled once for the module:
    one graph for every batch size)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("the compiled graph's frozen GEMMs need oneDNN")
    model, tok, adapter = trained_adapter(tiny_model_dir)
    adapter.fuse()
    use_gemm(model, "packed")
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    assert runner.enable_lean_decode()
    assert runner.enable_compiled_decode()
    assert runner.batch.size == 0  # the probe left no rows
    return runner


def test_compiled_rank0_steps_compute_the_lean_step_and_fill_the_same_cache(compiled_runner):
    """Logits and the cache after four steps equal the lean step's, for several rows (B symbolic) and
    for one (padded to two: the same graph), fp32 to summation order: the compiled kernels keep
    the same float32 arithmetic, in another order."""
    runner, compiled = compiled_runner, compiled_runner.compiled
    for rows in (3, 1):
        ranks = [0] * rows
        runner.compiled = counted = Counted(compiled)
        got, got_cache = decode_logits(runner, ranks)
        assert counted.calls == 4
        runner.compiled = None
        want, want_cache = decode_logits(runner, ranks)
        runner.compiled = compiled
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{rows} rows: {m}")
        for (gk, gv), (wk, wv) in zip(got_cache, want_cache):
            torch.testing.assert_close(gk, wk, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-5)
    # one graph served both (one row runs padded to two): start-up compiles once, not once per batch shape
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(type(compiled)._forward.__code__)) == 1


def test_rows_with_an_adapter_rank_or_merged_weights_never_run_the_base_graph(compiled_runner):
    """The graph is the base model as compiled: a batch with any row above rank 0, or any step
    while a rank is merged into the weights, runs the lean step (and gets the adapter's function:
    the rank-8 row's logits are not the base model's); rank 0 merged is the plain base weights
    again, and runs it."""
    runner, compiled = compiled_runner, compiled_runner.compiled
    adapter = runner.adapter
    runner.compiled = counted = Counted(compiled)
    try:
        mixed, _ = decode_logits(runner, [0, adapter.config.r, 0])
        assert counted.calls == 0
        base, _ = decode_logits(runner, [0, 0, 0])
        assert counted.calls == 4
        assert not torch.allclose(mixed[0, 1], base[0, 1], atol=1e-3)  # the adapter changes row 1's first step
        torch.testing.assert_close(mixed[0, 0], base[0, 0], rtol=1e-4, atol=1e-5)  # row 0 is the base model either way
        runner.remerge(adapter.config.r)
        try:
            merged, _ = decode_logits(runner, [0, 0, 0])  # rank 0 now means "subtract the merged rank"
            assert counted.calls == 4
            torch.testing.assert_close(merged, base, rtol=1e-3, atol=1e-4)
            runner.remerge(0)  # the plain base weights again (--merge-rank auto when rank 0 leads): compiled
            again, _ = decode_logits(runner, [0, 0, 0])
            assert counted.calls == 8
            torch.testing.assert_close(again, base, rtol=1e-4, atol=1e-5)
        finally:
            adapter.unmerge()
            runner._coeff_key = None
    finally:
        runner.compiled = compiled


def test_the_server_compiles_on_request_and_says_so(tiny_model_dir, tiny_checkpoint):
    """``--compile decode`` leaves the server with a checked compiled step, shown in ``/ranks``'s
    ``compute``; asked for where it cannot be (no lean step to check it against), start-up stops
    with an error that names the flag instead of serving without it; ``--compile auto`` serves
    without it there."""
    from server.app import load_state
    from server.settings import ServerSettings

    base = dict(model=str(tiny_model_dir), adapter=str(tiny_checkpoint), calibrate_steps=0)
    with pytest.raises(ValueError, match="--compile decode"):
        load_state(ServerSettings(**base, compile="decode", decode="transformers"))
    # auto: compiled where it can be; where it cannot, the server serves without it
    assert load_state(ServerSettings(**base, compile="auto", decode="transformers")).engine.runner.compiled is None
    st = load_state(ServerSettings(**base, compile="decode"))
    assert st.engine.runner.compiled is not None and st.compute_info()["compiled_rank0_decode"] is True
    assert load_state(ServerSettings(**base)).compute_info()["compiled_rank0_decode"] is False


def test_the_openai_sdk_gets_from_a_compiled_server_what_the_default_server_answers(tiny_model_dir, tiny_checkpoint):
    """The openai SDK against two real servers, ``--compile decode`` and the default: at rank 0 the
    same greedy tokens with the same logprobs (fp32, to summation order), alone (one row, padded to
    two in the graph) and four streams at once (several rows), and the adapter's rank still its
    own function on the compiled server."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from conftest import ServerProcess

    args = ("--model", str(tiny_model_dir), "--adapter", str(tiny_checkpoint), "--calibrate-steps", "0")
    servers = [ServerProcess(*args, "--compile", "decode"), ServerProcess(*args)]
    try:
        answers = []
        for srv in servers:
            sdk = OpenAI(base_url=srv.wait_ready(timeout=600).url + "/v1", api_key="-", max_retries=0)

            def complete(prompt, model="mlora@0"):
                out = sdk.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
                return out.choices[0].logprobs.tokens, out.choices[0].logprobs.token_logprobs

            prompts = ["Ada has 12 apples", "Ben", "How many coins does Chen keep?", "The sum of"]
            alone = complete(prompts[0])
            with ThreadPoolExecutor(4) as pool:
                together = list(pool.map(complete, prompts))
            answers.append((alone, together, complete(prompts[0], "mlora@8")))
        (c_alone, c_together, c_rank8), (d_alone, d_together, d_rank8) = answers
        for (ct, cl), (dt, dl) in [(c_alone, d_alone), *zip(c_together, d_together), (c_rank8, d_rank8)]:
            assert ct == dt
            assert cl == pytest.approx(dl, abs=1e-4)
        assert c_rank8 != c_alone  # rank 8 is the adapter's function, not the base model's
    finally:
        for srv in servers:
            srv.stop()
