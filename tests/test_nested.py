"""The adapter math (DESIGN §2): p vectors, eq. 3, rank-k inference, gradients, merging."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import logits, trained_adapter
from trainer.inject import AdapterConfig, NestedAdapter, find_targets
from trainer.nested import AdapterState, NestedLoRALinear, default_ranks, p_vector, rule_coeffs, scale

R64 = [1, 2, 4, 8, 16, 32, 64]


def blocks(p: torch.Tensor) -> list[float]:
    """p's value at the first index of each power-of-two block: p1, p2, p3-4, p5-8, …"""
    return [round(float(p[i]), 6) for i in (0, 1, 2, 4, 8, 16, 32)]


@pytest.mark.parametrize("ranks, scaling, expected", [
    (R64, "sqrt", [3.112437, 2.112437, 1.405330, 0.905330, 0.551777, 0.301777, 0.125]),
    ([8, 16, 32, 64], "sqrt", [0.905330] * 4 + [0.551777, 0.301777, 0.125]),
    (R64, "none", [7, 6, 5, 4, 3, 2, 1]),
    (R64, "rank", [round(sum(1 / k for k in R64 if k >= i), 6) for i in (1, 2, 3, 5, 9, 17, 33)]),
])
def test_p_vector_matches_design_worked_values(ranks, scaling, expected):
    p = p_vector("matryoshka", 64, ranks, scaling)
    assert p.shape == (64,)
    assert blocks(p) == pytest.approx(expected, abs=1e-6)
    # constant within each block
    for lo, hi in [(2, 4), (4, 8), (8, 16), (16, 32), (32, 64)]:
        assert torch.all(p[lo:hi] == p[lo])


def test_p_is_zero_past_max_rank():
    p = p_vector("matryoshka", 16, [1, 2, 4], "sqrt")
    assert torch.all(p[4:] == 0) and torch.all(p[:4] > 0)


def test_lora_and_dylora_are_special_p_vectors():
    assert torch.all(p_vector("lora", 8, [1, 2, 4, 8], "sqrt") == 1 / math.sqrt(8))
    d = p_vector("dylora", 8, [1, 2, 4, 8], "sqrt", b=4)
    assert torch.all(d[:4] == 0.5) and torch.all(d[4:] == 0)
    with pytest.raises(ValueError, match="must be in R"):
        p_vector("dylora", 8, [1, 2, 4, 8], "sqrt", b=3)


R16 = [1, 2, 4, 8, 16]
S = {k: 1 / math.sqrt(k) for k in R16}


@pytest.mark.parametrize("rule, method, k, expected", [
    # Matryoshka, trained: p[:k]; p₁ = 1 + .7071 + .5 + .3536 + .25 = 2.8107 (DESIGN's r = 16 example)
    ("trained", "matryoshka", 16, [2.810660, 1.810660, 1.103553, 1.103553] + [0.603553] * 4 + [0.25] * 8),
    ("trained", "matryoshka", 2, [2.810660, 1.810660]),
    ("paper", "matryoshka", 16, [0.25] * 16),  # s(16)·1: component 1 trained at 2.81, served at 0.25
    ("paper", "matryoshka", 4, [0.5] * 4),
    ("partial", "matryoshka", 4, [S[1] + S[2] + S[4], S[2] + S[4], S[4], S[4]]),
    ("partial", "matryoshka", 16, [2.810660, 1.810660, 1.103553, 1.103553] + [0.603553] * 4 + [0.25] * 8),
    ("trained", "lora", 4, [0.25] * 4),  # plain truncation: s(r)·1ₖ
    ("trained", "dylora", 4, [0.5] * 4),  # the forward that trained rank 4 is b = 4: s(4)·1₄
])
def test_inference_rules_give_the_documented_coefficients(rule, method, k, expected):
    c = rule_coeffs(rule, method, 16, R16, "sqrt", k)
    assert c.shape == (k,)
    assert c.tolist() == pytest.approx(expected, abs=1e-6)


def test_matryoshka_served_at_full_rank_is_its_training_forward(tiny_model_dir):
    """Rule trained: rank r computes exactly B diag(p) A, the function the loss was minimised for;
    the paper's rule does not (component 1: p₁ = 2.81 vs s(8) = 0.35 for r = 8, sqrt)."""
    model, _, adapter = trained_adapter(tiny_model_dir)
    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    adapter.set_training_coeffs()
    trained = logits(model, ids)
    adapter.set_rank(8)
    torch.testing.assert_close(logits(model, ids), trained, rtol=0, atol=0)
    adapter.set_inference_rule("paper")
    adapter.set_rank(8)
    assert (logits(model, ids) - trained).abs().max() > 1e-2


def test_default_ranks_are_powers_of_two_then_r():
    assert default_ranks(64) == R64
    assert default_ranks(1) == [1]
    assert default_ranks(48) == [1, 2, 4, 8, 16, 32, 48]


def make_layer(r=8, inp=12, out=10, seed=0) -> NestedLoRALinear:
    torch.manual_seed(seed)
    layer = NestedLoRALinear(nn.Linear(inp, out), r, AdapterState())
    with torch.no_grad():
        layer.lora_Bt.normal_()  # a trained-looking adapter (B = 0 at init)
    return layer


def explicit_sum(layer: NestedLoRALinear, x, ranks, scaling):
    """eq. 3 written out: W x + Σ_{k∈R} s(k) B[:, :k] A[:k] x."""
    A, B = layer.lora_A, layer.lora_Bt.t()
    y = layer.base(x)
    for k in ranks:
        y = y + scale(k, scaling) * x @ A[:k].t() @ B[:, :k].t()
    return y


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("ranks", [[1, 2, 4, 8], [2, 8], [1, 2, 4]])
def test_matryoshka_forward_equals_sum_over_prefixes(scaling, ranks):
    layer = make_layer()
    x = torch.randn(3, 5, 12)
    layer.state.set(p_vector("matryoshka", 8, ranks, scaling), x.device, torch.float32)
    torch.testing.assert_close(layer(x), explicit_sum(layer, x, ranks, scaling))


def test_lora_and_dylora_forward_are_single_prefix_terms():
    layer = make_layer()
    x = torch.randn(4, 12)
    layer.state.set(p_vector("lora", 8, [1, 2, 4, 8], "sqrt"), x.device, torch.float32)
    torch.testing.assert_close(layer(x), explicit_sum(layer, x, [8], "sqrt"))
    layer.state.set(p_vector("dylora", 8, [1, 2, 4, 8], "sqrt", b=2), x.device, torch.float32)
    torch.testing.assert_close(layer(x), explicit_sum(layer, x, [2], "sqrt"))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_rank_k_inference_equals_hand_truncated_adapter(k):
    layer = make_layer()
    x = torch.randn(4, 12)
    layer.state.set(torch.full((k,), scale(k, "sqrt"), dtype=torch.float64), x.device, torch.float32)
    truncated = nn.Linear(12, k, bias=False), nn.Linear(k, 10, bias=False)
    with torch.no_grad():
        truncated[0].weight.copy_(layer.lora_A[:k])
        truncated[1].weight.copy_(layer.lora_Bt[:k].t())
    # y = W x + s(k) B_k A_k x
    expected = layer.base(x) + truncated[1](truncated[0](x)) / math.sqrt(k)
    torch.testing.assert_close(layer(x), expected)


def test_rank_zero_and_zero_b_are_the_base_model():
    layer = make_layer()
    x = torch.randn(4, 12)
    layer.state.set(None, x.device, torch.float32)
    torch.testing.assert_close(layer(x), layer.base(x))
    fresh = NestedLoRALinear(nn.Linear(12, 10), 8, AdapterState())  # B = 0 at init
    fresh.state.set(p_vector("matryoshka", 8, [1, 2, 4, 8], "sqrt"), x.device, torch.float32)
    torch.testing.assert_close(fresh(x), fresh.base(x))


def test_per_row_coefficients_equal_rows_served_one_at_a_time():
    """A batch whose rows run at different ranks (server path) equals each row alone."""
    layer = make_layer()
    x = torch.randn(3, 4, 12)  # (rows, T, in)
    ranks = [8, 0, 2]
    c = torch.zeros(3, 8, dtype=torch.float64)
    for i, k in enumerate(ranks):
        c[i, :k] = scale(k, "sqrt") if k else 0
    layer.state.set(c, x.device, torch.float32)
    mixed = layer(x)
    for i, k in enumerate(ranks):
        layer.state.set(torch.full((k,), scale(k, "sqrt"), dtype=torch.float64) if k else None,
                        x.device, torch.float32)
        torch.testing.assert_close(mixed[i], layer(x[i:i + 1])[0])


def gradients(method: str, b: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    layer = make_layer(r=16)
    layer.base.requires_grad_(False)
    layer.state.set(p_vector(method, 16, [1, 2, 4, 8], "sqrt", b), torch.device("cpu"), torch.float32)
    layer(torch.randn(6, 12)).pow(2).sum().backward()
    return layer.lora_A.grad, layer.lora_Bt.grad


def test_matryoshka_trains_every_component_up_to_max_rank():
    gA, gB = gradients("matryoshka")
    assert torch.all(gA[:8].abs().sum(1) > 0) and torch.all(gB[:8].abs().sum(1) > 0)
    assert torch.all(gA[8:] == 0) and torch.all(gB[8:] == 0)  # past max(R) = 8: p = 0


def test_dylora_components_past_b_get_no_gradient():
    gA, gB = gradients("dylora", b=2)
    assert torch.all(gA[:2].abs().sum(1) > 0)
    assert torch.all(gA[2:] == 0) and torch.all(gB[2:] == 0)


def test_merge_then_unmerge_restores_weights_and_outputs():
    layer = make_layer()
    x = torch.randn(4, 12)
    w0 = layer.base.weight.clone()
    layer.state.set(torch.full((4,), 0.5, dtype=torch.float64), x.device, torch.float32)
    expected = layer(x)
    layer.merge(torch.full((4,), 0.5, dtype=torch.float64))  # W ← W + B_4 diag(0.5) A_4
    torch.testing.assert_close(layer.base(x), expected)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 4)})
        self.mlp = nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})

    def forward(self, x):
        h = self.attn["q_proj"](x) + self.attn["k_proj"](x).repeat(1, 2)
        return self.mlp["down"](self.mlp["up"](h).relu())


def test_injection_by_names_and_regex_freezes_the_base():
    model = TwoBlocks()
    adapter = NestedAdapter.inject(model, AdapterConfig(r=4, target_modules=["q_proj", "down"]))
    assert sorted(adapter.layers) == ["attn.q_proj", "mlp.down"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{m}.lora_{w}" for m in adapter.layers for w in ("A", "Bt"))
    assert find_targets(TwoBlocks(), r"mlp\.(up|down)") == ["mlp.up", "mlp.down"]


def test_injection_without_a_match_lists_the_module_names():
    with pytest.raises(ValueError, match=r"k_proj, q_proj, down, up|down, k_proj, q_proj, up"):
        NestedAdapter.inject(TwoBlocks(), AdapterConfig(r=4, target_modules=["gate_proj"]))


def test_merge_and_unload_gives_a_plain_model_with_the_rank_k_outputs():
    model = TwoBlocks()
    adapter = NestedAdapter.inject(model, AdapterConfig(r=4, target_modules=["q_proj", "up"]))
    for layer in adapter.layers.values():
        nn.init.normal_(layer.lora_Bt)
    x = torch.randn(3, 8)
    adapter.set_rank(2)
    expected = model(x)
    plain = adapter.merge_and_unload(2)
    assert not any(isinstance(m, NestedLoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(x), expected)


@pytest.mark.parametrize("merged", [1, 4])
def test_every_rank_is_exact_while_another_rank_is_merged(merged):
    """Merged at m, a row at rank k adds c_k − c_m: same outputs as the unmerged adapter."""
    model = TwoBlocks()
    adapter = NestedAdapter.inject(model, AdapterConfig(r=4, target_modules=["q_proj", "up", "down"]))
    for layer in adapter.layers.values():
        nn.init.normal_(layer.lora_Bt)
    x = torch.randn(3, 8)
    expected = {}
    for k in [0, 1, 2, 4]:
        adapter.set_rank(k)
        expected[k] = model(x)
    adapter.merge(merged)
    assert adapter.state.coeffs is None  # the merged rank costs nothing extra
    for k in [0, 1, 2, 4]:
        adapter.set_rank(k)
        torch.testing.assert_close(model(x), expected[k])
    adapter.set_row_ranks([4, 0, merged])
    torch.testing.assert_close(model(x), torch.stack([expected[4][0], expected[0][1], expected[merged][2]]))
    adapter.unmerge()
    adapter.set_rank(2)
    torch.testing.assert_close(model(x), expected[2])


def test_set_rank_outside_r_is_an_error_listing_valid_ranks():
    adapter = NestedAdapter.inject(TwoBlocks(), AdapterConfig(r=4, target_modules=["up"]))
    with pytest.raises(ValueError, match=r"valid ranks are \[0, 1, 2, 4\]"):
        adapter.set_rank(3)


def test_remerge_switches_ranks_exactly_and_unmerge_restores_the_base_bit_for_bit(tiny_model_dir):
    """remerge(k) rebuilds W from a copy of the base: after any number of switches the weights
    are exactly W₀ + ΔW_k (no accumulated rounding), and every rank still serves exactly."""
    from conftest import trained_adapter

    model, _, adapter = trained_adapter(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    want = {}
    for k in (0, 1, 4, 8):
        adapter.set_rank(k)
        with torch.no_grad():
            want[k] = model(ids).logits
    base = {n: l.base.weight.detach().clone() for n, l in adapter.layers.items()}
    adapter.remerge(4)
    once = {n: l.base.weight.detach().clone() for n, l in adapter.layers.items()}
    for k in (8, 1, 0, 8, 2, 4):  # many switches later, the same bits as the first merge at 4
        adapter.remerge(k)
    assert all(torch.equal(l.base.weight, once[n]) for n, l in adapter.layers.items())
    assert adapter.state.coeffs is None  # the merged rank costs nothing extra
    for k in (0, 1, 4, 8):
        adapter.set_rank(k)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want[k], rtol=1e-4, atol=1e-4)
    adapter.unmerge()
    assert adapter.merged_rank is None and all(torch.equal(l.base.weight, base[n]) for n, l in adapter.layers.items())
    with pytest.raises(ValueError, match="valid ranks are"):
        adapter.remerge(3)
