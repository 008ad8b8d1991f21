"""The nested (Matryoshka) LoRA layer: the math of DESIGN.md §2 in one place.

A LoRA adapter adds a low-rank update to a frozen linear layer ``W``::

         x ──► W ────────────────────────────┐
         │                                   ▼
         └──► A (r×in) ──► ⊙ c ──► B (out×r) ──► + ──► y

    y = W x + B (c ⊙ (A x))

``c`` is a fixed, non-trained coefficient vector. Every method in this project is this one
layer with a different ``c``:

* LoRA (train):           c = s(r) · 1ᵣ
* DyLoRA (train):         c = s(b) · [1]*b + [0]*(r-b), ``b`` drawn uniformly from R per micro-batch
* MatryoshkaLoRA (train): c = p, with p_i = Σ_{k∈R, k≥i} s(k)  (1-indexed; 0 past max(R)), so that
                          B diag(p) A = Σ_{k∈R} s(k) B[:, :k] A[:k]  (every prefix trained at once)
* inference at rank k:    c = c_k, set by the checkpoint's *inference rule* (below); k = 0 switches
                          the adapter off

Inference rules: what rank k ∈ R is served as (``rule_coeffs``; a vector of length k)::

    trained   c_k = p[:k] of the forward that trained rank k   (default for MatryoshkaLoRA)
    paper     c_k = s(k) · 1ₖ                                  (default for LoRA, DyLoRA, SVD)
    partial   c_k = Σ_{j∈R, j≤k} s(j) · 1ⱼ  (zero-padded to k) (the Matryoshka sum cut after k)

``trained`` serves what the loss was minimised for: MatryoshkaLoRA at full rank is exactly its
training forward ``B diag(p) A`` (with ``paper`` it would not be: for r = 16, R = {1,2,4,8,16},
``sqrt``, component 1 is trained with p₁ = 2.81 and ``paper`` serves it with s(16) = 0.25). For
DyLoRA the forward that trained rank k is ``b = k``, so ``trained`` = ``paper``; for LoRA
``trained`` is plain truncation, ``s(r) · 1ₖ``. The paper's rule stays selectable, to reproduce it.

Only the leading non-zero part of ``c`` is ever multiplied: ``A[:n]`` and ``B[:, :n]`` with
``n = len(c)``. So DyLoRA's components past ``b`` get no gradient, and a rank-k forward costs
rank k, not r.

``s(k)`` is the scaling: ``none`` → 1, ``rank`` → 1/k, ``sqrt`` → 1/√k (rsLoRA; the reference
runs use it).

Init: ``B = 0`` so the adapted model starts equal to the base. ``A`` is kaiming-uniform
(a=√5, as ``nn.Linear`` and PEFT): with ``a_init="peft"`` the fan-in is ``in_features``
(bound 1/√in, PEFT's choice, the default); with ``a_init="reference"`` the fan-in is ``r``
(bound 1/√r, the MatryoshkaLoRA authors' code), a larger start for small ranks.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from trainer.kernels import linear

Scaling = Literal["none", "rank", "sqrt"]
Method = Literal["lora", "dylora", "matryoshka", "svd"]
AInit = Literal["peft", "reference"]
InferenceRule = Literal["trained", "paper", "partial"]

SCALINGS: tuple[str, ...] = ("none", "rank", "sqrt")
TRAIN_METHODS: tuple[str, ...] = ("lora", "dylora", "matryoshka")
INFERENCE_RULES: tuple[str, ...] = ("trained", "paper", "partial")


def scale(k: int, scaling: str) -> float:
    """s(k): the factor a rank-k adapter is multiplied by."""
    if k < 1:
        raise ValueError(f"rank must be >= 1 to have a scaling, got {k}")
    if scaling == "none":
        return 1.0
    if scaling == "rank":
        return 1.0 / k
    if scaling == "sqrt":
        return 1.0 / math.sqrt(k)
    raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")


def default_ranks(r: int) -> list[int]:
    """R by default: every power of two below r, then r itself (so full rank is always served)."""
    if r < 1:
        raise ValueError(f"--rank must be a positive integer, got {r}")
    ranks = [1 << i for i in range(r.bit_length()) if (1 << i) < r]
    return ranks + [r]


def validate_ranks(ranks: list[int], r: int) -> list[int]:
    """Sorted, de-duplicated R; every rank in 1..r. Raises ValueError naming the bad values."""
    bad = [k for k in ranks if not isinstance(k, int) or k < 1 or k > r]
    if bad or not ranks:
        raise ValueError(
            f"--ranks must be a non-empty list of integers in 1..{r} (the adapter's rank); "
            f"got {ranks}" + (f" (invalid: {bad})" if bad else "")
        )
    return sorted(set(ranks))


def p_vector(
    method: str, r: int, ranks: list[int], scaling: str, b: int | None = None
) -> torch.Tensor:
    """The training coefficients c (length r, float64 for exactness; cast at use).

    ``b`` is DyLoRA's sampled rank for this micro-batch (ignored by the other methods; when
    omitted for DyLoRA, the full rank is used, which is what ``trainer info`` shows).
    """
    ranks = validate_ranks(ranks, r)
    p = torch.zeros(r, dtype=torch.float64)
    if method in ("lora", "svd"):
        p[:] = scale(r, scaling)
    elif method == "dylora":
        b = ranks[-1] if b is None else b
        if b not in ranks:
            raise ValueError(f"DyLoRA's sampled rank must be in R={ranks}, got {b}")
        p[:b] = scale(b, scaling)
    elif method == "matryoshka":
        for k in ranks:  # p_i = Σ_{k ≥ i} s(k): add s(k) to the first k entries
            p[:k] += scale(k, scaling)
    else:
        raise ValueError(f"method must be one of {', '.join(TRAIN_METHODS)}; got {method!r}")
    return p


def default_inference_rule(method: str) -> str:
    """The rule a method's checkpoints ship with (docs/results.md, "inference rules", says why)."""
    return "trained" if method == "matryoshka" else "paper"


def rule_coeffs(rule: str, method: str, r: int, ranks: list[int], scaling: str, k: int) -> torch.Tensor:
    """c_k, the coefficients of rank k ∈ R under ``rule`` (see the module docstring): shape (k,),
    float64. Rank k's forward is ``W x + B[:, :k] (c_k ⊙ A[:k] x)``."""
    ranks = validate_ranks(ranks, r)
    if k not in ranks:
        raise ValueError(f"rank {k} is not in R={ranks}")
    if rule == "paper":
        return torch.full((k,), scale(k, scaling), dtype=torch.float64)
    if rule == "partial":
        c = torch.zeros(k, dtype=torch.float64)
        for j in ranks:
            if j <= k:
                c[:j] += scale(j, scaling)
        return c
    if rule == "trained":
        return p_vector(method, r, ranks, scaling, b=k if method == "dylora" else None)[:k].clone()
    raise ValueError(f"inference rule must be one of {', '.join(INFERENCE_RULES)}; got {rule!r}")


def coeff_table(rule: str, method: str, r: int, ranks: list[int], scaling: str) -> dict[int, list[float]]:
    """{k: c_k} for every k ∈ R: what a checkpoint stores as its inference rule."""
    return {k: rule_coeffs(rule, method, r, ranks, scaling, k).tolist() for k in validate_ranks(ranks, r)}


def check_coeff_table(table: dict, ranks: list[int]) -> dict[int, list[float]]:
    """A stored table, validated: one finite vector of length k for every k ∈ R (int keys)."""
    try:
        out = {int(k): [float(x) for x in v] for k, v in table.items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"the inference coefficients must map each rank to a list of numbers; got {table!r:.200}"
                         ) from e
    problems = []
    if sorted(out) != sorted(ranks):
        problems.append(f"ranks {sorted(out)} do not match R={sorted(ranks)}")
    problems += [f"rank {k} has {len(v)} coefficients (expected {k})" for k, v in out.items() if len(v) != k]
    problems += [f"rank {k} has a non-finite coefficient" for k, v in out.items() if not all(map(math.isfinite, v))]
    if problems:
        raise ValueError("invalid inference coefficients: " + "; ".join(problems))
    return dict(sorted(out.items()))


class AdapterState:
    """What every nested layer of one model reads at forward time (shared, not a module).

    ``coeffs`` is ``c`` trimmed to its leading non-zero part: shape ``(n,)`` for the whole batch,
    ``(rows, n)`` with one row of coefficients per batch row (mixed ranks in one batch; rows
    past their own rank hold zeros), or ``(1, tokens, n)`` with one per token of a packed
    ``(1, tokens)`` forward (the engine's decode rows and a prompt piece in one forward). ``None`` switches every adapter off. When every entry of
    ``coeffs`` is the same number (LoRA, or every row at one rank), ``uniform`` holds it, and the
    layer folds it into its fused ``addmm`` instead of multiplying (one small op fewer per layer).
    """

    def __init__(self) -> None:
        self.coeffs: torch.Tensor | None = None
        self.uniform: float | None = None

    def set(self, coeffs: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        n = 0 if coeffs is None else _leading_nonzero(coeffs)
        if n == 0:
            self.coeffs = self.uniform = None
            return
        c = coeffs[..., :n]
        first = float(c.reshape(-1)[0])
        self.uniform = first if bool((c == first).all()) else None
        self.coeffs = c.to(device=device, dtype=dtype)


def _leading_nonzero(c: torch.Tensor) -> int:
    """Length of c up to its last non-zero column."""
    nz = (c != 0).reshape(-1, c.shape[-1]).any(dim=0).nonzero()
    return 0 if nz.numel() == 0 else int(nz[-1]) + 1


class NestedLoRALinear(nn.Module):
    """``y = W x + B (c ⊙ (A x))`` around a frozen ``nn.Linear`` (see the module docstring).

    ``lora_A`` is ``(r, in)``. ``B`` is held transposed, ``lora_Bt`` of shape ``(r, out)``, so
    that every rank-k prefix ``lora_Bt[:k]`` is one contiguous block; the file format keeps
    PEFT's ``(out, r)``.
    """

    def __init__(self, base: nn.Linear, r: int, state: AdapterState, a_init: str = "peft"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"NestedLoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.r = r
        self.state = state
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev))
        self.lora_Bt = nn.Parameter(torch.zeros(r, base.out_features, device=dev))
        self.merged_rank: int | None = None
        self._merged_c: torch.Tensor | None = None  # the coefficients merge() folded into W
        self.group = None  # a trainer.fusion.FusedGroup once fused for serving: it computes this output
        self.small_gemm_rows = 0  # calls of at most this many rows compute A x weight-major (trainer.kernels)
        self.packed = None  # a trainer.kernels.PackedWeight: A x from oneDNN's layout of the whole A
        self.reset_parameters(a_init)

    def reset_parameters(self, a_init: str = "peft") -> None:
        if a_init == "peft":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan-in = in_features
        elif a_init == "reference":
            bound = 1.0 / math.sqrt(self.r)  # kaiming-uniform, a=√5, fan-in = r
            nn.init.uniform_(self.lora_A, -bound, bound)
        else:
            raise ValueError(f"a_init must be 'peft' or 'reference', got {a_init!r}")
        nn.init.zeros_(self.lora_Bt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.output(self, x)
        y = self.base(x)  # (..., out)
        c = self.state.coeffs
        if c is None:
            return y
        n = c.shape[-1]
        # the full tensors when n = r: a slice would make backward zero-fill and copy a full gradient
        A, Bt = (self.lora_A, self.lora_Bt) if n == self.r else (self.lora_A[:n], self.lora_Bt[:n])
        if self.packed is not None and not torch.is_grad_enabled():  # one packed copy: all r rows, the first n kept
            h = linear(x.to(A.dtype), self.lora_A, packed=self.packed)[..., :n]  # (..., n)
        else:
            h = linear(x.to(A.dtype), A, max_rows=self.small_gemm_rows)  # (..., n)
        alpha = self.state.uniform
        if alpha is None:  # scale the small (..., n) intermediate, not the (..., out) output
            if c.dim() == 2:  # one coefficient row per batch row: (rows, n) -> (rows, 1.., n)
                c = c.view(c.shape[0], *([1] * (h.dim() - 2)), n)  # (1, tokens, n) is per token as it is
            h, alpha = h * c, 1.0
        if h.dtype != y.dtype and not torch.is_autocast_enabled(y.device.type):
            return y + (alpha * (h @ Bt)).to(y.dtype)
        if n == 1:  # an outer product, one elementwise op (a GEMM this small costs its per-call floor)
            return torch.addcmul(y, h, Bt[0], value=alpha)
        # y + alpha · h Bₙ in one fused op: (tokens, out) + (tokens, n) @ (n, out)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, n), Bt,
                           alpha=alpha).view(y.shape)

    def delta_weight(self, c: torch.Tensor) -> torch.Tensor:
        """ΔW for the coefficients c (length k): B[:, :k] diag(c) A[:k], shape (out, in)."""
        k = c.shape[0]
        c = c.to(device=self.lora_A.device, dtype=self.lora_A.dtype)
        return (self.lora_Bt[:k] * c[:, None]).t() @ self.lora_A[:k]  # (out, k) @ (k, in)

    @torch.no_grad()
    def merge(self, c: torch.Tensor | None) -> None:
        """Fold ``B diag(c) A`` into W (c = None or empty: nothing). The coefficients the layer reads
        are then relative to it (:class:`trainer.inject.NestedAdapter` handles that)."""
        if self.merged_rank is not None:
            raise RuntimeError(f"already merged at rank {self.merged_rank}; unmerge first")
        k = 0 if c is None else c.shape[0]
        if k:
            w = self.base.weight
            w += self.delta_weight(c).to(w.dtype)
        self._merged_c = c
        self.merged_rank = k

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_rank is None:
            return
        if self.merged_rank > 0:
            w = self.base.weight
            w -= self.delta_weight(self._merged_c).to(w.dtype)
        self.merged_rank = self._merged_c = None

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.base.in_features}, out={self.base.out_features}"
