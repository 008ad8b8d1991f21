"""The engine without HTTP: batching never changes results; sampling, stops, aborts, deadlines."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, Collector, make_engine, reference, run_all
from server.engine import Engine, GenerationRequest
from server.stops import partial_stop
from server.runner import ModelRunner
from server.sampling import SamplingParams, filter_logits

def test_concurrent_mixed_rank_greedy_equals_one_at_a_time(setup):
    model, tok, adapter = setup
    ranks = [8, 0, 2, 1, 4, 8, 0]
    prompts = PROMPTS + PROMPTS[:1]  # the last: the first prompt again, at rank 0
    engine = make_engine(setup, max_batch_size=4)  # 7 requests through 4 slots: joins and leaves
    reqs = [GenerationRequest(tok(p)["input_ids"], k, SamplingParams(max_new_tokens=10 + 3 * i), Collector())
            for i, (p, k) in enumerate(zip(prompts, ranks))]
    run_all(engine, reqs)
    for r, k in zip(reqs, ranks):
        expected, _ = reference(setup, r.prompt_ids, k, r.params.max_new_tokens)
        assert r.sink.final.rank == k
        assert r.sink.text == tok.decode(expected, skip_special_tokens=True), f"rank {k}"
    assert not reqs[6].sink.text.startswith(reqs[0].sink.text[:10])  # the rank really applies per row


def test_full_rank_serves_the_matryoshka_training_forward(setup):
    """The engine at rank r computes what training minimised the loss for, W x + B diag(p) A x
    (rule trained), batched beside other ranks; the paper's rule s(r)·1ᵣ would not."""
    model, tok, adapter = setup
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    with torch.no_grad():
        adapter.set_training_coeffs()
        trained = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    served = runner.prefill(prompts, [8, 2]).logits[0]
    torch.testing.assert_close(served, trained, atol=1e-5, rtol=1e-5)  # fp32: the same sums, batched
    adapter.set_inference_rule("paper")
    try:
        paper = ModelRunner(model, adapter, tok.pad_token_id).prefill(prompts[:1], [8]).logits[0]
        assert (paper - trained).abs().max() > 1e-2
    finally:
        adapter.set_inference_rule("trained")


def test_batched_step_logits_match_the_reference_within_tolerance(setup):
    model, tok, adapter = setup
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    ranks = [4, 0, 8]
    refs = [reference(setup, p, k, 6)[1] for p, k in zip(prompts, ranks)]
    new = runner.prefill(prompts[:2], ranks[:2])  # two rows first …
    runner.join(new)
    tokens = new.logits.argmax(-1).tolist()
    late = runner.prefill(prompts[2:], ranks[2:])  # … a third joins between decode steps
    runner.join(late)
    steps = [[new.logits[0], new.logits[1]]]
    tokens.append(int(late.logits.argmax()))
    first_late = late.logits[0]
    for _ in range(4):
        out = runner.decode(tokens)
        steps.append(list(out))
        tokens = out.argmax(-1).tolist()
    torch.testing.assert_close(first_late, refs[2][0], atol=1e-4, rtol=1e-4)
    for s, step in enumerate(steps):
        for row in range(2):
            torch.testing.assert_close(step[row], refs[row][s], atol=1e-4, rtol=1e-4)
    for s, step in enumerate(steps[1:], 1):
        torch.testing.assert_close(step[2], refs[2][s], atol=1e-4, rtol=1e-4)
    runner.leave([2])  # rows 0 and 1 leave; row 2 keeps decoding correctly
    out = runner.decode(tokens[2:])
    torch.testing.assert_close(out[0], refs[2][5], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ranks", [[8, 8, 8], [8, 0, 2]])
def test_an_unpadded_prefill_leaves_what_a_padded_one_leaves(setup, ranks):
    """Unequal prompts prefilled end to end in one (1, Σn) forward (RaggedCache): the same
    next-token logits, and a cache from which the rows decode as from the padded prefill's."""
    model, tok, adapter = setup
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    assert runner.enable_mixed() and runner.ragged
    prompts = [tok(p)["input_ids"] for p in (PROMPTS[3], PROMPTS[1], PROMPTS[0])]
    assert len({len(p) for p in prompts}) == 3
    out = {}
    for ragged in (False, True):
        runner.reset()
        runner.ragged = ragged
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            new = runner.prefill(prompts, ranks)
        calls = sum(e.name == "aten::_scaled_dot_product_flash_attention_for_cpu" for e in prof.events())
        runner.join(new)
        out[ragged] = (new.logits, runner.decode(new.logits.argmax(-1).tolist()), runner.batch.mask.clone(), calls)
    for a, b in zip(out[False][:2], out[True][:2]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[False][2], out[True][2])  # the same left-padded layout
    layers = model.config.num_hidden_layers
    assert (out[False][3], out[True][3]) == (layers, layers * len(prompts))  # one attention per prompt: unpadded


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(setup):
    _, tok, _ = setup
    texts = []
    for seed in [1, 1, 2]:
        engine = make_engine(setup)
        c = Collector()
        params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        run_all(engine, [GenerationRequest(tok(PROMPTS[0])["input_ids"], 8, params, c)])
        texts.append(c.text)
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_stop_strings_cut_the_text_and_are_never_streamed(setup):
    _, tok, _ = setup
    free = Collector()
    run_all(make_engine(setup), [GenerationRequest(tok(PROMPTS[3])["input_ids"], 8,
                                                   SamplingParams(max_new_tokens=20), free)])
    stop = free.text[5:8]
    assert len(stop) == 3
    c = Collector()
    run_all(make_engine(setup), [GenerationRequest(tok(PROMPTS[3])["input_ids"], 8,
                                                   SamplingParams(max_new_tokens=20, stop=[stop]), c)])
    assert c.text == free.text[:free.text.index(stop)] and c.final.finish_reason == "stop"
    assert stop not in c.text
    assert partial_stop("abcQues", ["Question:"]) == 4 and partial_stop("abc", ["xyz"]) == 0


def test_max_new_tokens_gives_length_and_usage(setup):
    _, tok, _ = setup
    c = Collector()
    ids = tok(PROMPTS[0])["input_ids"]
    run_all(make_engine(setup), [GenerationRequest(ids, 2, SamplingParams(max_new_tokens=5), c)])
    f = c.final
    assert (f.finish_reason, f.completion_tokens, f.prompt_tokens, f.rank) == ("length", 5, len(ids), 2)
    assert 0 <= f.queue_s <= f.ttft_s <= f.total_s


def test_a_row_done_on_its_first_token_is_answered_without_joining_the_batch(setup):
    """One token asked, or echo-only: answered from the prefill; the batch never holds its cache
    (for a long prompt that copy is the whole batch padded to its length). A prompt prefilled
    with them still joins, and the running row decodes on undisturbed."""
    _, tok, _ = setup
    engine = make_engine(setup, max_batch_size=8, prefill_chunk_tokens=16)
    running = GenerationRequest(tok(PROMPTS[0])["input_ids"], 8, SamplingParams(max_new_tokens=8), Collector())
    engine.submit(running)
    engine.step()
    joins = []  # (prefilled rows offered, the rows of them that joined)
    real_join = engine.runner.join
    engine.runner.join = lambda new, rows=None: (joins.append((len(new.ranks), rows)), real_join(new, rows))
    one = GenerationRequest(tok(PROMPTS[1])["input_ids"], 2, SamplingParams(max_new_tokens=1), Collector())
    echo = GenerationRequest(tok(PROMPTS[2])["input_ids"], 0, SamplingParams(max_new_tokens=0), Collector(),
                             prompt_logprobs=1)
    goes_on = GenerationRequest(tok(PROMPTS[4])["input_ids"], 4, SamplingParams(max_new_tokens=3), Collector())
    long = GenerationRequest(long_prompt(tok, 60), 8, SamplingParams(max_new_tokens=1), Collector())
    for r in (one, echo, goes_on, long):
        engine.submit(r)
    engine.step()  # one, echo and goes_on prefilled together (the long one starts in pieces)
    assert joins == [(3, [2])] and engine.runner.batch.size == 2  # of the three, goes_on alone joined
    assert engine.runner.batch.mask[1].sum() == len(goes_on.prompt_ids) + 1  # its own tokens, no one else's
    assert one.sink.done.is_set() and echo.sink.done.is_set()
    assert (one.sink.final.finish_reason, one.sink.final.completion_tokens) == ("length", 1)
    assert echo.sink.final.completion_tokens == 0
    step_until_done(engine, setup, [running, goes_on, long, one])
    assert joins == [(3, [2])]  # the long prompt's row never joined either
    assert engine.runner.batch.size == 0


def test_invalid_requests_and_overload_are_refused_up_front(setup):
    from server.errors import InvalidRequest, Overloaded

    _, tok, _ = setup
    engine = make_engine(setup, max_queue=1, context_length=64)  # not started: the queue fills
    ok = GenerationRequest([5, 6], 8, SamplingParams(max_new_tokens=4), Collector())
    with pytest.raises(InvalidRequest, match=r"valid ranks are \[0, 1, 2, 4, 8\]"):
        engine.submit(GenerationRequest([5], 3, SamplingParams(), Collector()))
    with pytest.raises(InvalidRequest, match="exceeds the model's context of 64"):
        engine.submit(GenerationRequest([5] * 40, 8, SamplingParams(max_new_tokens=30), Collector()))
    engine.submit(ok)
    with pytest.raises(Overloaded, match="limit --max-queue 1"):
        engine.submit(GenerationRequest([5], 8, SamplingParams(max_new_tokens=4), Collector()))


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [True, True, False, False, False]
    probs = logits.softmax(-1)  # ≈ [.64, .24, .09, .03, .01]
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.8)).tolist()
    assert kept == [True, True, False, False, False] and probs[0] < 0.8 < probs[:2].sum()


def assert_served_like_references(setup, engine: Engine, ranks: list[int], n: int, merge) -> None:
    """PROMPTS[:len(ranks)] at ``ranks`` through ``engine``, after ``merge()``, give the texts the
    unmerged adapter gives one request at a time (references computed before merging)."""
    _, tok, _ = setup
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:len(ranks)]]
    expected = [tok.decode(reference(setup, p, k, n)[0], skip_special_tokens=True) for p, k in zip(prompts, ranks)]
    merge()
    reqs = [GenerationRequest(p, k, SamplingParams(max_new_tokens=n), Collector()) for p, k in zip(prompts, ranks)]
    run_all(engine, reqs)
    assert [r.sink.text for r in reqs] == expected


def test_merged_rank_serves_every_rank_like_the_unmerged_adapter(setup):
    """--merge-rank: rank m folded into W, other rows add c_k − c_m; outputs unchanged."""
    _, _, adapter = setup
    try:
        assert_served_like_references(setup, make_engine(setup, max_batch_size=4), [8, 0, 2, 8], 8,
                                      lambda: adapter.merge(8))
    finally:
        adapter.unmerge()


@pytest.mark.parametrize("stop", [[], ["e"]])
def test_a_request_that_does_not_stream_gets_the_same_text_in_one_final_event(setup, stop):
    _, tok, _ = setup
    ids = tok(PROMPTS[3])["input_ids"]
    streamed, whole = Collector(), Collector()
    params = SamplingParams(max_new_tokens=12, stop=stop)
    run_all(make_engine(setup), [GenerationRequest(ids, 4, params, streamed),
                                 GenerationRequest(ids, 4, params, whole, stream=False)])
    assert len(whole.events) == 1 and whole.final.done
    assert whole.final.text == streamed.text and whole.final.finish_reason == streamed.final.finish_reason
    assert whole.final.completion_tokens == streamed.final.completion_tokens


def test_auto_merge_re_merges_mid_generation_without_changing_any_output(setup):
    """--merge-rank auto: rows prefilled with rank 8 merged keep their caches when the engine
    re-merges rank 2 (the majority) between steps; outputs unchanged."""
    from server.merging import AutoMerge

    _, _, adapter = setup
    try:
        engine = make_engine(setup, max_batch_size=4)
        engine.auto_merge = AutoMerge(merged=8, dwell_s=0.0, half_life_s=1.0)
        merges = []
        engine.on_step = lambda s: merges.append(s.merged) if s.merged else None
        assert_served_like_references(setup, engine, [8, 2, 2, 0], 10, lambda: adapter.remerge(8))
        assert [k for k, _ in merges] == [2] and adapter.merged_rank == 2
    finally:
        adapter.unmerge()


# -- chunked prefill: a long prompt comes in a piece per step while the running rows decode ------------
def long_prompt(tok, n: int = 40) -> list[int]:
    ids = []
    while len(ids) < n:
        ids += tok(" ".join(PROMPTS))["input_ids"]
    return ids[:n]


@pytest.mark.parametrize("path", ["apart", "packed", "packed, attention split"])
@pytest.mark.parametrize("scored", [None, 3])
def test_a_prompt_prefilled_in_pieces_gives_the_whole_prefill_row(setup, scored, path, monkeypatch):
    """Pieces of 7 tokens (the last one short) end with the logits, cache and prompt logprobs of one
    whole prefill, and decoding after them continues exactly: run as plain forwards, as packed
    forwards with no rows (``enable_mixed``), and so with each piece's attention split in two."""
    from server import kvcache
    from server.runner import PartialPrefill

    model, tok, adapter = setup
    ids = long_prompt(tok, 40)
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    if path != "apart":
        assert runner.enable_mixed()
    if path.endswith("split"):
        monkeypatch.setattr(kvcache, "SPLIT_MIN_QUERIES", 2)
    whole = runner.prefill([ids], [4], [scored])
    part = PartialPrefill(ids, 4, scored)
    pieces = [runner.prefill_piece(part, 7) for _ in range(6)]
    assert pieces[:5] == [None] * 5 and pieces[5] is not None and part.remaining == 0
    done = pieces[5]
    torch.testing.assert_close(done.logits, whole.logits, atol=1e-4, rtol=1e-4)
    assert done.positions.tolist() == whole.positions.tolist() == [40]
    if scored:
        for a, b in zip(done.prompt_logprobs[0][1:], whole.prompt_logprobs[0][1:]):
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    nxt = int(whole.logits.argmax())
    outs = []
    for new in (whole, done):
        runner.reset()
        runner.join(new)
        outs.append(runner.decode([nxt]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def test_running_rows_decode_between_the_pieces_of_a_long_prompt(setup):
    """Chunked prefill: while an 80-token prompt comes in 16 tokens per step, the running row gets
    a token every step; the long request then answers exactly what it answers alone."""
    model, tok, adapter = setup
    engine = make_engine(setup, max_batch_size=4, prefill_chunk_tokens=16)
    steps = []
    engine.on_step = steps.append
    short = GenerationRequest(tok(PROMPTS[1])["input_ids"], 2, SamplingParams(max_new_tokens=12), Collector())
    assert len(short.prompt_ids) <= 16
    engine.submit(short)
    engine.step()  # the short row is running
    long = GenerationRequest(long_prompt(tok, 80), 8, SamplingParams(max_new_tokens=6), Collector())
    engine.submit(long)
    for _ in range(5):
        engine.step()
    assert [s.prefill_tokens for s in steps[1:6]] == [16] * 5  # one piece per step, never the whole prompt
    assert [s.generated[2] for s in steps[1:6]] == [1] * 5  # the running row decoded in every one of them
    # its last piece rode on step 5's decode (one forward): its first token came then, it decodes from step 6
    assert [s.generated[8] for s in steps[1:5]] == [0] * 4 and steps[5].generated[8] == 1
    step_until_done(engine, setup, [short, long])


def step_until_done(engine, setup, reqs) -> None:
    """Step the engine until every request is done; each answers what it answers alone."""
    _, tok, _ = setup
    while not all(r.sink.done.is_set() for r in reqs):
        engine.step()
    for r in reqs:
        want, _ = reference(setup, r.prompt_ids, r.rank, r.params.max_new_tokens)
        assert r.sink.text == tok.decode(want, skip_special_tokens=True)


def running_rows_and_a_part(setup, runner):
    from server.runner import PartialPrefill

    _, tok, _ = setup
    runner.reset()
    runner.join(runner.prefill([tok(PROMPTS[0])["input_ids"], tok(PROMPTS[2])["input_ids"]], [8, 0]))
    part = PartialPrefill(long_prompt(tok, 30), 2)
    runner.prefill_piece(part, 9)
    return part


@pytest.mark.parametrize("fused", [True, False])
def test_a_piece_mixed_into_a_decode_step_computes_what_they_compute_apart(setup, fused):
    """One forward of the rows' decode tokens and a prompt's next piece (rows at ranks 8 and 0,
    the piece at rank 2): the rows' logits, the finished prompt's logits, and every decode after
    it (the caches both wrote) equal a separate decode step and a separate piece."""
    model, tok, adapter = setup
    adapter.fuse() if fused else adapter.unfuse()
    try:
        runner = ModelRunner(model, adapter, tok.pad_token_id)
        assert runner.enable_mixed()
        outs = []
        for mixed in (False, True):
            part = running_rows_and_a_part(setup, runner)
            tokens = [11, 12]
            if mixed:
                rows, new = runner.decode_with_piece(tokens, part, 8)  # tokens 9..16: not the last piece
                assert new is None and part.done == 17
                rows2, new = runner.decode_with_piece([13, 14], part, 20)  # the rest: 13 tokens
            else:
                rows = runner.decode(tokens)
                assert runner.prefill_piece(part, 8) is None
                rows2 = runner.decode([13, 14])
                new = runner.prefill_piece(part, 20)
            assert new is not None and part.remaining == 0 and new.positions.tolist() == [30]
            runner.join(new)
            after = [runner.decode([15, 16, 17]), runner.decode([18, 19, 20])]
            outs.append(torch.cat([rows, rows2, new.logits, *after]))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    finally:
        adapter.fuse()


def test_a_mixed_step_that_raises_runs_its_parts_apart(setup, monkeypatch):
    """If the mixed forward fails, the batch is restored from its snapshot and the decode and the
    piece run apart: nothing is lost, the results are the separate ones."""
    from server import isolation

    model, tok, adapter = setup
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    assert runner.enable_mixed()
    part = running_rows_and_a_part(setup, runner)
    expected_rows = runner.decode([11, 12])
    expected_piece = runner.prefill_piece(part, 30)
    part = running_rows_and_a_part(setup, runner)

    def half_then_raise(tokens, part, n):
        for layer in runner.batch.cache.layers[:1]:  # as a forward that wrote part of the cache would
            layer.update(layer.keys[:, :, -1:] * 0 + 7, layer.values[:, :, -1:] * 0 + 7)
        raise RuntimeError("mixed forward failed")

    monkeypatch.setattr(runner, "decode_with_piece", half_then_raise)
    out, (new, error) = isolation.decode_with_piece(runner, [11, 12], part, 30)
    assert error is None and out.errors == {} and out.kept == [0, 1]
    torch.testing.assert_close(out.logits, expected_rows, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new.logits, expected_piece.logits, atol=1e-4, rtol=1e-4)


def test_a_piece_is_sized_to_add_its_budget_of_a_decode_step():
    from server.engine import StepCost, piece_tokens

    assert piece_tokens(0.8, None, None, 256, 2000) == 16  # nothing measured yet: a small first piece
    assert piece_tokens(0.8, 0.2, 0.004, 256, 2000) == 40  # 0.8 · 0.2 s / 4 ms per token
    assert piece_tokens(0.8, 0.2, 0.0001, 256, 2000) == 256  # never past --prefill-chunk-tokens
    assert piece_tokens(0.8, 0.2, 0.004, 256, 13) == 13  # nor past the prompt's rest
    assert piece_tokens(0.8, 0.2, 1.0, 256, 2000) == 8  # at least one quantum: the prompt always advances
    cost = StepCost()
    cost.piece(16, 1.0)  # mixed in, before any plain decode step: nothing to subtract from, ignored
    assert cost.token_s is None
    assert cost.stale(8)  # no decode step measured: one plain step first
    cost.decode(0.2, rows=8)
    assert not cost.stale(8) and not cost.stale(9)  # just measured: mix now, even if the batch changed since
    cost.piece(16, 0.36)  # 0.16 s more than a decode step, for 16 tokens
    assert cost.decode_s == 0.2 and cost.token_s == pytest.approx(0.01)
    cost.piece(10, 0.5, apart=True)  # a piece run apart costs its own time
    assert cost.token_s == pytest.approx(0.7 * 0.01 + 0.3 * 0.05)
    assert not cost.stale(8) and cost.stale(9)  # a mixed step later, another batch size: measure again
    for _ in range(StepCost.STALE_STEPS - 1):
        cost.piece(16, 0.36)
    assert cost.stale(8)  # the same batch, but STALE_STEPS mixed steps since the plain one
    cost.decode(0.3, rows=9)  # another batch size: its own cost, not averaged with the old one
    assert cost.decode_s == 0.3 and not cost.stale(9)


def test_with_a_budget_pieces_follow_the_measured_costs(setup):
    from server.engine import piece_tokens

    """The engine sizes each piece from what its steps cost: the first piece is the small default,
    later ones follow budget · decode step ÷ cost per token; the answers do not change."""
    _, tok, _ = setup
    engine = make_engine(setup, max_batch_size=4, prefill_chunk_tokens=64, prefill_piece_budget=0.5)
    steps = []
    engine.on_step = steps.append
    short = GenerationRequest(tok(PROMPTS[1])["input_ids"], 2, SamplingParams(max_new_tokens=30), Collector())
    engine.submit(short)
    engine.step()
    engine.step()  # a plain decode step: measured
    long = GenerationRequest(long_prompt(tok, 90), 8, SamplingParams(max_new_tokens=4), Collector())
    engine.submit(long)
    engine.step()
    assert steps[-1].prefill_tokens == 16  # the first piece, before a piece's cost is known
    cost = engine._cost
    expected = piece_tokens(0.5, cost.decode_s, cost.token_s, 64, 90 - 16)
    assert 8 <= expected <= 64
    engine.step()
    assert steps[-1].prefill_tokens == expected
    step_until_done(engine, setup, [short, long])


def test_models_with_sliding_window_attention_keep_pieces_apart(setup, monkeypatch):
    model, tok, adapter = setup
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    monkeypatch.setattr(model.config, "sliding_window", 16, raising=False)
    assert runner.enable_mixed() is False and runner.mixed is False


def test_a_long_prompt_aborted_or_expired_mid_prefill_frees_its_slot(setup):
    _, tok, _ = setup
    engine = make_engine(setup, max_batch_size=1, prefill_chunk_tokens=8, max_prefill_tokens=8)
    aborted = GenerationRequest(long_prompt(tok, 40), 8, SamplingParams(max_new_tokens=4), Collector())
    engine.submit(aborted)
    engine.step()
    engine.step()
    engine.abort(aborted.id)
    nxt = GenerationRequest(long_prompt(tok, 24), 4, SamplingParams(max_new_tokens=4), Collector())
    engine.submit(nxt)
    engine.step()
    assert aborted.sink.final.finish_reason == "abort"
    nxt.deadline = 0.0  # already past
    engine.step()
    assert nxt.sink.final.finish_reason == "timeout" and engine.idle()


def test_a_long_prompt_the_model_cannot_embed_fails_alone(setup):
    """A piece that raises (a token id past the embedding table, in the second piece) fails its
    request; the running row and the engine go on."""
    _, tok, _ = setup
    engine = make_engine(setup, max_batch_size=4, prefill_chunk_tokens=8)
    good = GenerationRequest(tok(PROMPTS[1])["input_ids"], 1, SamplingParams(max_new_tokens=10), Collector())
    bad = GenerationRequest(long_prompt(tok, 12) + [10**6] + long_prompt(tok, 10), 4,
                            SamplingParams(max_new_tokens=4), Collector())
    run_all(engine, [good, bad])
    assert bad.sink.final.finish_reason == "error" and "IndexError" in bad.sink.final.error
    expected, _ = reference(setup, good.prompt_ids, 1, 10)
    assert good.sink.text == tok.decode(expected, skip_special_tokens=True)
    assert engine.dead is None
