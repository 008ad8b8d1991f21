"""Sibling fusion (trainer.fusion): one GEMM per shared input computes exactly the unfused model."""

from __future__ import annotations

import pytest
import torch

from conftest import logits, skip_unless_packable, trained_adapter

ATOL = 1e-5  # fp32: the fused GEMM sums the same products in another blocking order


def every_rank(model, adapter, ids) -> dict:
    out = {}
    for k in [0, *adapter.config.ranks]:
        adapter.set_rank(k)
        out[k] = logits(model, ids)
    adapter.set_row_ranks([adapter.config.r, 0, 1, 2][: ids.shape[0]])
    out["mixed"] = logits(model, ids)
    return out


def assert_same(a: dict, b: dict) -> None:
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=lambda m: f"rank {k}: {m}")


def test_siblings_are_the_modules_that_read_one_input(tiny_model_dir):
    model, _, adapter = trained_adapter(tiny_model_dir)
    groups = adapter.fuse()
    short = [[n.split(".")[-1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2
    assert sorted(n for g in groups for n in g) == sorted(adapter.layers)


@pytest.mark.parametrize("method, b_per_member", [("matryoshka", False), ("lora", False), ("dylora", False),
                                                 ("matryoshka", True)])
def test_fused_model_computes_the_unfused_function_at_every_rank_and_mixed(tiny_model_dir, method, b_per_member,
                                                                          monkeypatch):
    """Both ways of adding B: one block-diagonal addmm (small n) and one addmm per member."""
    if b_per_member:
        monkeypatch.setattr("trainer.fusion.BLOCK_B_WASTE", 0)
    model, _, adapter = trained_adapter(tiny_model_dir, method=method)
    ids = torch.randint(0, model.config.vocab_size, (4, 7))
    want = every_rank(model, adapter, ids)
    adapter.fuse()
    assert_same(want, every_rank(model, adapter, ids))
    adapter.unfuse()
    assert not adapter.groups and all(l.group is None for l in adapter.layers.values())
    assert_same(want, every_rank(model, adapter, ids))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="packed GEMMs need oneDNN")
@pytest.mark.parametrize("method", ["matryoshka", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_packed_model_computes_the_unfused_function_and_sees_new_b(tiny_model_dir, method, dtype):
    """Packed, a group's B is one oneDNN GEMM of the block-diagonal Bd[:G·n] with y added as its
    post-op, packed once per rank n. Same function as unfused: fp32 to summation order; bf16 to one
    rounding of the scaled intermediate (LoRA's uniform α multiplies h before the GEMM, as a
    per-component c does; 2e-2 is a few bf16 steps of these O(1) logits). A B written after its
    rank was packed (a reload) is used, not the stale packed copy."""
    from trainer.kernels import use_gemm

    skip_unless_packable(dtype)

    model, _, adapter = trained_adapter(tiny_model_dir, method=method)
    model.to(dtype)
    for layer in adapter.layers.values():
        layer.to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (4, 7))
    want = every_rank(model, adapter, ids)
    adapter.fuse()
    use_gemm(model, "packed")
    got = every_rank(model, adapter, ids)
    atol = ATOL if dtype == torch.float32 else 2e-2
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m: f"rank {k}: {m}")
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_Bt.mul_(-3)
    adapter.set_rank(adapter.config.r)
    fused_new = logits(model, ids)
    use_gemm(model, "standard")
    adapter.unfuse()
    adapter.set_rank(adapter.config.r)
    torch.testing.assert_close(fused_new, logits(model, ids), rtol=0, atol=atol)
    assert (fused_new - want[adapter.config.r]).abs().max() > 10 * atol  # the change shows


def test_merging_writes_through_the_fused_weights(tiny_model_dir):
    """merge/remerge change ``base.weight`` in place, which is a view of the fused matrix: every
    rank stays exact while another is merged, and unmerge restores the base bit for bit."""
    model, _, adapter = trained_adapter(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (4, 5))
    want = every_rank(model, adapter, ids)
    base = {n: l.base.weight.detach().clone() for n, l in adapter.layers.items()}
    adapter.fuse()
    for k in (4, 1, 8):
        adapter.remerge(k)
        assert_same(want, every_rank(model, adapter, ids))
    adapter.unmerge()
    assert all(torch.equal(l.base.weight, base[n]) for n, l in adapter.layers.items())
    g = adapter.groups[0]
    assert torch.equal(g.weight[: g.T], torch.cat([m.base.weight for m in g.members]))


def test_weights_loaded_after_fusion_are_used(tiny_model_dir, tmp_path):
    """Loading a checkpoint into a fused adapter (copy_ into A and B) changes what it computes,
    exactly as loading it into an unfused one."""
    model, _, adapter = trained_adapter(tiny_model_dir, seed=1)
    other_model, _, other = trained_adapter(tiny_model_dir, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (4, 5))
    want = every_rank(other_model, other, ids)
    adapter.fuse()
    every_rank(model, adapter, ids)  # builds the fused B once, with the old weights
    with torch.no_grad():
        adapter.load_peft_state_dict(other.peft_state_dict())
    assert_same(want, every_rank(model, adapter, ids))


def test_changing_dtype_after_fusion_is_refused_not_silently_wrong(tiny_model_dir):
    model, _, adapter = trained_adapter(tiny_model_dir)
    adapter.fuse()
    model.to(torch.float64)  # re-allocates every parameter: the views are gone
    with pytest.raises(RuntimeError, match="unfuse"):
        logits(model, torch.zeros(1, 2, dtype=torch.long))


def test_merge_and_unload_of_a_fused_adapter_gives_plain_linears(tiny_model_dir):
    model, _, adapter = trained_adapter(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    adapter.set_rank(4)
    want = logits(model, ids)
    adapter.fuse()
    plain = adapter.merge_and_unload(4)
    assert not any(type(m).__name__ == "NestedLoRALinear" for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), want, rtol=0, atol=ATOL)


def test_fusion_needs_one_dtype(tiny_model_dir):
    from trainer.fusion import FusedGroup

    model, _, adapter = trained_adapter(tiny_model_dir)
    q, k = adapter.layers["model.layers.0.self_attn.q_proj"], adapter.layers["model.layers.0.self_attn.k_proj"]
    k.to(torch.float64)
    with pytest.raises(ValueError, match="one dtype"):
        FusedGroup([q, k])


def test_fuse_auto_fuses_exactly_where_gemms_are_packed():
    from server.app import fused
    from server.settings import ServerSettings

    assert fused(ServerSettings(), "packed") and not fused(ServerSettings(), "standard")
    assert not fused(ServerSettings(), "weight-major")
    assert fused(ServerSettings(fuse="true"), "standard") and not fused(ServerSettings(fuse="false"), "packed")


def test_the_server_fuses_on_request_and_serves_the_same_logits(tiny_model_dir, tiny_checkpoint):
    """``--fuse true`` fuses the loaded checkpoint after its dtype cast; every rank's logits equal
    an unfused server's."""
    from server.app import load_state
    from server.settings import ServerSettings

    states = {f == "true": load_state(ServerSettings(model=str(tiny_model_dir), adapter=str(tiny_checkpoint), fuse=f,
                                                     calibrate_steps=0)) for f in ("false", "true")}
    runners = {f: st.engine.runner for f, st in states.items()}
    assert not runners[False].adapter.groups and runners[True].adapter.groups
    prompt = [[5, 9, 12, 7]]
    for k in [0, *runners[True].adapter.config.ranks]:
        got = {f: r.prefill(prompt, [k]).logits for f, r in runners.items()}
        torch.testing.assert_close(got[True], got[False], rtol=0, atol=ATOL)
