"""Find the target linears of a Hugging Face model, wrap them, and drive them as one adapter."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from trainer.flags import int_list, targets_arg
from trainer.nested import (
    INFERENCE_RULES,
    AInit,
    AdapterState,
    InferenceRule,
    Method,
    Scaling,
    TRAIN_METHODS,
    NestedLoRALinear,
    check_coeff_table,
    coeff_table,
    default_inference_rule,
    default_ranks,
    p_vector,
    validate_ranks,
)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a model wrapped by PeftModel


@dataclass
class AdapterConfig:
    """What the adapter is; stored in the checkpoint's ``matryoshka.json``."""

    method: Method = field(default="matryoshka", metadata={
        "choices": TRAIN_METHODS, "help": "lora, dylora or matryoshka: the same layer with a different coefficient vector "
                "(svd: nested after training by `trainer nest`)"})
    r: int = field(default=64, metadata={"flag": "--rank", "help": "r, the max rank: A is (r, in), B is (out, r)"})
    ranks: list[int] = field(default_factory=list, metadata={
        "parse": int_list, "help": "R, e.g. 1,2,4,8 (default: powers of two below r, then r)"})
    scaling: Scaling = field(default="sqrt", metadata={
        "help": "s(k): none → 1, rank → 1/k, sqrt → 1/√k (the reference runs' choice)"})
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS), metadata={
        "flag": "--targets", "parse": targets_arg,
        "help": "module-name suffixes (q_proj,v_proj) or re:<regex> that must match full module paths"})
    a_init: AInit = field(default="peft", metadata={
        "help": "A's kaiming-uniform fan-in: in_features (peft) or r (reference, the authors' code)"})
    inference_rule: Literal["auto"] | InferenceRule = field(default="auto", metadata={
        "help": "how rank k is served: trained (c_k = p[:k], the training forward's coefficients), "
                "paper (s(k)·1ₖ, the paper's rule) or partial (Σ_{j≤k} s(j)·1ⱼ); auto: trained for "
                "matryoshka, paper otherwise"})
    # {k: c_k} for every k ∈ R; empty → computed from the rule. A stored table is authoritative
    # (an export folds its coefficients into A, and no rule reproduces its table then)
    coeffs: dict[int, list[float]] = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        self.ranks = validate_ranks(list(self.ranks), self.r) if self.ranks else default_ranks(self.r)
        if self.inference_rule == "auto":
            self.inference_rule = default_inference_rule(self.method)
        if self.coeffs:
            self.coeffs = check_coeff_table(self.coeffs, self.ranks)
        elif self.inference_rule in INFERENCE_RULES:
            self.coeffs = coeff_table(self.inference_rule, self.method, self.r, self.ranks, self.scaling)
        else:
            raise ValueError(f"inference rule must be one of auto, {', '.join(INFERENCE_RULES)}; "
                             f"got {self.inference_rule!r}")

    def with_rule(self, rule: str) -> "AdapterConfig":
        """The same adapter served under another inference rule (``--inference-rule``)."""
        if rule not in ("auto", *INFERENCE_RULES):
            raise ValueError(f"--inference-rule must be one of auto, {', '.join(INFERENCE_RULES)}; got {rule!r}")
        if self.inference_rule not in INFERENCE_RULES:
            raise ValueError(f"this checkpoint's coefficients are {self.inference_rule!r} (folded into its "
                             "weights), so no other inference rule applies to it; choose the rule on the "
                             "checkpoint it came from")
        return replace(self, inference_rule=rule, coeffs={})

    def to_dict(self) -> dict:
        return asdict(self)


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the ``nn.Linear`` modules the adapter wraps; an error lists what the model has."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no nn.Linear module matches --targets {targets!r}. "
            f"This model's linear modules are named: {', '.join(linear) or '(none)'}"
        )
    return names


def _coeff_tensors(config: AdapterConfig) -> dict[int, torch.Tensor]:
    """The config's table {k: c_k} as float64 tensors (what the layers' coefficients are cut from)."""
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in config.coeffs.items()}


class NestedAdapter:
    """A nested LoRA adapter injected into a model: rank selection, merging, (de)serialisation.

    The base model's parameters are frozen; only ``lora_A``/``lora_Bt`` train. The model itself is
    modified in place (``self.model``); use it like the original.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, NestedLoRALinear]):
        self.model = model
        self.config = config
        self.layers = layers
        self.state = next(iter(layers.values())).state
        self.merged_rank: int | None = None  # rank folded into the base weights, if any
        self._coeffs = _coeff_tensors(config)
        self._pristine: dict[str, torch.Tensor] | None = None  # base weights before any remerge()
        self.groups: list = []  # trainer.fusion.FusedGroup, once fuse() ran (serving only)
        self._group_names: list[list[str]] = []  # the same groups, by module name

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def inject(cls, model: nn.Module, config: AdapterConfig) -> "NestedAdapter":
        names = find_targets(model, config.target_modules)
        for p in model.parameters():
            p.requires_grad_(False)
        state = AdapterState()
        layers: dict[str, NestedLoRALinear] = {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = NestedLoRALinear(getattr(parent, child), config.r, state, config.a_init)
            setattr(parent, child, layer)
            layers[name] = layer
        adapter = cls(model, config, layers)
        adapter.set_rank(config.r)  # default: full-rank inference until told otherwise
        return adapter

    # -- the coefficients every layer reads ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A.device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).lora_A.dtype

    def set_coeffs(self, coeffs: torch.Tensor | None) -> None:
        self.state.set(coeffs, self.device, self.dtype)

    def set_training_coeffs(self, b: int | None = None) -> None:
        """Training forward: c = p(method); ``b`` is DyLoRA's rank for this micro-batch."""
        c = self.config
        self.set_coeffs(p_vector(c.method, c.r, c.ranks, c.scaling, b))

    def rank_coeffs(self, k: int) -> torch.Tensor | None:
        """c_k, length k (float64), from the checkpoint's inference rule; None for k = 0."""
        self.check_rank(k)
        return self._coeffs[k] if k else None

    def inference_coeffs(self, k: int) -> torch.Tensor:
        """c for rank k, length r: c_k on the first k entries. When rank m is merged into W, the
        layer must add only the difference, so this returns c_k − c_m (all zero when k = m)."""
        c = torch.zeros(self.config.r, dtype=torch.float64)
        if k:
            c[:k] = self.rank_coeffs(k)
        else:
            self.check_rank(k)
        if self.merged_rank:
            c[: self.merged_rank] -= self._coeffs[self.merged_rank]
        return c

    def set_inference_rule(self, rule: str) -> None:
        """Serve every rank under ``rule`` from now on (see :meth:`AdapterConfig.with_rule`)."""
        if self.merged_rank is not None:
            raise RuntimeError("choose the inference rule before merging")
        self.config = self.config.with_rule(rule)
        self._coeffs = _coeff_tensors(self.config)
        self.set_rank(self.config.r)

    def set_rank(self, k: int) -> None:
        """Inference at rank k ∈ {0} ∪ R: W x + B[:, :k] (c_k ⊙ A[:k] x) (k = 0: base model)."""
        self.set_coeffs(self.inference_coeffs(k))

    def set_row_ranks(self, ranks: list[int]) -> None:
        """One rank per batch row (mixed ranks in one batch): row i computes
        W x + B[:, :k_i] (c_{k_i} ⊙ A[:k_i] x); the cost follows the largest rank present."""
        self.set_coeffs(torch.stack([self.inference_coeffs(k) for k in ranks]))

    def check_rank(self, k: int) -> None:
        if k != 0 and k not in self.config.ranks:
            raise ValueError(f"rank {k} is not servable; valid ranks are {[0, *self.config.ranks]}")

    # -- merging -------------------------------------------------------------------------------
    def merge(self, k: int) -> None:
        """Fold the rank-k adapter into the base weights: rank k then costs what the base model
        costs, and other ranks are served exactly by adding their difference to rank k. Leaves
        the adapter set to rank k."""
        self.check_rank(k)
        if self.merged_rank is not None:
            raise RuntimeError(f"already merged at rank {self.merged_rank}; unmerge() first")
        c = self.rank_coeffs(k)
        for layer in self.layers.values():
            layer.merge(c)
        self.merged_rank = k
        self.set_rank(k)

    @torch.no_grad()
    def remerge(self, k: int) -> None:
        """Make rank k the merged rank, however often it changes: each layer's weight is rebuilt as
        ``W₀ + ΔW_k`` (one rounding, in fp32) from a copy of the base weights taken on first use,
        so switching ranks never accumulates rounding (a bf16 ``W += Δ; W -= Δ`` does). k = 0
        restores the plain base weights. The copy lives on the CPU (pinned under CUDA)."""
        self.check_rank(k)
        if self.merged_rank is not None and self._pristine is None:
            raise RuntimeError(f"merged at rank {self.merged_rank} by merge(); unmerge() before remerge()")
        if self._pristine is None:
            pin = self.device.type == "cuda"
            self._pristine = {n: (l.base.weight.detach().to("cpu", copy=True).pin_memory() if pin
                                  else l.base.weight.detach().clone()) for n, l in self.layers.items()}
        c = self.rank_coeffs(k)
        for name, layer in self.layers.items():
            w = layer.base.weight
            w0 = self._pristine[name].to(w.device, non_blocking=True)
            if k:
                w.copy_(w0.float() + layer.delta_weight(c).float())
            else:
                w.copy_(w0)
            layer.merged_rank = k
        self.merged_rank = k
        self.set_rank(k)

    def unmerge(self) -> None:
        if self._pristine is not None:  # merged by remerge(): restore the copy exactly
            k = self.merged_rank
            self.remerge(0)
            self._pristine = None
            for layer in self.layers.values():
                layer.merged_rank = None
            self.merged_rank = None
            self.set_rank(k)
            return
        for layer in self.layers.values():
            layer.unmerge()
        if self.merged_rank is not None:
            k, self.merged_rank = self.merged_rank, None
            self.set_rank(k)

    # -- sibling fusion (serving) --------------------------------------------------------------
    @torch.no_grad()
    def fuse(self, probe_token: int = 0) -> list[list[str]]:
        """Compute the adapted modules that read one input as one GEMM (:mod:`trainer.fusion`):
        found by a probe forward, kept only if the fused model's logits on a two-row probe (full
        rank and the lowest rank, one per row) match the unfused ones. Returns the groups. For
        serving: the adapter no longer trains, and the model's dtype/device must not change
        afterwards (:meth:`unfuse` first)."""
        from trainer.fusion import FusedGroup, sibling_groups

        if self.groups:
            return self._group_names
        ids = torch.full((2, 3), probe_token, dtype=torch.long, device=self.device)
        saved = (self.state.coeffs, self.state.uniform)
        self.set_rank(self.config.r)
        names = sibling_groups(self.model, self.layers, ids[:1])
        self.set_row_ranks([self.config.r, self.config.ranks[0]])
        before = self.model(input_ids=ids, use_cache=False).logits.float()
        self.groups = [FusedGroup([self.layers[n] for n in group]) for group in names]
        self._group_names = names
        after = self.model(input_ids=ids, use_cache=False).logits.float()
        self.state.coeffs, self.state.uniform = saved
        tol = (1e-4 if self.dtype == torch.float32 else 3e-2) * (1 + float(before.abs().max()))
        if not torch.allclose(before, after, rtol=0, atol=tol):
            self.unfuse()
            raise RuntimeError(f"sibling fusion changed the model's output on a probe by "
                               f"{float((before - after).abs().max()):.3g} (tolerance {tol:.3g}); left unfused")
        return names

    def unfuse(self) -> None:
        """Undo :meth:`fuse`: every module gets its own tensors again (merges are kept)."""
        for g in self.groups:
            g.unfuse()
        self.groups, self._group_names = [], []

    def merge_and_unload(self, k: int) -> nn.Module:
        """A plain model with the rank-k adapter merged in and the wrappers removed."""
        self.unfuse()
        self.merge(k)
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base)
        self.layers = {}
        return self.model

    # -- parameters ------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_Bt)]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def target_shapes(self) -> dict[str, list[int]]:
        """Module name → [out, in] of each wrapped base linear."""
        return {n: [l.base.out_features, l.base.in_features] for n, l in self.layers.items()}

    # -- PEFT-format tensors -------------------------------------------------------------------------
    def peft_state_dict(self, k: int | None = None) -> dict[str, torch.Tensor]:
        """The rank-k prefix (default: full rank) under PEFT's key names, B as (out, k); the raw
        factors, without the coefficients (see :mod:`trainer.export` for a folded one)."""
        k = self.config.r if k is None else k
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[:k].detach().float().contiguous().cpu()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_Bt[:k].detach().float().t().contiguous().cpu()
        return out

    @torch.no_grad()
    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`peft_state_dict` at full rank (keys/shapes validated by the caller)."""
        for name, layer in self.layers.items():
            layer.lora_A.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            layer.lora_Bt.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"].t())
