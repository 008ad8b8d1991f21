"""Resumable training state (optimizer, scheduler, RNGs, step) as safetensors + JSON, never pickle."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trainer.checkpoint import META as META_NAME
from trainer.checkpoint import (
    TRAINING_STATE,
    TRAINING_TENSORS,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    read_adapter_tensors,
    read_json,
    read_meta,
)


def save_training_state(out: Path, step: int, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                        config: dict, adapter_sha256: str) -> None:
    """Written after the adapter's files; ``adapter_sha256`` names the weights this state belongs
    to, so that a save cut short between the two is refused on resume instead of continuing
    from one step's adapter with another step's optimizer."""
    sd = optimizer.state_dict()
    tensors = {
        f"optimizer.{idx}.{key}": value.detach().cpu().contiguous()
        for idx, state in sd["state"].items()
        for key, value in state.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.sampler"] = generator.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_write_bytes(out / TRAINING_TENSORS, st_save(tensors))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    atomic_write_json(out / TRAINING_STATE, {
        "step": step,
        "adapter_sha256": adapter_sha256,
        "config": config,
        "scheduler": sched,
        "optimizer_param_groups": sd["param_groups"],
    })


def read_training_state(ckpt: Path) -> dict:
    if not (ckpt / TRAINING_STATE).is_file() or not (ckpt / TRAINING_TENSORS).is_file():
        raise CheckpointError(
            f"--resume {ckpt}: no {TRAINING_STATE}/{TRAINING_TENSORS} there, so training cannot "
            "continue from it (exports and nested adapters hold weights only)"
        )
    state = read_json(ckpt / TRAINING_STATE)
    meta = read_meta(ckpt)
    ties = [(state.get("adapter_sha256"), meta.get("adapter_sha256")), (state.get("step"), meta.get("step"))]
    if any(a is not None and b is not None and a != b for a, b in ties):  # None: written before the tie
        raise CheckpointError(
            f"--resume {ckpt}: its {TRAINING_STATE} (step {state.get('step')}) belongs to other adapter "
            f"weights than its {META_NAME} (step {meta.get('step')}): a save was cut short. Resume from "
            "an earlier checkpoint (--resume latest picks the newest complete one)")
    try:
        state["tensors"] = st_load((ckpt / TRAINING_TENSORS).read_bytes())
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise CheckpointError(f"--resume {ckpt}: {TRAINING_TENSORS} is not readable: {e}") from e
    return state


def latest_checkpoint(out: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint under a run's ``out`` folder (``out`` itself or ``out/step-N``) that
    can be resumed whole (state, metadata and weights agree), and why the newer ones cannot."""
    found, skipped = [], []
    for ckpt in [out, *out.glob("step-*")]:
        if not (ckpt / TRAINING_STATE).is_file():
            continue
        try:
            state = read_training_state(ckpt)
            read_adapter_tensors(ckpt, read_meta(ckpt))
        except CheckpointError as e:
            skipped.append(f"{ckpt}: {e}")
            continue
        found.append((int(state["step"]), ckpt))
    if not found:
        raise CheckpointError(f"--resume latest: no complete checkpoint under {out}"
                              + ("".join(f"\n  {s}" for s in skipped) if skipped else " (none was saved)"))
    return max(found)[1], skipped


def restore_training_state(state: dict, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler,
                           generator: torch.Generator) -> int:
    """Load optimizer, scheduler and RNGs from :func:`read_training_state`; returns the step."""
    tensors = state["tensors"]
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.sampler"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(state["step"])
