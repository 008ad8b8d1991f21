"""A corrupt or mismatched checkpoint makes the server exit non-zero, naming the problem, instead
of serving something else or hanging."""

from __future__ import annotations

import shutil

import pytest

from conftest import ServerProcess, build_tiny_model


def corrupt_weights(ckpt):
    w = ckpt / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # a save cut off half way


def corrupt_meta(ckpt):
    (ckpt / "matryoshka.json").write_text('{"format_version": 1, "method": ')


@pytest.mark.parametrize("damage, message", [(corrupt_weights, "only partly written"),
                                             (corrupt_meta, "is not valid JSON")])
def test_a_corrupt_checkpoint_exits_non_zero_naming_the_file(tiny_model_dir, tiny_checkpoint, tmp_path, damage,
                                                             message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    damage(ckpt)
    srv = ServerProcess("--model", str(tiny_model_dir), "--adapter", str(ckpt), "--calibrate-steps", "0")
    assert srv.proc.wait(120) != 0
    out = srv.output()
    assert message in out and str(ckpt) in out, out
    srv.stop()


def test_a_checkpoint_for_another_base_model_exits_non_zero_naming_the_mismatch(tiny_checkpoint, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = build_tiny_model(tmp_path / "other", seed=1)
    cfg = LlamaConfig.from_pretrained(other)
    cfg.hidden_size, cfg.intermediate_size = 32, 64  # another shape: the adapter cannot fit it
    LlamaForCausalLM(cfg).save_pretrained(other)
    srv = ServerProcess("--model", str(other), "--adapter", str(tiny_checkpoint), "--calibrate-steps", "0")
    assert srv.proc.wait(120) != 0
    out = srv.output()
    assert str(tiny_checkpoint) in out and ("fingerprint" in out or "does not fit" in out), out
    srv.stop()
