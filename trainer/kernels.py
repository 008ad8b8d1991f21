"""The CPU's GEMMs for serving: a linear computed the way this CPU's BLAS runs fastest.

A decode step multiplies every weight by a handful of rows (one token per running request); a
prefill by hundreds. Three ways to compute the same ``y = x Wᵀ + b``::

    standard      F.linear(x, W, b)            x (rows, in), W (out, in) as stored
    weight-major  (W xᵀ)ᵀ for ≤ MAX_ROWS rows  the same product, W on the left; y a transposed view
    packed        oneDNN's matmul on W reordered once into its blocked layout (a cached copy,
                  rebuilt when W is written: merge, re-merge), every row count

The BLAS picks its kernel by the operands' layout, and for few rows a plain-layout W is streamed
badly. Measured (2 threads, weights out of cache as in a real step): on an AVX2 EPYC in fp32,
SmolLM2-135M's 210 decoder linears at 8 rows took 132 ms standard, 75 ms weight-major; on an
AVX-512 EPYC in bf16, 24 MLP weights (576→1536) at 16 rows 5.2 ms standard, 5.1 weight-major,
2.9 packed (14 GB/s: the memory's speed), at 512 rows 59 / 62 / 55 ms; its 49152×576 head at 16
rows 6.5 → 3.7 ms. Packing costs one more copy of the weights in memory.

Which pays is a property of the CPU and its BLAS, not assumed: :func:`gemm_speedups` times each
on the model's own decode-sized forward once per CPU, torch version, dtype, thread count and
model shape and caches the ratios (as :func:`trainer.models.cpu_bf16_speedup` does for the dtype); :func:`resolve_gemm`
picks the fastest, :func:`use_gemm` switches a model's linears over. Training keeps ``standard``
(a packed weight has no gradient); CUDA too: cuBLAS needs no help.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 64  # rows (tokens) up to which a linear is computed weight-major once switched on
MIN_SPEEDUP = 1.05  # the probe's ratio below which the standard layout is kept (the forward probe: packed
# measured 1.105-1.116x on an AMX Xeon whose real decode step is 1.13x faster packed)
GemmMode = Literal["standard", "weight-major", "packed"]
MODES: tuple[GemmMode, ...] = ("standard", "weight-major", "packed")


class PackedWeight:
    """One weight in oneDNN's blocked layout, cached, rebuilt when the weight is written (its
    version counter moves) or replaced. A weight whose writes cannot be seen (an inference-mode
    tensor keeps no version) is never packed: :meth:`of` returns None and the caller goes standard."""

    __slots__ = ("_key", "_packed")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def of(self, weight: torch.Tensor) -> torch.Tensor | None:
        try:
            key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight._version)
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self._key = key
        return self._packed


_PACKABLE: dict[torch.dtype, str | None] = {}


def packing_error(dtype: torch.dtype) -> str | None:
    """Why oneDNN cannot pack ``dtype`` weights on this CPU (None: it can), found by packing and
    multiplying a small weight once per dtype. Measured: on an AVX2-only EPYC, bf16 packing fails
    ("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")."""
    if dtype not in _PACKABLE:
        try:
            if not torch.backends.mkldnn.is_available():
                raise RuntimeError("this torch build has no oneDNN")
            w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), None)
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), w, None, "none", [], "")
            _PACKABLE[dtype] = None
        except (RuntimeError, AttributeError, NotImplementedError) as e:  # no such op, or not for this CPU
            _PACKABLE[dtype] = str(e).strip().splitlines()[0]
    return _PACKABLE[dtype]


def _check_packable(dtype: torch.dtype) -> None:
    why = packing_error(dtype)
    if why is not None:
        raise ValueError(f"packed GEMMs cannot run in {str(dtype).removeprefix('torch.')} on this CPU ({why}); "
                         "use --gemm auto (which measures only the modes that run here), weight-major or standard, "
                         "or another --dtype")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           max_rows: int = 0, packed: PackedWeight | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: from ``packed`` when given (and no gradient is wanted),
    weight-major when x has at most ``max_rows`` rows, else standard."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if packed is not None and rows and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        w = packed.of(weight)
        if w is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), w, bias, "none", [], "")
            return y.view(*x.shape[:-1], weight.shape[0])
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


class GemmLinear(nn.Linear):
    """An ``nn.Linear`` computed by :func:`linear` (same parameters, same state dict)."""

    small_gemm_rows: int = 0
    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.small_gemm_rows, self.packed)


def use_gemm(model: nn.Module, mode: GemmMode = "weight-major") -> int:
    """Compute every linear of ``model`` (plain ``nn.Linear``, nested adapters' ``A``, fused
    groups) the ``mode`` way; ``standard`` switches back to plain ``nn.Linear``. Returns the
    number of modules switched."""
    from trainer.nested import NestedLoRALinear

    if mode not in MODES:
        raise ValueError(f"GEMM mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "packed":
        _check_packable(next(model.parameters()).dtype)
    rows = MAX_ROWS if mode == "weight-major" else 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear or isinstance(m, GemmLinear):
            for attr in ("small_gemm_rows", "packed"):
                m.__dict__.pop(attr, None)
            m.__class__ = nn.Linear if mode == "standard" else GemmLinear
            if mode == "weight-major":
                m.small_gemm_rows = rows
            elif mode == "packed":
                m.packed = PackedWeight()
            n += 1
        elif isinstance(m, NestedLoRALinear):
            m.small_gemm_rows = rows
            m.packed = PackedWeight() if mode == "packed" else None
    return n


def gemm_mode(model: nn.Module) -> GemmMode:
    """The mode :func:`use_gemm` last set on ``model``."""
    for m in model.modules():
        if isinstance(m, GemmLinear):
            return "packed" if m.packed is not None else "weight-major"
    return "standard"


Gemm = Literal["auto", "standard", "weight-major", "packed"]
GEMM_HELP = (f"how linears are computed on the CPU: packed (oneDNN's blocked weight layout, a second copy of the "
             f"weights; ~1.7x faster decode GEMMs measured in bf16 on AVX-512) | weight-major ((W xᵀ)ᵀ for at most "
             f"{MAX_ROWS} rows; ~1.4-1.8x in fp32 on AVX2) | standard; auto: the fastest a cached probe measures "
             f"here, if ≥{MIN_SPEEDUP}x standard")


def resolve_gemm(choice: str, device: torch.device, dtype: torch.dtype, cache: Path | None = None,
                 model: nn.Module | None = None) -> GemmMode:
    """The mode ``choice`` means here: itself, or for ``auto`` the fastest of :func:`gemm_speedups`
    on ``model``'s own forward on a CPU where it is ≥ :data:`MIN_SPEEDUP` × standard, else
    ``standard`` (always on CUDA)."""
    if choice not in ("auto", *MODES):
        raise ValueError(f"GEMM mode must be auto, {', '.join(MODES)}; got {choice!r}")
    if choice == "packed" and device.type == "cpu":
        _check_packable(dtype)
    if choice != "auto":
        return choice
    if device.type != "cpu":
        return "standard"
    if model is None:
        raise ValueError("GEMM mode auto times the model's own forward in every mode: pass the model")
    speedups = gemm_speedups(dtype, model, cache)
    best = max(speedups, key=speedups.get)
    return best if speedups[best] >= MIN_SPEEDUP else "standard"


def gemm_speedups(dtype: torch.dtype, model: nn.Module, cache: Path | None = None) -> dict[str, float]:
    """Standard ÷ weight-major and ÷ packed time of a decode-sized forward of ``model``
    (``PROBE_ROWS`` rows of one token: every weight read once, and every op after a linear on the
    layout that linear returns, as in a decode step). GEMMs alone mislead: on a Xeon with AMX and a
    480 MB L3, 24 made-up 576×1536 weights stayed in cache and measured weight-major 1.5× standard;
    16-row GEMMs over SmolLM2's own weights measured weight-major 1.3× and packed 1.28×, while its
    real decode step was 8% slower weight-major (whose output is a transposed view the ops after it
    pay for) and 12% faster packed. Modes are timed in turn, the order reversed every round, best
    of the rounds; cached per CPU model, torch version, dtype, thread count and the model's linear
    shapes (under ``cache``, default :func:`trainer.models.cache_dir`)."""
    from trainer.models import cached_probe, cpu_model_name

    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    key = (f"{cpu_model_name()}|torch {torch.__version__}|{dtype}|{torch.get_num_threads()} threads"
           f"|forward: {len(ws)} linears, {sum(w.numel() for w in ws)} weights")

    def measure() -> dict[str, float]:
        t = _time_forwards(model, [m for m in MODES if m != "packed" or packing_error(dtype) is None])
        return {mode: t["standard"] / t[mode] if mode in t else 0.0 for mode in MODES[1:]}  # 0: cannot run here

    return cached_probe("gemm-probe.json", key, measure, cache)


PROBE_ROWS = 16  # one-token rows of the probe's forward: a decode step of a full default batch


def _time_forwards(model: nn.Module, modes: list[GemmMode], reps: int = 4) -> dict[GemmMode, float]:
    """Best seconds per mode of ``model``'s forward of ``PROBE_ROWS`` one-token rows (no cache),
    each mode's second forward of a round timed (the first packs), the model left in its mode."""
    before = gemm_mode(model)
    device = next(model.parameters()).device
    ids = torch.zeros(PROBE_ROWS, 1, dtype=torch.long, device=device)
    best = dict.fromkeys(modes, float("inf"))
    try:
        with torch.inference_mode():
            for rep in range(reps + 1):
                for mode in (modes if rep % 2 else modes[::-1]):
                    use_gemm(model, mode)
                    model(input_ids=ids, use_cache=False)
                    t0 = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    if rep:
                        best[mode] = min(best[mode], time.perf_counter() - t0)
    finally:
        use_gemm(model, before)
    return best
