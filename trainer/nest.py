"""Make an existing PEFT LoRA adapter rank-elastic without retraining: SVD nesting.

Per layer, PEFT adds ``ΔW = s_p · B A`` with ``A`` (r, in), ``B`` (out, r) and
``s_p = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``). Its thin SVD comes from the
factors alone — QR of each factor, then the SVD of a small core; never an out×in matrix::

    B  = Q_B R_B            Q_B (out, m), R_B (m, r), m = min(out, r)
    Aᵀ = Q_A R_A            Q_A (in, n),  R_A (n, r), n = min(in, r)
    s_p R_B R_Aᵀ = U Σ Vᵀ   the (m, n) core; σ_1 ≥ σ_2 ≥ … ≥ 0
    ΔW = (Q_B U) Σ (Q_A V)ᵀ

The nested factors split each singular value evenly between them and divide by ``c = s(r)``::

    B' = Q_B U √(Σ / c)      A' = √(Σ / c) (Q_A V)ᵀ

Rank-k inference (rule ``paper``, the default here) computes
``s(k) B'[:, :k] A'[:k] = (s(k) / s(r)) · Σ_{i≤k} σ_i u_i v_iᵀ``. The
sum is the best rank-k approximation of ΔW (Eckart–Young; Frobenius error √(Σ_{i>k} σ_i²)), and
at k = r it is ΔW exactly. The factor ``s(k)/s(r)`` is 1 for every k only with scaling ``none``:
one set of factors cannot carry a different ``s(k)`` per prefix (component 1 is in every prefix),
so with ``sqrt`` rank k is the best approximation *amplified* by √(r/k) (×4 at k = 1 for r = 16).
``none`` is therefore the default here; ``sqrt``/``rank`` are accepted with a warning. Rule
``trained`` (c_k = s(r)·1ₖ) serves the best approximation exactly under any scaling.

Layers with a smaller rank (PEFT's ``rank_pattern``) are padded with zero components. Only the
base model's config is read (the model is built on the meta device for the fingerprint and the
shape check), so nesting an adapter of a large model costs no weight loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from torch import nn

from trainer.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointError,
    base_model_identity,
    validate_tensors,
    write_adapter,
)
from trainer.inject import PEFT_PREFIX, AdapterConfig, NestedAdapter, find_targets
from trainer.models import resolve_model_path
from trainer.nested import SCALINGS, default_ranks, scale, validate_ranks

log = logging.getLogger(__name__)
_KEY = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")
# PEFT options that change what the tensors mean: (field, is it at its plain-LoRA value?)
_UNSUPPORTED = {
    "use_dora": lambda v: not v,
    "fan_in_fan_out": lambda v: not v,
    "alpha_pattern": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "lora_bias": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,
}


@dataclass
class PeftLora:
    """A PEFT LoRA folder, read and checked: per module, A (r_l, in) and B (out, r_l)."""

    path: Path
    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name → (A, B)
    sha256: str

    @property
    def r(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())

    def scale(self, r_layer: int) -> float:
        """PEFT's s_p for a layer of rank r_layer: lora_alpha / r, or / √r with use_rslora."""
        alpha = self.config.get("lora_alpha", 8)
        return alpha / (math.sqrt(r_layer) if self.config.get("use_rslora") else r_layer)


def read_peft_lora(folder: str | Path) -> PeftLora:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors``; CheckpointError names the problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"PEFT adapter folder {folder} does not exist")
    if not (folder / ADAPTER_CONFIG).is_file():
        have = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise CheckpointError(f"{folder} is not a PEFT LoRA adapter folder: no {ADAPTER_CONFIG} (it has: {have})")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not valid JSON: {e}") from e
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder} holds a {config.get('peft_type')!r} adapter; only peft_type "
                              "'LORA' can be nested")
    bad = [f"{f}={config[f]!r}" for f, plain in _UNSUPPORTED.items() if f in config and not plain(config[f])]
    if bad:
        raise CheckpointError(f"{folder} uses LoRA variants that SVD nesting does not support: "
                              f"{', '.join(bad)} (plain LoRA needs these off/empty)")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = " (adapter_model.bin is a pickle, which is never loaded here: re-save it with " \
               "save_pretrained(..., safe_serialization=True))" if (folder / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{folder} has no {ADAPTER_WEIGHTS}{hint}")
    blob = weights.read_bytes()
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from e
    return PeftLora(folder, config, _pair_factors(tensors, weights), hashlib.sha256(blob).hexdigest())


def _pair_factors(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module → (A, B), checking that every tensor is a LoRA factor and each pair fits together."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None or t.dim() != 2:
            other.append(key)
        else:
            found.setdefault(m.group(1), {})[m.group(2)] = t
    problems = [f"{len(other)} tensors that are not plain LoRA factors (e.g. {other[:3]})"] if other else []
    for name, f in sorted(found.items()):
        if set(f) != {"A", "B"}:
            problems.append(f"{name} has only lora_{''.join(f)}")
        elif f["A"].shape[0] != f["B"].shape[1]:
            problems.append(f"{name}: lora_A {list(f['A'].shape)} and lora_B {list(f['B'].shape)} differ in rank")
        elif not all(torch.isfinite(t).all() for t in f.values()):
            problems.append(f"{name}: contains NaN or Inf")
    if not found:
        problems.append(f"no tensors named {PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight")
    if problems:
        raise CheckpointError(f"{where} is not a plain PEFT LoRA adapter: " + "; ".join(problems[:6]))
    return {name: (f["A"], f["B"]) for name, f in found.items()}


# -- the math ---------------------------------------------------------------------------------------
def thin_svd(A: torch.Tensor, B: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW = s · B A = U diag(σ) Vᵀ from the factors, in float64.

    A (r, in), B (out, r) → U (out, q), σ (q,) descending, V (in, q), with q = min(out, in, r).
    """
    Qb, Rb = torch.linalg.qr(B.double())  # (out, m), (m, r)
    Qa, Ra = torch.linalg.qr(A.double().t())  # (in, n), (n, r)
    core = s * (Rb @ Ra.t())  # (m, n): ΔW = Q_B core Q_Aᵀ
    U, sigma, Vh = torch.linalg.svd(core, full_matrices=False)  # (m, q), (q,), (q, n)
    return Qb @ U, sigma, Qa @ Vh.t()


def nested_factors(A: torch.Tensor, B: torch.Tensor, s: float, r_out: int, c: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A' (r_out, in), B' (out, r_out), σ) with B'[:, :k] A'[:k] = Σ_{i≤k} σ_i u_i v_iᵀ / c.

    Components past q = len(σ) are zero; r_out < q keeps the best rank-r_out part.
    """
    U, sigma, V = thin_svd(A, B, s)
    q = min(len(sigma), r_out)
    root = (sigma[:q] / c).sqrt()  # (q,): σ split evenly between the two factors
    A2 = A.new_zeros(r_out, A.shape[1], dtype=torch.float64)
    B2 = B.new_zeros(B.shape[0], r_out, dtype=torch.float64)
    A2[:q] = root[:, None] * V[:, :q].t()  # (q, in)
    B2[:, :q] = U[:, :q] * root  # (out, q)
    return A2.float(), B2.float(), sigma


def energy_kept(sigma: torch.Tensor, k: int) -> float:
    """Σ_{i≤k} σ_i² / Σ σ_i²: the share of ‖ΔW‖_F² a rank-k prefix keeps (1 for ΔW = 0)."""
    total = float((sigma ** 2).sum())
    return 1.0 if total == 0 else float((sigma[:k] ** 2).sum()) / total


# -- the recipe ---------------------------------------------------------------------------------------
def build_skeleton(model: str) -> nn.Module:
    """The base model's architecture on the meta device (config only, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(f"--model {model!r}: cannot read its config ({e}); pass the base model "
                                "the adapter was trained on as a local folder or hub id") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def choose_targets(model: nn.Module, peft_targets, modules: list[str]) -> list[str] | str:
    """The PEFT config's target_modules where they select exactly the adapted modules; else the
    module names themselves (layers_to_transform, exclude_modules, 'all-linear', …)."""
    if isinstance(peft_targets, (list, str)) and peft_targets:
        try:
            if set(find_targets(model, peft_targets)) == set(modules):
                return sorted(peft_targets) if isinstance(peft_targets, list) else peft_targets
        except ValueError:
            pass  # e.g. PEFT's 'all-linear' keyword: not a regex over module names
    return sorted(modules)


def nest_adapter(peft_dir: str | Path, out: str | Path, model: str | None = None,
                 ranks: list[int] | None = None, scaling: str = "none", inference_rule: str = "auto") -> Path:
    """Write the SVD-nested checkpoint of the PEFT LoRA adapter ``peft_dir`` to ``out``."""
    peft = read_peft_lora(peft_dir)
    out = Path(out)
    if out.resolve() == peft.path.resolve():
        raise ValueError(f"--out {out} is the input adapter itself; write the nested one to a new folder")
    if scaling not in SCALINGS:
        raise ValueError(f"--scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    ranks = validate_ranks(list(ranks), peft.r) if ranks else default_ranks(peft.r)
    r_out = ranks[-1]  # --ranks up to k < r keeps the best rank-k part
    model = model or peft.config.get("base_model_name_or_path")
    if not model:
        raise ValueError(f"{peft.path / ADAPTER_CONFIG} names no base_model_name_or_path; pass --model")
    if scaling != "none" and inference_rule in ("auto", "paper"):
        log.warning("--scaling %s: rank k serves (s(k)/s(%d)) × the best rank-k approximation (×%.3g at "
                    "rank %d); --scaling none or --inference-rule trained makes every prefix the best one",
                    scaling, r_out, scale(ranks[0], scaling) / scale(r_out, scaling), ranks[0])
    c = scale(r_out, scaling)
    tensors: dict[str, torch.Tensor] = {}
    energy = {k: 0.0 for k in ranks}
    for name, (A, B) in sorted(peft.factors.items()):
        A2, B2, sigma = nested_factors(A, B, peft.scale(A.shape[0]), r_out, c)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A2.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B2.contiguous()
        for k in ranks:
            energy[k] += energy_kept(sigma, k) / len(peft.factors)

    skeleton = build_skeleton(model)
    targets = choose_targets(skeleton, peft.config.get("target_modules"), list(peft.factors))
    cfg = AdapterConfig(method="svd", r=r_out, ranks=ranks, scaling=scaling, target_modules=targets,
                        inference_rule=inference_rule)
    validate_tensors(tensors, NestedAdapter.inject(skeleton, cfg), peft.path)  # names the misfit
    extra = {
        "nested_from": {"path": str(peft.path.resolve()), "adapter_sha256": peft.sha256, "r": peft.r,
                        **{f: peft.config.get(f) for f in ("lora_alpha", "use_rslora", "target_modules",
                                                             "base_model_name_or_path")}},
        "svd": {"energy_kept": {str(k): round(v, 6) for k, v in energy.items()}},
    }
    log.info("ΔW energy kept per rank (mean over %d modules): %s", len(peft.factors),
             "  ".join(f"{k}:{v:.3f}" for k, v in energy.items()))
    return write_adapter(out, tensors, cfg, base_model_identity(skeleton, model), extra)
