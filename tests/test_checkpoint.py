"""The checkpoint folder: round trip, PEFT compatibility, and clear failures."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_model, load_tiny, logits, trained_adapter
from trainer.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    META,
    CheckpointError,
    load_adapter,
    peft_scaling_fields,
    read_meta,
    save_adapter,
)


@pytest.fixture
def ids():
    return torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def test_round_trip_restores_outputs_at_every_rank(tiny_model_dir, tmp_path, ids):
    model, _, adapter = trained_adapter(tiny_model_dir)
    save_adapter(tmp_path / "ck", adapter, str(tiny_model_dir), {"step": 3})
    fresh, _ = load_tiny(tiny_model_dir)
    loaded, meta = load_adapter(tmp_path / "ck", fresh)
    assert meta["method"] == "matryoshka" and meta["ranks"] == [1, 2, 4, 8] and meta["step"] == 3
    for k in [0, 1, 2, 4, 8]:
        adapter.set_rank(k)
        loaded.set_rank(k)
        torch.testing.assert_close(logits(fresh, ids), logits(model, ids))


def test_matryoshka_json_has_the_documented_fields(tiny_model_dir, tmp_path):
    _, _, adapter = trained_adapter(tiny_model_dir)
    save_adapter(tmp_path, adapter, "tiny")
    meta = json.loads((tmp_path / META).read_text())
    for field in ["format_version", "method", "r", "ranks", "scaling", "target_modules", "base_model", "eval"]:
        assert field in meta
    assert set(meta["base_model"]) == {"name", "config", "fingerprint"}
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("method, rule", [("lora", "auto"), ("dylora", "auto"), ("matryoshka", "paper")])
def test_peft_loads_the_folder_with_our_full_rank_outputs(tiny_model_dir, tmp_path, ids, scaling, method, rule):
    """Where c_r is uniform (s(r)·1), PEFT's one scaling reproduces our rank r from the raw folder."""
    from peft import PeftModel

    model, _, adapter = trained_adapter(tiny_model_dir, scaling=scaling, method=method, inference_rule=rule)
    save_adapter(tmp_path, adapter, str(tiny_model_dir))
    adapter.set_rank(8)
    ours = logits(model, ids)
    base, _ = load_tiny(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx({"none": 1, "rank": 1 / 8, "sqrt": 1 / math.sqrt(8)}[scaling])
    torch.testing.assert_close(logits(peft_model, ids), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["trained", "partial"])
def test_a_folder_peft_cannot_reproduce_has_no_peft_config(tiny_model_dir, tmp_path, rule):
    """Matryoshka served with p[:r] is not any single PEFT scaling: PEFT must fail loudly rather
    than serve another function; `trainer export` is the way there (it folds c into A)."""
    _, _, adapter = trained_adapter(tiny_model_dir, inference_rule=rule)
    (tmp_path / ADAPTER_CONFIG).write_text("{}")  # a stale one from an earlier save is removed too
    save_adapter(tmp_path, adapter, str(tiny_model_dir))
    assert not (tmp_path / ADAPTER_CONFIG).exists()
    load_adapter(tmp_path, load_tiny(tiny_model_dir)[0])  # still a servable nested checkpoint


@pytest.mark.parametrize("rule", ["trained", "paper", "partial"])
def test_inference_coefficients_round_trip_through_save_and_load(tiny_model_dir, tmp_path, ids, rule):
    model, _, adapter = trained_adapter(tiny_model_dir, inference_rule=rule)
    save_adapter(tmp_path, adapter, str(tiny_model_dir))
    meta = read_meta(tmp_path)
    assert meta["format_version"] == 2 and meta["inference"]["rule"] == rule
    assert {int(k): v for k, v in meta["inference"]["coeffs"].items()} == adapter.config.coeffs
    loaded, _ = load_adapter(tmp_path, load_tiny(tiny_model_dir)[0])
    assert (loaded.config.inference_rule, loaded.config.coeffs) == (rule, adapter.config.coeffs)
    for k in [1, 4, 8]:
        adapter.set_rank(k)
        loaded.set_rank(k)
        torch.testing.assert_close(logits(loaded.model, ids), logits(model, ids), rtol=0, atol=0)


def test_the_inference_rule_can_be_overridden_at_load(tiny_model_dir, tmp_path, ids):
    model, _, adapter = trained_adapter(tiny_model_dir)  # matryoshka: trained by default
    save_adapter(tmp_path, adapter, str(tiny_model_dir))
    paper, _ = load_adapter(tmp_path, load_tiny(tiny_model_dir)[0], inference_rule="paper")
    assert paper.config.inference_rule == "paper"
    assert paper.config.coeffs[8] == [1 / math.sqrt(8)] * 8
    adapter.set_inference_rule("paper")
    torch.testing.assert_close(logits(paper.model, ids), logits(model, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="--inference-rule must be one of auto, trained, paper, partial"):
        load_adapter(tmp_path, load_tiny(tiny_model_dir)[0], inference_rule="half")


def test_a_format_1_checkpoint_loads_under_its_methods_default_rule_with_a_note(tiny_model_dir, tmp_path, caplog):
    _, _, adapter = trained_adapter(tiny_model_dir)
    save_adapter(tmp_path, adapter, str(tiny_model_dir))
    meta = json.loads((tmp_path / META).read_text())
    del meta["inference"]
    meta["format_version"] = 1
    (tmp_path / META).write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        loaded, _ = load_adapter(tmp_path, load_tiny(tiny_model_dir)[0])
    assert loaded.config.inference_rule == "trained"
    assert "format-1 checkpoint" in caplog.text and "--inference-rule paper" in caplog.text
    old, _ = load_adapter(tmp_path, load_tiny(tiny_model_dir)[0], inference_rule="paper")
    assert old.config.coeffs[4] == [0.5] * 4  # how format 1 served rank 4: s(4)·1₄


def test_a_corrupt_coefficient_table_is_refused_naming_the_rank(tiny_model_dir, tmp_path):
    _, _, adapter = trained_adapter(tiny_model_dir)
    save_adapter(tmp_path, adapter, str(tiny_model_dir))
    meta = json.loads((tmp_path / META).read_text())
    meta["inference"]["coeffs"]["4"] = [1.0, 2.0]
    (tmp_path / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"rank 4 has 2 coefficients \(expected 4\)"):
        load_adapter(tmp_path, load_tiny(tiny_model_dir)[0])


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_peft_scaling_fields_give_s_of_k(k, scaling):
    f = peft_scaling_fields(k, scaling)
    peft_scale = f["lora_alpha"] / (math.sqrt(k) if f["use_rslora"] else k)
    assert peft_scale == pytest.approx({"none": 1, "rank": 1 / k, "sqrt": 1 / math.sqrt(k)}[scaling])


def test_missing_meta_is_a_clear_error(tmp_path, tiny_model_dir):
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(CheckpointError, match="no matryoshka.json.*trainer nest"):
        read_meta(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_meta(tmp_path / "nope")


def test_tensors_changed_after_writing_are_detected(tiny_model_dir, tmp_path):
    _, _, adapter = trained_adapter(tiny_model_dir)
    save_adapter(tmp_path, adapter, "tiny")
    (tmp_path / ADAPTER_WEIGHTS).write_bytes((tmp_path / ADAPTER_WEIGHTS).read_bytes()[:-100])
    fresh, _ = load_tiny(tiny_model_dir)
    with pytest.raises(CheckpointError, match="does not match the digest"):
        load_adapter(tmp_path, fresh)


def _rewrite_tensors(folder, edit):
    """Edit the tensors and re-stamp the digest, as a hand-made (not truncated) file would be."""
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / ADAPTER_WEIGHTS)
    meta = json.loads((folder / META).read_text())
    meta.pop("adapter_sha256")
    (folder / META).write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(next(k for k in t if "q_proj.lora_A" in k)), "1 missing tensors"),
    (lambda t: t.update(extra=torch.zeros(2)), "1 unexpected tensors"),
    (lambda t: t.update({next(k for k in t if "v_proj.lora_B" in k): torch.zeros(3, 8)}), r"shape \[3, 8\]"),
    (lambda t: t[next(k for k in t if "o_proj.lora_A" in k)].__setitem__((0, 0), float("nan")), "NaN or Inf"),
])
def test_corrupt_tensors_fail_with_what_is_wrong(tiny_model_dir, tmp_path, edit, message):
    _, _, adapter = trained_adapter(tiny_model_dir)
    save_adapter(tmp_path, adapter, "tiny")
    _rewrite_tensors(tmp_path, edit)
    fresh, _ = load_tiny(tiny_model_dir)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(tmp_path, fresh)


def test_a_different_base_model_is_refused_naming_the_difference(tiny_model_dir, tmp_path):
    _, _, adapter = trained_adapter(tiny_model_dir)
    save_adapter(tmp_path / "ck", adapter, "tiny")
    other_dir = tmp_path / "other"
    build_tiny_model(other_dir)
    cfg = json.loads((other_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (other_dir / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(other_dir, ignore_mismatched_sizes=True)
    with pytest.raises(CheckpointError, match="intermediate_size: checkpoint 128, model 96"):
        load_adapter(tmp_path / "ck", other)


def test_info_cli_prints_the_p_vector(tiny_model_dir, tmp_path):
    _, _, adapter = trained_adapter(tiny_model_dir)
    save_adapter(tmp_path, adapter, "tiny")
    out = subprocess.run([sys.executable, "-m", "trainer", "info", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["p"][0] == pytest.approx(1 + 2 ** -0.5 + 0.5 + 8 ** -0.5, abs=1e-6)
    text = subprocess.run([sys.executable, "-m", "trainer", "info", str(tmp_path)],
                          capture_output=True, text=True, check=True).stdout
    assert "p[5..8]=0.353553" in text
    assert "rule trained" in text  # Matryoshka's default: full rank serves p itself
    assert "rank    8  c[1]=2.560660  c[2]=1.560660  c[3..4]=0.853553  c[5..8]=0.353553" in text
    bad = subprocess.run([sys.executable, "-m", "trainer", "info", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final file must read like a plain open()
    made it, so a server running as another user (a container) can load the checkpoint."""
    import os

    from trainer.checkpoint import UMASK, atomic_write_json

    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~UMASK
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert os.stat(plain).st_mode & 0o777 == (tmp_path / "x.json").stat().st_mode & 0o777
