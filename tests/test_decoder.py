"""The lean decode step (server.decoder): transformers' function, in fewer ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import skip_unless_packable, trained_adapter
from server.decoder import lean_decoder
from server.runner import ModelRunner
from trainer.kernels import use_gemm

PROMPTS = [[5, 9, 13, 21, 30, 7], [11, 4], [8, 8, 40, 2]]  # unequal: left padding in the batch's mask


def decode_logits(runner: ModelRunner, ranks: list[int], steps: int = 4) -> tuple[torch.Tensor, list]:
    """Logits of ``steps`` greedy decode steps of one row per rank (the first of :data:`PROMPTS`),
    and the batch's cache after them."""
    runner.reset()
    new = runner.prefill(PROMPTS[:len(ranks)], ranks)
    runner.join(new)
    tokens, out = new.logits.argmax(-1).tolist(), []
    for _ in range(steps):
        logits = runner.decode(tokens)
        out.append(logits)
        tokens = logits.argmax(-1).tolist()
    cache = [(l.keys.clone(), l.values.clone()) for l in runner.batch.cache.layers]
    return torch.stack(out).float(), cache


@pytest.mark.parametrize("fused, gemm", [(False, "standard"), (True, "standard"), (True, "packed")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_decode_computes_the_transformers_step_at_every_rank_and_mixed(tiny_model_dir, fused, gemm, dtype):
    """Same logits and the same cache as transformers' forward, rows at their own ranks (fused q/k/v
    rotated as one tensor, apart each on its own). fp32: to summation order (1e-5); bf16: the lean
    step makes the same roundings in the same order except inside SDPA, whose additive mask meets
    the scores in another kernel path, so 2e-2 (a few bf16 steps of these O(1) logits)."""
    if gemm == "packed":
        skip_unless_packable(dtype)
    model, tok, adapter = trained_adapter(tiny_model_dir)
    model.to(dtype)
    for layer in adapter.layers.values():
        layer.to(dtype)
    if fused:
        adapter.fuse()
    use_gemm(model, gemm)
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    top = adapter.config.r
    for ranks in ([0, 0, 0], [1, 1, 1], [top, top, top], [top, 0, 2]):
        runner.lean = None
        want, want_cache = decode_logits(runner, ranks)
        runner.lean = lean_decoder(model)
        assert runner.lean is not None
        got, got_cache = decode_logits(runner, ranks)
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"ranks {ranks}: {m}")
        for (gk, gv), (wk, wv) in zip(got_cache, want_cache):
            torch.testing.assert_close(gk.float(), wk.float(), rtol=0, atol=atol)
            torch.testing.assert_close(gv.float(), wv.float(), rtol=0, atol=atol)


def test_the_probe_turns_lean_decode_on_for_llama_and_leaves_no_rows(tiny_model_dir):
    model, tok, adapter = trained_adapter(tiny_model_dir)
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    assert runner.enable_lean_decode()
    assert runner.lean is not None and runner.batch.size == 0


def test_lean_decode_refuses_what_it_does_not_compute(tiny_model_dir):
    """An extra module in a layer (as Qwen3's q_norm), a sliding window, an unknown architecture:
    None, and the runner keeps transformers' forward."""
    model, tok, adapter = trained_adapter(tiny_model_dir)
    assert lean_decoder(model) is not None
    model.config.sliding_window = 16
    assert lean_decoder(model) is None
    model.config.sliding_window = None
    model.config.model_type = "gemma"  # (1 + w) RMSNorm, scaled embeddings: not this function
    assert lean_decoder(model) is None
    model.config.model_type = "llama"
    model.model.layers[1].self_attn.q_norm = nn.Identity()
    assert lean_decoder(model) is None
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    assert not runner.enable_lean_decode() and runner.lean is None


def test_a_probe_that_disagrees_keeps_transformers(tiny_model_dir, monkeypatch):
    """If the lean step computed something else (here: its RMSNorm off by a factor), the probe
    sees it and the runner decodes through transformers."""
    model, tok, adapter = trained_adapter(tiny_model_dir)
    monkeypatch.setattr("server.decoder._rms_norm", lambda norm, x: 1.5 * norm(x))
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    assert not runner.enable_lean_decode() and runner.lean is None


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_lean_decode_computes_the_transformers_step_of_qwen2_and_mistral(arch):
    """The other architectures it accepts: Qwen2 (biases on q/k/v, fused with the weights) and
    Mistral without a sliding window, each with a nested adapter fused, rows at mixed ranks."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from trainer.inject import AdapterConfig, NestedAdapter

    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa"))
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    else:
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=None, attn_implementation="sdpa"))
    model.eval()
    adapter = NestedAdapter.inject(model, AdapterConfig(r=4))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=0.1)
    adapter.fuse()
    runner = ModelRunner(model, adapter, pad_id=0)
    assert runner.enable_lean_decode()
    lean = runner.lean
    for ranks in ([0, 0, 0], [4, 1, 2]):
        runner.lean = None
        want, _ = decode_logits(runner, ranks)
        runner.lean = lean
        got, _ = decode_logits(runner, ranks)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"{arch} ranks {ranks}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forwards_run_lean_and_compute_what_transformers_computes(tiny_model_dir, dtype, monkeypatch):
    """With mixed forwards on, a ragged prefill, a piece alone and a piece mixed into a decode step
    go through the lean layers too (each token at its own position and rank, the cache routing
    K/V and attention): the same logits as transformers' forward (fp32 1e-5; bf16 2e-2, as above)."""
    from server.decoder import LeanDecoder

    model, tok, adapter = trained_adapter(tiny_model_dir)
    model.to(dtype)
    for layer in adapter.layers.values():
        layer.to(dtype)
    adapter.fuse()
    runner = ModelRunner(model, adapter, tok.pad_token_id)
    assert runner.enable_mixed() and runner.ragged
    assert runner.enable_lean_decode()
    calls = []
    real = LeanDecoder.packed
    monkeypatch.setattr(LeanDecoder, "packed", lambda self, *a: calls.append(len(a[0])) or real(self, *a))
    probe, top = [3, 9, 14, 2, 27, 5, 11], adapter.config.r  # 7 tokens: _probe pieces them 3 + 4
    lean = runner.lean
    for ranks in ([top, 1], [0, 0]):
        runner.lean = None
        want = runner._probe(probe, ranks, mixed=True)
        assert not calls
        runner.lean = lean
        got = runner._probe(probe, ranks, mixed=True)
        assert len(calls) == 3  # the ragged prefill, the piece alone, the mixed step
        calls.clear()
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"ranks {ranks}: {m}")
