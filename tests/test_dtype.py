"""``--dtype auto`` by capability: bf16 only on a CPU that computes it natively and measures it
faster (cached), fp32 otherwise; and the engine's batching invariant holds in bf16 too."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import Collector, load_tiny, run_all
from server.engine import Engine, EngineConfig, GenerationRequest
from server.runner import ModelRunner
from server.sampling import SamplingParams
from trainer import models
from trainer.inject import AdapterConfig, NestedAdapter

AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, flags", [(AVX2_ONLY, set()), (AVX512_BF16, {"avx512_bf16"}), (ARM, {"bf16"})])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, cpuinfo, flags):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert models.cpu_bf16_flags(tmp_path / "cpuinfo") == flags


def test_no_native_bf16_means_fp32_without_measuring(tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text(AVX2_ONLY)
    monkeypatch.setattr(models, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(models, "_time_matmul", lambda dtype: pytest.fail("measured an emulated dtype"))
    assert models.cpu_bf16_speedup(tmp_path) == 0.0
    assert models.resolve_dtype("auto", torch.device("cpu"), cache=tmp_path) == torch.float32


def test_native_bf16_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text(AVX512_BF16)
    monkeypatch.setattr(models, "CPUINFO", tmp_path / "cpuinfo")
    first = models.cpu_bf16_speedup(tmp_path)  # a real measurement (bf16 runs anywhere, emulated here)
    assert first > 0
    (key, value), = json.loads((tmp_path / "bf16-probe.json").read_text()).items()
    assert "AMD EPYC" in key and "avx512_bf16" in key and value == round(first, 3)
    for measured, expected in [(3.0, torch.bfloat16), (1.05, torch.float32)]:
        (tmp_path / "bf16-probe.json").write_text(json.dumps({key: measured}))
        monkeypatch.setattr(models, "_time_matmul", lambda dtype: pytest.fail("measured again"))
        assert models.cpu_bf16_speedup(tmp_path) == measured
        assert models.resolve_dtype("auto", torch.device("cpu"), cache=tmp_path) == expected


def test_explicit_and_cuda_dtypes_need_no_probe(monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16_speedup", lambda cache=None: pytest.fail("probed"))
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert models.resolve_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="--dtype must be one of auto"):
        models.resolve_dtype("int8", torch.device("cpu"))


def test_batched_engine_in_bf16_equals_one_request_at_a_time_in_bf16(tiny_model_dir):
    """bf16 keeps 8 significant bits, so one rounding moves a value by up to 2⁻⁸ of itself. The
    batched engine (left padding, a KV cache, rows joining and leaving) and the plain unpadded
    forward compute the same sums in other orders; their logits may differ by a few roundings.
    So: where the reference's best token leads the runner-up by more than 8 roundings of the
    largest logit, the engine must pick the same token; a closer call may go either way, and the
    two sequences are compared only up to it."""
    model, tok = load_tiny(tiny_model_dir, torch.bfloat16)
    torch.manual_seed(3)
    adapter = NestedAdapter.inject(model, AdapterConfig(r=8))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.normal_(std=0.3)
            layer.to(torch.bfloat16)
    prompts = ["Ada has 12 apples and gets 7 more.", "Ben", "Chen shares 40 coins", "Dara had 30 stamps"]
    ranks = [8, 0, 2, 4]
    engine = Engine(ModelRunner(model, adapter, tok.pad_token_id), tok, EngineConfig(max_batch_size=3),
                    adapter.config.ranks, auto_rank=lambda: 8)
    reqs = [GenerationRequest(tok(p)["input_ids"], k, SamplingParams(max_new_tokens=12), Collector())
            for p, k in zip(prompts, ranks)]
    run_all(engine, reqs)
    compared = 0
    for r, k in zip(reqs, ranks):
        adapter.set_rank(k)
        got = [t for ev in r.sink.events for t in ev.token_ids]
        ids = list(r.prompt_ids)
        with torch.no_grad():
            for step in range(len(got)):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                top2 = logits.topk(2).values
                tol = 8 * 2 ** -8 * float(logits.abs().max())
                if float(top2[0] - top2[1]) <= tol:
                    break  # a near tie: either token is a correct bf16 answer
                assert got[step] == int(logits.argmax()), (r.prompt_ids, k, step)
                compared += 1
                ids.append(got[step])
    assert compared >= 12  # the comparison was not vacuous


def test_an_adapter_served_in_bf16_computes_before_any_rank_is_set(tiny_model_dir, tiny_checkpoint):
    """The server casts a loaded adapter to the base model's bf16; the coefficients set at load
    are cast with it, so any forward (the start-up probes run several) works before the runner
    sets a row's rank (they stayed fp32, and ``h @ B`` met an fp32 h and a bf16 B)."""
    from conftest import load_tiny
    from server.app import _setup_adapter
    from server.settings import ServerSettings

    model, _ = load_tiny(tiny_model_dir, torch.bfloat16)
    adapter, _ = _setup_adapter(ServerSettings(model=str(tiny_model_dir), adapter=str(tiny_checkpoint)), model)
    assert adapter.state.coeffs is not None and adapter.state.coeffs.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 9, 13]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
