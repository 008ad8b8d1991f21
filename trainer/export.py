"""Export one rank of a nested checkpoint as a plain PEFT LoRA adapter.

At rank k our inference computes ``y = W x + s(k) · B[:, :k] A[:k] x``. PEFT computes
``y = W x + scaling · B A x`` with ``scaling = lora_alpha / r`` (``lora_alpha / √r`` with
``use_rslora``). The export holds the prefix ``A[:k]`` (k, in) and ``B[:, :k]`` (out, k) with
``r = k`` and ``lora_alpha``/``use_rslora`` chosen so that PEFT's scaling is ``s(k)``
(:func:`trainer.checkpoint.peft_scaling_fields`): PEFT, vLLM, TGI or LoRAX then serve exactly our
rank-k model. The folder keeps a ``matryoshka.json`` (``r = k``, the ranks up to k,
``exported_from``), so it is also a nested checkpoint that serves every rank up to k.

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


def export_rank(ckpt: str | Path, k: int, out: str | Path) -> Path:
    """Write the rank-k prefix of checkpoint ``ckpt`` to ``out`` as a PEFT adapter; returns ``out``."""
    ckpt, out = Path(ckpt), Path(out)
    meta = read_meta(ckpt)
    if k not in meta["ranks"]:
        raise ValueError(
            f"--rank {k} is not in the rank set of {ckpt}; valid ranks are {meta['ranks']} "
            "(rank 0 is the base model alone: there is no adapter to export)")
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; export into a new folder")
    tensors = slice_rank(read_adapter_tensors(ckpt, meta), k, meta["r"], ckpt)
    provenance = {
        "exported_from": {"path": str(ckpt.resolve()), "r": meta["r"], "ranks": meta["ranks"],
                          "adapter_sha256": meta.get("adapter_sha256")},
        **{f: meta[f] for f in ("training", "data", "step", "nested_from") if f in meta},
    }
    return write_adapter(out, tensors, adapter_config_from_meta(meta), meta["base_model"], provenance, k)
