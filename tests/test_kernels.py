"""The CPU's GEMM modes (trainer.kernels), weight-major and oneDNN-packed: the same function as
F.linear, switched per model, a packed copy rebuilt whenever its weight is written."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import logits, trained_adapter
from trainer import kernels
from trainer.kernels import MAX_ROWS, GemmLinear, PackedWeight, gemm_mode, linear, resolve_gemm, use_gemm

ATOL = 1e-5  # fp32: W·xᵀ sums the same products as x·Wᵀ, in another blocking order


@pytest.mark.parametrize("shape", [(1, 24), (8, 24), (2, 3, 24), (4, 1, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_major_linear_is_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen) if bias else None
    y = linear(x, w, b, max_rows=MAX_ROWS)
    assert y.shape == (*shape[:-1], 40)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=ATOL)


def test_more_rows_than_the_limit_take_f_linear_exactly():
    x, w = torch.randn(9, 16), torch.randn(32, 16)
    assert torch.equal(linear(x, w, max_rows=8), F.linear(x, w))
    assert torch.equal(linear(x, w, max_rows=0), F.linear(x, w))
    assert linear(torch.randn(0, 16), w, max_rows=8).shape == (0, 32)


def test_gradients_flow_through_the_weight_major_path():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    linear(x, w, max_rows=8).square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F.linear(x, w).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(gw, w.grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 24), (16, 24), (2, 3, 24), (200, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_f_linear_at_every_row_count(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    w, b = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen) if bias else None
    with torch.no_grad():
        y = linear(x, w, b, packed=PackedWeight())
    assert y.shape == (*shape[:-1], 40)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=ATOL)


def test_a_packed_weight_is_rebuilt_when_the_weight_is_written_and_skipped_for_gradients():
    w, x, packed = torch.randn(8, 16), torch.randn(3, 16), PackedWeight()
    with torch.no_grad():
        first = linear(x, w, packed=packed)
        w.mul_(2)  # in place, as a merge writes W0 + ΔW
        torch.testing.assert_close(linear(x, w, packed=packed), 2 * first, rtol=0, atol=ATOL)
        torch.testing.assert_close(linear(x, w[:5], packed=packed), F.linear(x, w[:5]), rtol=0, atol=ATOL)
    with torch.inference_mode():
        frozen = torch.randn(8, 16)  # an inference tensor keeps no version: never packed, computed standard
        assert packed.of(frozen) is None and torch.equal(linear(x, frozen, packed=packed), F.linear(x, frozen))
    wg = w.clone().requires_grad_()
    linear(x, wg, packed=packed).sum().backward()  # training: the standard path, with its gradient
    torch.testing.assert_close(wg.grad, x.sum(0).expand(8, 16), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["weight-major", "packed"])
@pytest.mark.parametrize("fused", [False, True])
def test_switched_model_computes_the_same_logits_at_every_rank(tiny_model_dir, fused, mode):
    model, _, adapter = trained_adapter(tiny_model_dir)
    if fused:
        adapter.fuse()
    decode = torch.tensor([[5], [9], [11]])  # three rows, one token each: a decode-shaped call
    prompt = torch.tensor([[5, 9, 11, 17, 23, 42]])
    before = {}
    for k in [0, *adapter.config.ranks]:
        adapter.set_rank(k)
        before[k] = (logits(model, decode), logits(model, prompt))
    adapter.set_row_ranks([8, 0, 2])
    before["mixed"] = (logits(model, decode),)
    keys = set(model.state_dict())
    n = use_gemm(model, mode)
    assert n == 2 * 7 + 1 and gemm_mode(model) == mode  # every base linear of 2 decoder layers, and lm_head
    assert keys == set(model.state_dict())  # the same parameters under the same names
    for k in [0, *adapter.config.ranks]:
        adapter.set_rank(k)
        after = (logits(model, decode), logits(model, prompt))
        for a, b in zip(before[k], after):
            torch.testing.assert_close(b, a, rtol=0, atol=ATOL, msg=lambda m: f"rank {k}: {m}")
    adapter.set_row_ranks([8, 0, 2])
    torch.testing.assert_close(logits(model, decode), before["mixed"][0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("fused", [False, True])
def test_packed_weights_follow_a_re_merge(tiny_model_dir, fused):
    """A merge writes W in place; the packed copies must follow it (else every rank after the
    first re-merge computes with the old weights)."""
    model, _, adapter = trained_adapter(tiny_model_dir)
    if fused:
        adapter.fuse()
    decode = torch.tensor([[5], [9], [11]])
    want = {}
    for k in adapter.config.ranks:
        adapter.remerge(k)
        want[k] = logits(model, decode)
    use_gemm(model, "packed")
    for k in [*adapter.config.ranks[::-1], 1]:
        adapter.remerge(k)
        torch.testing.assert_close(logits(model, decode), want[k], rtol=0, atol=ATOL, msg=lambda m: f"rank {k}: {m}")


def test_switching_back_restores_plain_linears(tiny_model_dir):
    model, _, adapter = trained_adapter(tiny_model_dir)
    use_gemm(model, "weight-major")
    assert type(model.lm_head) is GemmLinear and model.lm_head.small_gemm_rows == MAX_ROWS
    assert all(layer.small_gemm_rows == MAX_ROWS for layer in adapter.layers.values())
    use_gemm(model, "packed")
    assert model.lm_head.small_gemm_rows == 0 and model.lm_head.packed is not None
    assert all(layer.small_gemm_rows == 0 and layer.packed is not None for layer in adapter.layers.values())
    use_gemm(model, "standard")
    assert not any(isinstance(m, GemmLinear) for m in model.modules())
    assert type(model.lm_head) is nn.Linear and not {"small_gemm_rows", "packed"} & set(model.lm_head.__dict__)
    assert all(layer.small_gemm_rows == 0 and layer.packed is None for layer in adapter.layers.values())
    with pytest.raises(ValueError, match="standard, weight-major, packed; got 'fast'"):
        use_gemm(model, "fast")


def test_modes_resolve_without_probing_where_the_answer_is_known(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_time_forwards", lambda *a, **k: pytest.fail("probed"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for mode in ("standard", "weight-major", "packed"):
        assert resolve_gemm(mode, cpu, torch.float32, tmp_path) == mode
    assert resolve_gemm("auto", cuda, torch.bfloat16, tmp_path) == "standard"  # cuBLAS needs no help
    with pytest.raises(ValueError, match="auto, standard, weight-major, packed; got 'fast'"):
        resolve_gemm("fast", cpu, torch.float32, tmp_path)
    with pytest.raises(ValueError, match="times the model's own forward"):  # nothing made-up to time instead
        resolve_gemm("auto", cpu, torch.float32, tmp_path)


def test_the_probe_is_measured_once_cached_and_picks_the_fastest(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import load_tiny

    model, _ = load_tiny(tiny_model_dir)
    calls = []

    def fake(probed, modes, reps=4):
        calls.append(probed)
        return {m: t for m, t in {"standard": 3.0, "weight-major": 2.0, "packed": 1.5}.items() if m in modes}
    monkeypatch.setattr(kernels, "_time_forwards", fake)
    cpu = torch.device("cpu")
    assert resolve_gemm("auto", cpu, torch.float32, tmp_path, model) == "packed"
    assert resolve_gemm("auto", cpu, torch.float32, tmp_path, model) == "packed"
    assert calls == [model]  # every mode timed in one probe of this model; the second answer from the cache
    if kernels.packing_error(torch.float32) is not None:
        return  # (fp32 packing missing: the probe skipped it; the test below covers that)
    path = tmp_path / "gemm-probe.json"
    cached = json.loads(path.read_text())
    assert list(cached.values()) == [{"weight-major": 1.5, "packed": 2.0}]
    key = next(iter(cached))
    cached[key] = {"weight-major": 1.2, "packed": 0.9}  # a CPU where packing does not pay
    path.write_text(json.dumps(cached))
    assert resolve_gemm("auto", cpu, torch.float32, tmp_path, model) == "weight-major"
    cached[key] = {"weight-major": 1.03, "packed": 0.9}  # nor either: kept standard
    path.write_text(json.dumps(cached))
    assert resolve_gemm("auto", cpu, torch.float32, tmp_path, model) == "standard"


def test_the_probe_times_the_models_own_forward_and_leaves_its_mode(tmp_path, tiny_model_dir, monkeypatch):
    """The probe times the model's forward in every mode (not made-up GEMMs), caches the
    answer under the model's linear shapes, and leaves the model computing as it did."""
    from conftest import load_tiny
    from trainer.kernels import gemm_speedups

    model, _ = load_tiny(tiny_model_dir)
    use_gemm(model, "weight-major")
    speedups = gemm_speedups(torch.float32, model, tmp_path)
    assert set(speedups) == {"weight-major", "packed"} and all(v > 0 for v in speedups.values())
    assert gemm_mode(model) == "weight-major"
    keys = list(json.loads((tmp_path / "gemm-probe.json").read_text()))
    assert len(keys) == 1 and "forward: 15 linears" in keys[0]  # q k v o gate up down in 2 layers, the head


def test_a_batched_prefill_computes_the_head_as_one_gemm_not_a_bmm_over_weight_copies(tiny_model_dir):
    """transformers hands the head a strided ``hidden[:, -1:, :]``; unhooked, F.linear runs it as
    a bmm over B expanded copies of the (V, H) weight (1.1 s of a 2.6 s SmolLM2 prefill here)."""
    from conftest import load_tiny
    from server.runner import ModelRunner

    model, tok = load_tiny(tiny_model_dir)
    prompts = [[5, 6, 7, 8, 9], [5, 6], [7, 8, 9]]
    with torch.inference_mode():
        strided = model(input_ids=torch.tensor([[5, 6, 7]] * 3), logits_to_keep=1).logits
    runner = ModelRunner(model, None, tok.pad_token_id)  # hooks the head
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = runner.prefill(prompts, [0, 0, 0])
    assert "aten::bmm" not in {e.name for e in prof.events()}
    assert out.logits.shape == (3, model.config.vocab_size)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=torch.tensor([[5, 6, 7]] * 3), logits_to_keep=1).logits, strided)
    assert not kernels.contiguous_head_input(model)  # once per model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_picks_a_mode_that_runs_here_and_packed_where_it_cannot_is_a_clear_error(tmp_path, tiny_model_dir, dtype):
    """oneDNN packs bf16 weights only on CPUs with AVX-512 (bw/vl/dq) or AVX-NE-CONVERT: on an
    AVX2-only EPYC ``packed`` in bf16 raised mid-probe and stopped the server's start. ``auto``
    measures only the modes that run here, its choice computes the model's function, and asking
    for packed where it cannot run names the dtype and the way out."""
    from conftest import load_tiny

    model, _ = load_tiny(tiny_model_dir)
    model.to(dtype)
    cpu, ids = torch.device("cpu"), torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    mode = resolve_gemm("auto", cpu, dtype, tmp_path, model)
    use_gemm(model, mode)
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    use_gemm(model, "standard")
    if kernels.packing_error(dtype) is None:
        assert resolve_gemm("packed", cpu, dtype, tmp_path) == "packed"
        return
    assert mode != "packed"
    with pytest.raises(ValueError, match=f"packed GEMMs cannot run in {str(dtype).removeprefix('torch.')} on this CPU"):
        resolve_gemm("packed", cpu, dtype, tmp_path)
    with pytest.raises(ValueError, match="use --gemm auto"):
        use_gemm(model, "packed")
