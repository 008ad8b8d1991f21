"""Fault isolation in the engine: a request that fails, fails alone; the batch and the engine go
on, with the outputs they would have had. Only a model that cannot run stops the engine, and
health says so; a stuck step is reported while it is stuck."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import load_tiny
from server.engine import Engine, EngineConfig, GenerationRequest
from server.errors import EngineDead
from server.runner import ModelRunner
from server.sampling import SamplingParams
from conftest import PROMPTS, Collector, make_engine, reference, run_all


def greedy(n: int = 8) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)


def expected_text(setup, ids: list[int], rank: int, n: int) -> str:
    return setup[1].decode(reference(setup, ids, rank, n)[0], skip_special_tokens=True)


def assert_alone_failed(setup, good: list[GenerationRequest], bad: GenerationRequest, message: str) -> None:
    """``bad`` failed with ``message``; every request in ``good`` got exactly its solo output."""
    assert bad.sink.final.finish_reason == "error" and message in bad.sink.final.error, bad.sink.final
    for r in good:
        assert r.sink.final.finish_reason in ("length", "stop")
        assert r.sink.text == expected_text(setup, r.prompt_ids, r.rank, r.params.max_new_tokens)


def test_a_seed_torch_cannot_take_fails_that_request_alone(setup):
    """The HTTP layer refuses such seeds; the engine still must not die of one."""
    tok = setup[1]
    engine = make_engine(setup, max_batch_size=4)
    good = [GenerationRequest(tok(p)["input_ids"], k, greedy(), Collector()) for p, k in zip(PROMPTS, [8, 2])]
    bad = GenerationRequest(tok(PROMPTS[2])["input_ids"], 4, SamplingParams(temperature=1.0, seed=10**30),
                            Collector())
    run_all(engine, [good[0], bad, good[1]])
    assert_alone_failed(setup, good, bad, "Overflow")
    assert engine.dead is None and engine.health() is None


def test_a_prompt_the_model_cannot_embed_fails_alone_and_the_batch_goes_on(setup):
    """A batched prefill that raises (a token id past the embedding table) is retried row by row."""
    tok = setup[1]
    engine = make_engine(setup, max_batch_size=4)
    steps = []
    engine.on_step = steps.append
    good = [GenerationRequest(tok(p)["input_ids"], k, greedy(), Collector()) for p, k in zip(PROMPTS, [0, 8, 1])]
    bad = GenerationRequest([5, 10**6, 7], 4, greedy(), Collector())
    run_all(engine, [good[0], good[1], bad, good[2]])
    assert_alone_failed(setup, good, bad, "IndexError")
    assert sum(s.retried_apart for s in steps) == 1 and engine.dead is None
    assert sum(status == "error" for s in steps for _, status, _ in s.finished) == 1


class FaultyRunner(ModelRunner):
    """The real runner with one injected fault: a decode step whose batch holds a row at rank
    ``poison`` raises in the last decoder layer, after the other layers have written the cache.
    (No request can make a CPU decode raise on its own; the injection stands for a kernel fault.)"""

    def __init__(self, model, adapter, pad_id, poison: int):
        super().__init__(model, adapter, pad_id)
        self.poison, self.armed = poison, False
        self._hook = model.model.layers[-1].register_forward_pre_hook(self._maybe_raise)

    def _maybe_raise(self, module, args):
        if self.armed:
            raise RuntimeError(f"injected fault for rank {self.poison}")

    def decode(self, tokens):
        self.armed = self.poison in self.batch.ranks
        try:
            return super().decode(tokens)
        finally:
            self.armed = False


def test_a_decode_that_raises_is_retried_apart_and_the_other_rows_answer_exactly(setup):
    model, tok, adapter = setup
    runner = FaultyRunner(model, adapter, tok.pad_token_id, poison=1)
    try:
        engine = Engine(runner, tok, EngineConfig(max_batch_size=4), adapter.config.ranks, auto_rank=lambda: 8)
        good = [GenerationRequest(tok(p)["input_ids"], k, greedy(10), Collector())
                for p, k in zip(PROMPTS, [8, 0, 2])]
        bad = GenerationRequest(tok(PROMPTS[3])["input_ids"], 1, greedy(10), Collector())
        run_all(engine, [good[0], bad, *good[1:]])
    finally:
        runner._hook.remove()
    assert_alone_failed(setup, good, bad, "injected fault for rank 1")
    assert bad.sink.final.completion_tokens == 1  # its prefill worked; its first decode did not
    assert engine.dead is None


def test_a_model_that_cannot_run_stops_the_engine_and_health_says_so(tiny_model_dir):
    """Weights gone (as a lost device leaves them): the probe fails too, so the engine stops,
    answers everyone, and refuses new requests; health reports why."""
    model, tok = load_tiny(tiny_model_dir)
    model.to("meta")
    engine = Engine(ModelRunner(model, None, tok.pad_token_id), tok, EngineConfig(), [], auto_rank=lambda: 0)
    reqs = [GenerationRequest(tok(p)["input_ids"], 0, greedy(), Collector()) for p in PROMPTS[:3]]
    run_all(engine, reqs)
    assert all(r.sink.final.finish_reason == "error" for r in reqs)
    assert engine.dead is not None and "probe" in engine.health()
    with pytest.raises(EngineDead, match="must be restarted"):
        engine.submit(GenerationRequest([5], 0, greedy(), Collector()))


def test_a_stuck_step_is_reported_while_stuck_and_health_recovers(setup):
    """The step is stuck by construction: the request's sink (called inside the step) blocks
    until the test lets it go."""
    tok = setup[1]
    engine = make_engine(setup, step_timeout_s=0.2)
    release, stalls = threading.Event(), []
    engine.on_stall = stalls.append
    done = Collector()

    def blocking_sink(ev):
        if not done.events:
            release.wait(30)
        done(ev)

    engine.start()
    try:
        engine.submit(GenerationRequest(tok(PROMPTS[0])["input_ids"], 8, greedy(4), blocking_sink))
        end = time.monotonic() + 30
        while not stalls and time.monotonic() < end:
            time.sleep(0.02)
        assert stalls and stalls[0] > 0.2 and engine.stalls == 1
        assert "an engine step has run for" in engine.health()
        release.set()
        assert done.done.wait(30) and done.final.finish_reason == "length"
        assert engine.health() is None and engine.stalls == 1  # reported once, and over
    finally:
        release.set()
        engine.stop()


def test_deadlines_and_aborts_free_the_slot_whatever_the_machine_speed(setup):
    """Every timing is fixed by construction: ``expired`` is past its deadline before the engine
    sees it; ``long`` is aborted by its own first event; ``late``'s deadline passes while it runs
    (its first event moves it to now). One batch slot: each must leave for the next to start."""
    tok = setup[1]
    engine = make_engine(setup, max_batch_size=1)
    ids = tok(PROMPTS[0])["input_ids"]
    late_req = []  # filled below: its sink needs the request
    long, expired, after = Collector(then=lambda ev: engine.abort("long")), Collector(), Collector()
    late = Collector(then=lambda ev: setattr(late_req[0], "deadline", time.monotonic()))
    late_req.append(GenerationRequest(ids, 8, SamplingParams(max_new_tokens=400), late))
    reqs = {"long": GenerationRequest(ids, 8, SamplingParams(max_new_tokens=400), long, id="long"),
            "expired": GenerationRequest(ids, 8, greedy(3), expired, deadline=time.monotonic() - 1),
            "late": late_req[0]}
    run_all(engine, [*reqs.values(), GenerationRequest(ids, 8, greedy(3), after)])
    assert long.final.finish_reason == "abort" and long.final.completion_tokens < 400
    assert expired.final.finish_reason == "timeout" and expired.final.completion_tokens == 0
    assert late.final.finish_reason == "timeout" and late.final.completion_tokens < 400
    assert after.final.finish_reason == "length" and engine.running == 0


def test_isolation_keeps_the_plain_path_exact(setup):
    """With no fault, the isolated decode is the plain decode (same logits, bit for bit)."""
    from server import isolation

    model, tok, adapter = setup
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    out, parts = isolation.prefill(runner, prompts, [8, 0, 2])
    runner.join(parts[0])
    step = isolation.decode(runner, out.logits.argmax(-1).tolist())
    plain = ModelRunner(model, adapter, tok.pad_token_id)
    plain.join(plain.prefill(prompts, [8, 0, 2]))
    assert out.kept == [0, 1, 2] and not step.errors
    torch.testing.assert_close(step.logits, plain.decode(out.logits.argmax(-1).tolist()), atol=0, rtol=0)
