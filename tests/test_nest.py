"""trainer nest: SVD nesting of a plain PEFT LoRA adapter (Eckart–Young prefixes, exact full rank)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_tiny
from conftest import logits
from trainer.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META, CheckpointError, load_adapter
from trainer.cli import main
from trainer.inject import PEFT_PREFIX
from trainer.nest import nest_adapter, read_peft_lora, thin_svd
from trainer.nested import scale

TARGETS = ["q_proj", "v_proj", "down_proj"]  # not our default set


def peft_adapter(model_dir, out, r=6, rslora=False, alpha=12, **kw):
    """A PEFT LoRA adapter with r not a power of two and a trained-looking (non-zero) B."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_tiny(model_dir)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
                                            target_modules=kw.pop("target_modules", TARGETS), **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.save_pretrained(out)
    return model


@pytest.fixture
def ids():
    return torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def delta_weights(folder, s_of_k=None, k=None) -> dict[str, torch.Tensor]:
    """Module → ΔW (out, in) from a folder's factors: s · B[:, :k] A[:k] (dense, test-only)."""
    t = load_file(folder / ADAPTER_WEIGHTS)
    out = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            name = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            A, B = t[key].double(), t[key.replace("lora_A", "lora_B")].double()
            k_ = A.shape[0] if k is None else k
            out[name] = (1.0 if s_of_k is None else s_of_k) * B[:, :k_] @ A[:k_]
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_every_prefix_is_the_best_rank_k_approximation(tiny_model_dir, tmp_path, rslora):
    """‖ΔW − s(k) B'[:, :k] A'[:k]‖_F = √(Σ_{i>k} σ_i²) for every k in R (Eckart–Young)."""
    peft_adapter(tiny_model_dir, tmp_path / "peft", rslora=rslora)
    nest_adapter(tmp_path / "peft", tmp_path / "nested")
    s_peft = 12 / (math.sqrt(6) if rslora else 6)
    original = {n: s_peft * d for n, d in delta_weights(tmp_path / "peft").items()}
    meta = json.loads((tmp_path / "nested" / META).read_text())
    assert meta["ranks"] == [1, 2, 4, 6] and meta["scaling"] == "none"
    for k in meta["ranks"]:
        nested = delta_weights(tmp_path / "nested", scale(k, "none"), k)
        assert set(nested) == set(original) and len(nested) == 2 * 3
        for name, dw in original.items():
            sigma = torch.linalg.svdvals(dw)
            tail = float(sigma[k:].pow(2).sum().sqrt())
            assert float(torch.linalg.norm(dw - nested[name])) == pytest.approx(tail, rel=1e-4, abs=1e-6)
    tensors = load_file(tmp_path / "nested" / ADAPTER_WEIGHTS)
    for name, dw in original.items():  # σ_i split evenly: ‖B'[:, i]‖ = ‖A'[i]‖ = √σ_i
        A, B = (tensors[f"{PEFT_PREFIX}{name}.lora_{f}.weight"].double() for f in "AB")
        root = torch.linalg.svdvals(dw)[:6].sqrt()
        torch.testing.assert_close(A.norm(dim=1), root, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(B.norm(dim=0), root, rtol=1e-4, atol=1e-6)
    energy = meta["svd"]["energy_kept"]
    assert list(energy.values()) == sorted(energy.values()) and energy["6"] == pytest.approx(1.0)


@pytest.mark.parametrize("scaling", ["none", "sqrt"])
@pytest.mark.parametrize("rslora", [False, True])
def test_full_rank_reproduces_the_peft_adapter_outputs(tiny_model_dir, tmp_path, ids, scaling, rslora):
    peft_model = peft_adapter(tiny_model_dir, tmp_path / "peft", rslora=rslora)
    expected = logits(peft_model, ids)
    nest_adapter(tmp_path / "peft", tmp_path / "nested", scaling=scaling)
    model, _ = load_tiny(tiny_model_dir)
    adapter, meta = load_adapter(tmp_path / "nested", model)  # fingerprint, digest and shapes checked
    assert meta["method"] == "svd" and meta["target_modules"] == sorted(TARGETS)
    adapter.set_rank(6)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)
    adapter.set_rank(0)
    torch.testing.assert_close(logits(model, ids), logits(load_tiny(tiny_model_dir)[0], ids))


def test_sqrt_scaling_serves_each_prefix_amplified_by_s_k_over_s_r(tiny_model_dir, tmp_path):
    """One set of factors cannot carry a per-prefix s(k): with sqrt, rank k = s(k)/s(r) × the best."""
    peft_adapter(tiny_model_dir, tmp_path / "peft")
    nest_adapter(tmp_path / "peft", tmp_path / "none")
    nest_adapter(tmp_path / "peft", tmp_path / "sqrt", scaling="sqrt")
    for k in [1, 2, 4, 6]:
        best = delta_weights(tmp_path / "none", 1.0, k)
        served = delta_weights(tmp_path / "sqrt", scale(k, "sqrt"), k)
        for name in best:
            torch.testing.assert_close(served[name], math.sqrt(6 / k) * best[name])


@pytest.mark.parametrize("out_dim, in_dim, r, zero_cols", [(10, 12, 4, 0), (3, 12, 5, 0), (10, 12, 4, 2)])
def test_thin_svd_from_the_factors_is_the_svd_of_the_product(out_dim, in_dim, r, zero_cols):
    """Also when r > out (the core is not square) and when B has zero columns (rank-deficient)."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(r, in_dim, generator=g), torch.randn(out_dim, r, generator=g)
    B[:, :zero_cols] = 0
    U, sigma, V = thin_svd(A, B, 0.5)
    dense = 0.5 * B.double() @ A.double()
    q = min(out_dim, in_dim, r)
    assert sigma.shape == (q,) and torch.all(sigma[:-1] >= sigma[1:])
    torch.testing.assert_close(sigma, torch.linalg.svdvals(dense)[:q])
    torch.testing.assert_close(U @ torch.diag(sigma) @ V.t(), dense)
    torch.testing.assert_close(U.t() @ U, torch.eye(q, dtype=torch.float64))
    torch.testing.assert_close(V.t() @ V, torch.eye(q, dtype=torch.float64))


def test_ranks_below_r_keep_the_best_part_and_record_provenance(tiny_model_dir, tmp_path):
    peft_adapter(tiny_model_dir, tmp_path / "peft")
    assert main(["nest", str(tmp_path / "peft"), "--ranks", "1,2", "--out", str(tmp_path / "n2")]) == 0
    assert main(["nest", str(tmp_path / "peft"), "--out", str(tmp_path / "n6")]) == 0
    meta = json.loads((tmp_path / "n2" / META).read_text())
    assert (meta["r"], meta["ranks"], meta["method"]) == (2, [1, 2], "svd")
    assert meta["nested_from"]["r"] == 6 and meta["nested_from"]["lora_alpha"] == 12
    assert meta["base_model"]["name"] == str(tiny_model_dir)
    small, full = delta_weights(tmp_path / "n2"), delta_weights(tmp_path / "n6", k=2)
    for name in small:
        torch.testing.assert_close(small[name], full[name])


def test_modules_the_config_targets_do_not_all_carry_are_named_one_by_one(tiny_model_dir, tmp_path, ids):
    """PEFT's layers_to_transform adapts layer 0 only: the targets become the module names."""
    peft_model = peft_adapter(tiny_model_dir, tmp_path / "peft", layers_to_transform=[0])
    nest_adapter(tmp_path / "peft", tmp_path / "nested")
    meta = json.loads((tmp_path / "nested" / META).read_text())
    assert meta["target_modules"] == sorted(f"model.layers.0.{m}" for m in
                                            ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])
    model, _ = load_tiny(tiny_model_dir)
    adapter, _ = load_adapter(tmp_path / "nested", model)
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-4, atol=1e-5)


def _write(folder, config=None, weights=True, bin_only=False):
    folder.mkdir()
    if config is not None:
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    if bin_only:
        (folder / "adapter_model.bin").write_bytes(b"pickle")
    elif weights:
        from safetensors.torch import save_file

        name = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj"
        tensors = {f"{name}.lora_A.weight": torch.zeros(2, 64)}
        if weights == "nan":
            tensors[f"{name}.lora_B.weight"] = torch.full((64, 2), float("nan"))
        save_file(tensors, folder / ADAPTER_WEIGHTS)


LORA = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}


@pytest.mark.parametrize("setup, message", [
    (dict(config=None), r"is not a PEFT LoRA adapter folder: no adapter_config.json \(it has: adapter_model"),
    (dict(config={"peft_type": "IA3"}), "holds a 'IA3' adapter; only peft_type 'LORA'"),
    (dict(config={**LORA, "use_dora": True}), r"does not support: use_dora=True"),
    (dict(config={**LORA, "alpha_pattern": {"q_proj": 4}}), "alpha_pattern="),
    (dict(config=LORA, bin_only=True), "adapter_model.bin is a pickle, which is never loaded here"),
    (dict(config=LORA), "q_proj has only lora_A"),
    (dict(config=LORA, weights="nan"), "q_proj: contains NaN or Inf"),
])
def test_what_is_not_a_plain_peft_lora_adapter_is_refused_clearly(tmp_path, setup, message):
    _write(tmp_path / "p", **setup)
    with pytest.raises(CheckpointError, match=message):
        read_peft_lora(tmp_path / "p")


def test_bad_nest_input_exits_2(tiny_model_dir, tmp_path, capsys):
    peft_adapter(tiny_model_dir, tmp_path / "peft")
    capsys.readouterr()
    assert main(["nest", str(tmp_path / "missing"), "--out", str(tmp_path / "n")]) == 2
    assert "PEFT adapter folder" in capsys.readouterr().err
    assert main(["nest", str(tmp_path / "peft"), "--ranks", "1,8", "--out", str(tmp_path / "n")]) == 2
    assert re.search(r"integers in 1\.\.6 .*invalid: \[8\]", capsys.readouterr().err)
    assert main(["nest", str(tmp_path / "peft"), "--out", str(tmp_path / "peft")]) == 2
    assert "is the input adapter itself" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_nest_with_eval_data_stores_the_nested_checkpoints_own_table(tiny_model_dir, tmp_path, capsys):
    """trainer nest --eval-data: the table is that of the nested checkpoint, scored after nesting."""
    from trainer.checkpoint import load_adapter
    from trainer.data import load_examples
    from trainer.evaluate import answer_scores

    peft_adapter(tiny_model_dir, tmp_path / "peft")
    assert main(["nest", str(tmp_path / "peft"), "--model", str(tiny_model_dir), "--eval-data", "facts:6",
                 "--out", str(tmp_path / "n")]) == 0
    table = json.loads((tmp_path / "n" / META).read_text())["eval"]
    assert list(table["per_rank"]) == ["0", "1", "2", "4", "6"] and table["data"] == "facts:6"
    assert "eval on facts:6 (6 examples" in capsys.readouterr().out
    model, tok = load_tiny(tiny_model_dir)
    adapter, _ = load_adapter(tmp_path / "n", model)
    adapter.set_rank(2)
    nll, _ = answer_scores(model, load_examples("facts:6", tok, None, None)[0], tok.pad_token_id, 16)
    assert table["per_rank"]["2"]["nll"] == pytest.approx(nll, rel=1e-4)
