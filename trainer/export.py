"""Export one rank of a nested checkpoint as a plain PEFT LoRA adapter.

At rank k our inference computes ``y = W x + B[:, :k] (c_k ⊙ A[:k] x)``, with c_k from the
checkpoint's inference rule (``trainer.nested``). PEFT computes ``y = W x + scaling · B A x`` with
one number ``scaling = lora_alpha / r``. The export folds the coefficients into A::

    A' = diag(c_k) A[:k]   (k, in)      B' = B[:, :k]   (out, k)      lora_alpha = r = k  (scaling 1)

so PEFT, vLLM, TGI or LoRAX serve exactly our rank-k function, whatever the rule. The folder keeps a
``matryoshka.json`` (``r = k``, the ranks j ≤ k, ``exported_from``) whose coefficient table is
c_j / c_k[:j] (rule ``exported``), so it is also a nested checkpoint that serves every rank up to
k as the source does. ``--inference-rule`` chooses the rule of the source before folding.

No base model is loaded: the tensors are sliced from the digest-checked file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from trainer.checkpoint import (
    ADAPTER_WEIGHTS,
    CheckpointError,
    adapter_config_from_meta,
    read_adapter_tensors,
    read_meta,
    write_adapter,
)
from trainer.inject import AdapterConfig

EXPORTED = "exported"  # the inference rule of an export: its table is relative to the folded c_k

_FACTOR = re.compile(r".+\.lora_([AB])\.weight")


def slice_rank(tensors: dict[str, torch.Tensor], k: int, r: int, where: Path) -> dict[str, torch.Tensor]:
    """The rank-k prefix of PEFT-format tensors: A (r, in) → A[:k]; B (out, r) → B[:, :k]."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _FACTOR.fullmatch(key)
        rank_dim = {"A": 0, "B": 1}.get(m.group(1)) if m else None
        if rank_dim is None or t.dim() != 2 or t.shape[rank_dim] != r:
            raise CheckpointError(
                f"{where / ADAPTER_WEIGHTS}: {key} has shape {list(t.shape)}; a rank-{r} checkpoint holds "
                f"only .lora_A.weight ({r}, in) and .lora_B.weight (out, {r}) tensors")
        out[key] = t.narrow(rank_dim, 0, k).contiguous()
    return out


def fold_coeffs(tensors: dict[str, torch.Tensor], c: torch.Tensor) -> dict[str, torch.Tensor]:
    """A (k, in) → diag(c) A: the rank-k coefficients moved into the weights (computed in float64)."""
    out = dict(tensors)
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight"):
            out[key] = (c[:, None] * t.double()).to(t.dtype).contiguous()
    return out


def exported_config(cfg: AdapterConfig, k: int) -> AdapterConfig:
    """The export's adapter: ranks j ≤ k with coefficients c_j / c_k[:j] relative to the folded c_k."""
    ck = cfg.coeffs[k]
    table = {}
    for j in (x for x in cfg.ranks if x <= k):
        if any(ck[i] == 0 and cfg.coeffs[j][i] != 0 for i in range(j)):
            raise ValueError(f"rank {k}'s coefficients have zeros where rank {j}'s do not; rank {j} "
                             f"cannot be expressed relative to rank {k}")
        table[j] = [cj / ci if ci else 0.0 for cj, ci in zip(cfg.coeffs[j], ck)]
    return AdapterConfig(method=cfg.method, r=k, ranks=sorted(table), scaling=cfg.scaling,
                         target_modules=cfg.target_modules, a_init=cfg.a_init,
                         inference_rule=EXPORTED, coeffs=table)


def export_rank(ckpt: str | Path, k: int, out: str | Path, inference_rule: str | None = None) -> Path:
    """Write the rank-k function of checkpoint ``ckpt`` to ``out`` as a PEFT adapter (coefficients
    folded into A, scaling 1); returns ``out``."""
    ckpt, out = Path(ckpt), Path(out)
    meta = read_meta(ckpt)
    if k not in meta["ranks"]:
        raise ValueError(
            f"--rank {k} is not in the rank set of {ckpt}; valid ranks are {meta['ranks']} "
            "(rank 0 is the base model alone: there is no adapter to export)")
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; export into a new folder")
    cfg = adapter_config_from_meta(meta, inference_rule, str(ckpt))
    tensors = slice_rank(read_adapter_tensors(ckpt, meta), k, meta["r"], ckpt)
    tensors = fold_coeffs(tensors, torch.tensor(cfg.coeffs[k], dtype=torch.float64))
    provenance = {
        "exported_from": {"path": str(ckpt.resolve()), "r": meta["r"], "ranks": meta["ranks"],
                          "inference_rule": cfg.inference_rule, "adapter_sha256": meta.get("adapter_sha256")},
        **{f: meta[f] for f in ("training", "data", "step", "nested_from") if f in meta},
    }
    return write_adapter(out, tensors, exported_config(cfg, k), meta["base_model"], provenance, k)
