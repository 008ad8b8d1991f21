"""The checkpoint folder: the one artifact the trainer writes and the server reads.

Layout (safetensors and JSON only; nothing is ever unpickled)::

    adapter_model.safetensors   PEFT LoRA tensors at full rank: <PEFT_PREFIX><module>.lora_A.weight
                                (r, in) and .lora_B.weight (out, r)
    adapter_config.json         a PEFT LoraConfig for the raw tensors, written only where PEFT's
                                one scaling reproduces our rank r (c_r uniform: LoRA, DyLoRA,
                                SVD, rule paper); otherwise absent, so that PEFT fails loudly
                                instead of serving another function (`trainer export` folds c_k)
    matryoshka.json             format_version, method, r, ranks, scaling, target_modules,
                                inference {rule, coeffs: {k: c_k}}, base_model (name +
                                fingerprint), training args, step, eval, and the sha256 of
                                adapter_model.safetensors

Format 2 added ``inference``: how each rank k is served (``trainer.nested``). A format-1 checkpoint
has none; it loads under its method's default rule, and the log says which rule applies.
    training_state.safetensors  optimizer moments and RNG states (only where training can resume)
    trainer_state.json          step, scheduler, optimizer hyper-parameters

Every file is written to a temporary name, fsynced, then renamed; ``matryoshka.json`` goes
last and names the digest of the tensors it belongs to, so a reader never pairs metadata with
half-written or foreign weights. ``trainer_state.json`` names the same digest, so a resume never
pairs an optimizer with another step's adapter. A periodic checkpoint (``OUT/step-N``) is written
whole into a staging folder and renamed into place (:func:`staged_dir`): a process killed while
saving leaves the previous checkpoints as they were and no half of a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from trainer.inject import PEFT_PREFIX, AdapterConfig, NestedAdapter
from trainer.nested import SCALINGS, default_inference_rule, p_vector, scale

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
META = "matryoshka.json"
TRAINING_TENSORS = "training_state.safetensors"
TRAINING_STATE = "trainer_state.json"

# config fields that decide whether an adapter fits a base model
FINGERPRINT_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, or does not fit the base model."""


# -- atomic file writes -------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name beside ``path``, fsync, rename: a reader sees the old file or the
    new one, never half of one. Permissions as a plain ``open`` would give (mkstemp makes 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; when the block ends without an error it
    replaces ``path`` whole (one rename), otherwise it is removed. A crash leaves ``path`` as it
    was (at worst, while a folder of the same name is being replaced, moved aside to
    ``.NAME.old``) and a ``.NAME.partial`` folder that the next save clears."""
    path = Path(path)
    stage, old = path.parent / f".{path.name}.partial", path.parent / f".{path.name}.old"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.rename(path, old)
    os.rename(stage, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e


# -- base-model identity ------------------------------------------------------------------------------
def base_model_identity(model: nn.Module, name: str) -> dict:
    """``{name, config, fingerprint}``: the fingerprint hashes the config fields and the shapes of
    every linear module, so an adapter is only ever applied to a model it was trained on."""
    cfg = getattr(model, "config", None)
    fields = {f: getattr(cfg, f, None) for f in FINGERPRINT_FIELDS}
    # an injected layer keeps its base linear as `<name>.base`: the identity is the same either way
    shapes = {n.removesuffix(".base"): list(m.weight.shape)
              for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    blob = json.dumps({"config": fields, "linear_shapes": sorted(shapes.items())}, sort_keys=True)
    return {"name": name, "config": fields, "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def check_base_model(saved: dict, model: nn.Module, ckpt: Path) -> None:
    current = base_model_identity(model, saved.get("name", ""))
    if current["fingerprint"] == saved.get("fingerprint"):
        return
    diffs = [
        f"{f}: checkpoint {saved.get('config', {}).get(f)!r}, model {current['config'][f]!r}"
        for f in FINGERPRINT_FIELDS
        if saved.get("config", {}).get(f) != current["config"][f]
    ]
    detail = "; ".join(diffs) if diffs else "the shapes of its linear modules differ"
    raise CheckpointError(
        f"{ckpt} was trained on base model {saved.get('name')!r} (fingerprint "
        f"{saved.get('fingerprint')}), which does not match the model given (fingerprint "
        f"{current['fingerprint']}): {detail}. Pass the same --model the adapter was trained on."
    )


# -- PEFT config ------------------------------------------------------------------------------------------
def peft_scaling_fields(k: int, scaling: str) -> dict:
    """``lora_alpha``/``use_rslora`` such that PEFT's scaling equals s(k)."""
    if scaling == "none":
        return {"lora_alpha": k, "use_rslora": False}  # alpha / r = 1
    if scaling == "rank":
        return {"lora_alpha": 1, "use_rslora": False}  # 1 / r
    if scaling == "sqrt":
        return {"lora_alpha": 1, "use_rslora": True}  # 1 / √r
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


def peft_adapter_config(config: AdapterConfig, base_name: str, k: int | None = None) -> dict | None:
    """PEFT's LoraConfig for the raw rank-k tensors, or None where no PEFT config reproduces our
    rank k: PEFT multiplies ``B A`` by one number, so c_k must be uniform."""
    k = config.r if k is None else k
    c = config.coeffs[k]
    if any(v != c[0] for v in c):
        return None
    s_k = scale(k, config.scaling)
    fields = (peft_scaling_fields(k, config.scaling) if math.isclose(c[0], s_k, rel_tol=1e-12)
              else {"lora_alpha": c[0] * k, "use_rslora": False})  # lora_alpha / r = c
    targets = config.target_modules
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": k,
        **fields,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


# -- save / load --------------------------------------------------------------------------------------------
def save_adapter(out: str | Path, adapter: NestedAdapter, base_name: str, extra: dict | None = None,
                 k: int | None = None) -> Path:
    """Write the servable files (weights, PEFT config, matryoshka.json last). ``k`` < r writes
    the rank-k prefix (an export); ``extra`` adds fields to matryoshka.json (train args, step, eval)."""
    k = adapter.config.r if k is None else k
    return write_adapter(out, adapter.peft_state_dict(k), adapter.config,
                         base_model_identity(adapter.model, base_name), extra, k)


def write_adapter(out: str | Path, tensors: dict[str, torch.Tensor], cfg: AdapterConfig, base_model: dict,
                  extra: dict | None = None, k: int | None = None) -> Path:
    """:func:`save_adapter` from PEFT-format ``tensors`` already at rank k (A (k, in), B (out, k))
    and a ``base_model`` identity, so that a checkpoint can be re-written without its base model."""
    out = Path(out)
    k = cfg.r if k is None else k
    blob = st_save(tensors, metadata={"format": "pt"})
    atomic_write_bytes(out / ADAPTER_WEIGHTS, blob)
    peft_config = peft_adapter_config(cfg, base_model["name"], k)
    if peft_config is None:
        (out / ADAPTER_CONFIG).unlink(missing_ok=True)
    else:
        atomic_write_json(out / ADAPTER_CONFIG, peft_config)
    ranks = [x for x in cfg.ranks if x <= k]
    meta = {
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "r": k,
        "ranks": ranks,
        "scaling": cfg.scaling,
        "target_modules": cfg.target_modules,
        "a_init": cfg.a_init,
        "inference": {"rule": cfg.inference_rule, "coeffs": {str(j): cfg.coeffs[j] for j in ranks}},
        "base_model": base_model,
        "adapter_sha256": hashlib.sha256(blob).hexdigest(),
        "eval": {},
        **(extra or {}),
    }
    atomic_write_json(out / META, meta)
    return out


def read_meta(ckpt: str | Path) -> dict:
    """matryoshka.json, validated; CheckpointError says what is wrong and how to fix it."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt} does not exist")
    if not (ckpt / META).is_file():
        have = ", ".join(sorted(p.name for p in ckpt.iterdir())) or "nothing"
        hint = (" It looks like a plain PEFT adapter: make it rank-elastic with `trainer nest`."
                if (ckpt / ADAPTER_CONFIG).exists() else "")
        raise CheckpointError(f"{ckpt} is not a nested-LoRA checkpoint: no {META} (it has: {have}).{hint}")
    meta = read_json(ckpt / META)
    missing = [f for f in ("format_version", "method", "r", "ranks", "scaling", "target_modules", "base_model")
               if f not in meta]
    if missing:
        raise CheckpointError(f"{ckpt / META} lacks the fields {missing}; the checkpoint is corrupt")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt} has format_version {meta['format_version']}; this version reads up to "
            f"{FORMAT_VERSION}. Upgrade the package."
        )
    if meta["scaling"] not in SCALINGS:
        raise CheckpointError(f"{ckpt / META}: scaling {meta['scaling']!r} is not one of {SCALINGS}")
    return meta


def adapter_config_from_meta(meta: dict, inference_rule: str | None = None, where: str = "") -> AdapterConfig:
    """The adapter a checkpoint describes, served under its stored inference rule, or under
    ``inference_rule`` when given (an override: ``--inference-rule``)."""
    stored = meta.get("inference")
    if stored is None and meta.get("format_version", 1) >= 2:
        raise CheckpointError(f"{where or META} (format {meta['format_version']}) lacks 'inference'; "
                              "the checkpoint is corrupt")
    if stored is None:  # format 1: no rule was stored; rank k was served as s(k)·1ₖ then
        rule = default_inference_rule(meta["method"])
        log.warning("%s: format-1 checkpoint (no inference rule stored); serving every rank with the "
                    "%s rule %r (before format 2 every rank was served with 'paper', s(k)·1ₖ; pass "
                    "--inference-rule paper for that)", where or "checkpoint", meta["method"], rule)
        stored = {"rule": rule, "coeffs": {}}
    if not isinstance(stored, dict) or not isinstance(stored.get("rule"), str):
        raise CheckpointError(f"{where or META}: 'inference' must be {{rule, coeffs}}; got {stored!r:.200}")
    try:
        cfg = AdapterConfig(
            method=meta["method"], r=meta["r"], ranks=meta["ranks"], scaling=meta["scaling"],
            target_modules=meta["target_modules"], a_init=meta.get("a_init", "peft"),
            inference_rule=stored["rule"], coeffs=stored.get("coeffs") or {},
        )
    except ValueError as e:
        raise CheckpointError(f"{where or META}: {e}") from e
    return cfg if inference_rule in (None, stored["rule"]) else cfg.with_rule(inference_rule)


def read_adapter_tensors(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    path = ckpt / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has {META} but no {ADAPTER_WEIGHTS}")
    blob = path.read_bytes()
    digest = meta.get("adapter_sha256")
    if digest and hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(
            f"{path} does not match the digest in {META}: the file was changed or only partly "
            "written. Re-save the checkpoint or restore the file."
        )
    try:
        return st_load(blob)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def validate_tensors(tensors: dict[str, torch.Tensor], adapter: NestedAdapter, ckpt: Path) -> None:
    r = adapter.config.r
    expected: dict[str, tuple[int, int]] = {}
    for name, layer in adapter.layers.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, layer.base.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (layer.base.out_features, r)
    problems: list[str] = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    for key, shape in expected.items():
        t = tensors.get(key)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            problems.append(f"{key}: shape {list(t.shape)} in the file, {list(shape)} expected")
        elif not torch.isfinite(t).all():
            problems.append(f"{key}: contains NaN or Inf")
    if problems:
        raise CheckpointError(f"{ckpt / ADAPTER_WEIGHTS} does not fit the model: " + "; ".join(problems[:8]))


def load_adapter_weights(ckpt: Path, adapter: NestedAdapter) -> dict:
    """Load a checkpoint's tensors into an already-injected adapter (validated); returns its meta."""
    meta = read_meta(ckpt)
    check_base_model(meta["base_model"], adapter.model, ckpt)
    tensors = read_adapter_tensors(ckpt, meta)
    validate_tensors(tensors, adapter, ckpt)
    adapter.load_peft_state_dict(tensors)
    return meta


def load_adapter(ckpt: str | Path, model: nn.Module, inference_rule: str | None = None
                 ) -> tuple[NestedAdapter, dict]:
    """Inject the checkpoint's adapter into ``model`` (in place) and load its weights.

    Validates, in order: matryoshka.json, the base-model fingerprint, the weights' digest,
    tensor keys, shapes, and finiteness. Returns the adapter (set to full rank) and the metadata.
    ``inference_rule`` overrides the stored rule (e.g. ``paper``, to reproduce the paper).
    """
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    check_base_model(meta["base_model"], model, ckpt)
    tensors = read_adapter_tensors(ckpt, meta)
    adapter = NestedAdapter.inject(model, adapter_config_from_meta(meta, inference_rule, str(ckpt / META)))
    validate_tensors(tensors, adapter, ckpt)
    adapter.load_peft_state_dict(tensors)
    return adapter, meta


def update_meta(ckpt: str | Path, **fields: Any) -> dict:
    """Atomically replace fields of matryoshka.json (e.g. the eval table)."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    meta.update(fields)
    atomic_write_json(ckpt / META, meta)
    return meta


def describe(meta: dict) -> dict:
    """What ``trainer info`` shows: the metadata plus the training p vector, s(k) per rank and
    the coefficients every rank is served with."""
    p = p_vector(meta["method"], meta["r"], meta["ranks"], meta["scaling"])
    cfg = adapter_config_from_meta(meta)
    return {
        **meta,
        "p": [round(float(v), 6) for v in p],
        "scale_per_rank": {str(k): round(scale(k, meta["scaling"]), 6) for k in meta["ranks"]},
        "inference": {"rule": cfg.inference_rule, "coeffs": {str(k): c for k, c in cfg.coeffs.items()}},
    }
