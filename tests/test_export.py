"""trainer export: a rank-k prefix as a plain PEFT adapter that PEFT serves exactly like our rank k."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import load_tiny
from conftest import logits, trained_adapter
from trainer.checkpoint import ADAPTER_CONFIG, META, CheckpointError, load_adapter, save_adapter
from trainer.cli import main
from trainer.export import export_rank


@pytest.fixture
def ids():
    return torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, rule, scaling", [
    ("matryoshka", "trained", "sqrt"), ("matryoshka", "partial", "sqrt"), ("matryoshka", "paper", "sqrt"),
    ("matryoshka", "trained", "rank"), ("matryoshka", "trained", "none"),
    ("lora", "paper", "sqrt"), ("lora", "trained", "sqrt"), ("dylora", "paper", "rank"),
])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_peft_serves_the_export_exactly_as_our_rank_k(tiny_model_dir, tmp_path, ids, method, rule, scaling, k):
    """The export folds c_k into A: PEFT's forward with scaling 1 is our rank-k forward, whatever
    the inference rule (Matryoshka's p[:k] is no single PEFT scaling)."""
    from peft import PeftModel

    model, _, adapter = trained_adapter(tiny_model_dir, scaling=scaling, method=method, inference_rule=rule)
    ckpt = save_adapter(tmp_path / "ck", adapter, str(tiny_model_dir))
    export_rank(ckpt, k, tmp_path / "exp")
    adapter.set_rank(k)
    ours = logits(model, ids)
    peft_model = PeftModel.from_pretrained(load_tiny(tiny_model_dir)[0], str(tmp_path / "exp"))
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    assert layer.r["default"] == k
    assert layer.scaling["default"] == pytest.approx(1.0)
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-5, atol=1e-5)


def test_the_export_takes_another_inference_rule_when_asked(tiny_model_dir, tmp_path, ids):
    from peft import PeftModel

    model, _, adapter = trained_adapter(tiny_model_dir)  # matryoshka, stored rule: trained
    ckpt = save_adapter(tmp_path / "ck", adapter, str(tiny_model_dir))
    assert main(["export", str(ckpt), "--rank", "4", "--out", str(tmp_path / "exp"),
                 "--inference-rule", "paper"]) == 0
    adapter.set_inference_rule("paper")
    adapter.set_rank(4)
    peft_model = PeftModel.from_pretrained(load_tiny(tiny_model_dir)[0], str(tmp_path / "exp"))
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "exp" / META).read_text())["exported_from"]["inference_rule"] == "paper"
    exported, _ = load_adapter(tmp_path / "exp", load_tiny(tiny_model_dir)[0])
    with pytest.raises(ValueError, match="folded into its weights"):
        exported.set_inference_rule("trained")


@pytest.mark.parametrize("rule", ["trained", "paper"])
def test_the_export_is_a_nested_checkpoint_of_the_ranks_up_to_k(tiny_model_dir, tmp_path, ids, rule):
    """Rank j ≤ k of the export (coefficients c_j / c_k on the folded A) is rank j of the source."""
    model, _, adapter = trained_adapter(tiny_model_dir, inference_rule=rule)
    ckpt = save_adapter(tmp_path / "ck", adapter, str(tiny_model_dir), {"step": 7})
    export_rank(ckpt, 4, tmp_path / "exp")
    meta = json.loads((tmp_path / "exp" / META).read_text())
    assert (meta["r"], meta["ranks"], meta["step"]) == (4, [1, 2, 4], 7)
    assert meta["exported_from"]["path"] == str(ckpt.resolve()) and meta["exported_from"]["r"] == 8
    assert json.loads((tmp_path / "exp" / ADAPTER_CONFIG).read_text())["r"] == 4
    exported, _ = load_adapter(tmp_path / "exp", load_tiny(tiny_model_dir)[0])  # digest, shapes, fingerprint
    for k in [0, 1, 2, 4]:
        adapter.set_rank(k)
        exported.set_rank(k)
        torch.testing.assert_close(logits(exported.model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    exported.merge(2)  # merging works on the export's relative coefficients too
    adapter.set_rank(2)
    torch.testing.assert_close(logits(exported.model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"valid ranks are \[0, 1, 2, 4\]"):
        exported.set_rank(8)


@pytest.mark.parametrize("args, message", [
    (["--rank", "3"], r"--rank 3 is not in the rank set of .*; valid ranks are \[1, 2, 4, 8\]"),
    (["--rank", "0"], r"valid ranks are \[1, 2, 4, 8\] \(rank 0 is the base model"),
    (["--rank", "2", "--same-out"], "is the checkpoint itself"),
    (["--rank", "2", "--no-meta"], "no matryoshka.json"),
])
def test_bad_export_exits_2_saying_what_is_allowed(tiny_model_dir, tmp_path, capsys, args, message):
    _, _, adapter = trained_adapter(tiny_model_dir)
    ckpt = save_adapter(tmp_path / "ck", adapter, str(tiny_model_dir))
    out = tmp_path / "exp"
    if "--same-out" in args:
        out, args = ckpt, args[:2]
    if "--no-meta" in args:
        (ckpt / META).unlink()
        args = args[:2]
    capsys.readouterr()  # drop the fixture's model-loading output
    assert main(["export", str(ckpt), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainer export: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "exp").exists()


def test_a_checkpoint_whose_meta_disagrees_with_its_tensors_is_refused(tiny_model_dir, tmp_path):
    _, _, adapter = trained_adapter(tiny_model_dir)
    ckpt = save_adapter(tmp_path / "ck", adapter, str(tiny_model_dir))
    meta = json.loads((ckpt / META).read_text())
    meta.update(r=16, ranks=[1, 2, 4, 8, 16], inference={"rule": "trained"})  # coefficients recomputed
    (ckpt / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"lora_[AB].weight has shape \[\d+, \d+\]; a rank-16 checkpoint holds"):
        export_rank(ckpt, 4, tmp_path / "exp")
