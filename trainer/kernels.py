"""Decode-shaped GEMMs on the CPU: a linear of a few rows computed weight-major.

A decode step multiplies every weight by a handful of rows (one token per running request)::

    standard      y = x Wᵀ            x (rows, in), W (out, in)      F.linear / addmm
    weight-major  y = (W xᵀ)ᵀ         the same product, W on the left; y is a transposed view

Both are one GEMM on the same memory, but MKL chooses its kernel by the operands' layout, and for
few rows the weight-major call streams W far better. Measured on an AVX2 EPYC (2 threads, fp32,
weights out of cache as in a real step): SmolLM2-135M's 210 decoder linears at 8 rows take
132 ms standard, 75 ms weight-major (a plain read of the same 425 MB takes 29 ms); its
49152×576 lm_head at 8 rows 41 ms → 17 ms; at 64 rows 95 → 54 ms; from ~128 rows (prefill)
the two are even. So rows ≤ :data:`MAX_ROWS` go weight-major, more rows standard.

Whether it pays is a property of the CPU and its BLAS, not assumed: :func:`small_gemm_speedup`
times both on a decode-sized shape once per CPU, torch version, dtype and thread count and caches
the ratio (as :func:`trainer.models.cpu_bf16_speedup` does for the dtype); :func:`use_small_gemm`
switches a model's linears over. Off by default (training, CUDA): cuBLAS needs no help.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 64  # rows (tokens) up to which a linear is computed weight-major once switched on
MIN_SPEEDUP = 1.1  # the probe's ratio below which the standard layout is kept


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           max_rows: int = 0) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; weight-major when x has at most ``max_rows`` rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0 or rows > max_rows:
        return F.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()  # (out, rows) → a (rows, out) view
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def contiguous_head_input(model: nn.Module) -> bool:
    """Give the output head (``model.get_output_embeddings()``) contiguous inputs, once per model.
    transformers feeds it ``hidden[:, -1:, :]`` (``logits_to_keep=1``), a strided (B, 1, H) view,
    which ``F.linear`` does not fold into one GEMM: it runs a bmm against B expanded copies of
    the (V, H) weight. Measured here (bf16, SmolLM2's 49152 × 576 head, 16 prompts): 1.1 s of a
    2.6 s prefill, against milliseconds for the copy of (B, 1, H). Returns whether a head was hooked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_contiguous_input", False):
        return False
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    head._contiguous_input = True
    return True


class SmallGemmLinear(nn.Linear):
    """An ``nn.Linear`` whose few-row calls go weight-major (same parameters, same state dict)."""

    small_gemm_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.small_gemm_rows)


def use_small_gemm(model: nn.Module, max_rows: int = MAX_ROWS) -> int:
    """Compute every linear of ``model`` (plain ``nn.Linear``, nested adapters' ``A``, fused
    groups) weight-major for calls of at most ``max_rows`` rows; 0 switches back. Returns the
    number of modules switched."""
    from trainer.nested import NestedLoRALinear

    n = 0
    for m in model.modules():
        if type(m) is nn.Linear or isinstance(m, SmallGemmLinear):
            m.__class__ = SmallGemmLinear if max_rows else nn.Linear
            if max_rows:
                m.small_gemm_rows = max_rows
            elif "small_gemm_rows" in m.__dict__:
                del m.small_gemm_rows
            n += 1
        elif isinstance(m, NestedLoRALinear):
            m.small_gemm_rows = max_rows
    return n


SmallGemm = Literal["auto", "on", "off"]
SMALL_GEMM_HELP = (f"compute linears of at most {MAX_ROWS} rows (decode steps) weight-major, W·xᵀ, which MKL runs "
                   "~1.4-1.8x faster on the CPUs measured; auto: on a CPU where a cached probe measures it "
                   f"≥{MIN_SPEEDUP}x faster | on | off")


def resolve_small_gemm(mode: str, device: torch.device, dtype: torch.dtype, cache: Path | None = None) -> int:
    """The ``max_rows`` that ``mode`` means here: ``on`` → :data:`MAX_ROWS`, ``off`` → 0, ``auto`` →
    :data:`MAX_ROWS` on a CPU where :func:`small_gemm_speedup` ≥ :data:`MIN_SPEEDUP`, else 0."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"small-GEMM mode must be auto, on or off; got {mode!r}")
    if mode == "auto":
        return MAX_ROWS if device.type == "cpu" and small_gemm_speedup(dtype, cache) >= MIN_SPEEDUP else 0
    return MAX_ROWS if mode == "on" else 0


def small_gemm_speedup(dtype: torch.dtype = torch.float32, cache: Path | None = None) -> float:
    """Standard ÷ weight-major time of 8-row GEMMs on 24 MLP-sized weights (576→1536, 85 MB in
    fp32: out of cache, as in a decode step), on this CPU; cached per CPU model, torch version,
    dtype and thread count (under ``cache``, default :func:`trainer.models.cache_dir`)."""
    from trainer.models import cached_probe, cpu_model_name

    key = f"{cpu_model_name()}|torch {torch.__version__}|{dtype}|{torch.get_num_threads()} threads"
    return cached_probe("small-gemm-probe.json", key,
                        lambda: _time_gemms(dtype, max_rows=0) / _time_gemms(dtype, max_rows=MAX_ROWS), cache)


def _time_gemms(dtype: torch.dtype, max_rows: int, reps: int = 3) -> float:
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(1536, 576, generator=gen).to(dtype) for _ in range(24)]
    x = torch.randn(8, 576, generator=gen).to(dtype)
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            for w in ws:
                linear(x, w, max_rows=max_rows)
            best = min(best, time.perf_counter() - t0)
    return best
