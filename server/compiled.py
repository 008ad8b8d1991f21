"""The base model's decode step as one compiled graph (``--compile decode``; CPU).

The lean step (:mod:`server.decoder`) still pays a dispatch for each of its ~25 ops a layer, and
every RMSNorm, rotation and SiLU ⊙ up writes its result to memory before the next op reads it.
Compiled with TorchInductor, weights frozen (constants, pre-packed for oneDNN at compile time),
the same function is ~8 generated kernels a layer around 4 GEMMs::

    graph(ids (B,), positions (B,)) → logits (B, V)        B symbolic: one graph for every B ≥ 2; a single row
                                                           is padded to two (the padding row skips attention)
        per layer: rmsnorm · q|k|v GEMM · rope   → [attend(q, k, v, i)] →  o GEMM · + · rmsnorm · gate|up GEMM · silu ⊙ · down · +
                                                      └ opaque to the compiler: appends k, v to the running batch's
                                                        cache (server.kvcache.RoomLayer) and runs SDPA over it

The attention is a custom op (``mlora::attend``) that the graph calls without looking in: the
cache's length changes every step, and traced, every new length would be a new graph (~45 s of
compiling each on 2 cores). Measured on SmolLM2-135M, bf16, 2 cores (AMX Xeon), one decode step
at ~160 cached tokens: 16 rows 44–47 → 33–35 ms, 8 rows 38–40 → 28–29 ms, 1 row 36–37 → 24–25 ms
(its own graph, before single rows were padded). Compiling is Python work in TorchInductor
(tracing, fusion, code generation: ~57 s a graph here for SmolLM2 in fp32 on an AVX2 EPYC, no
cache reuse across start-ups once weights are frozen), so one graph serves every batch size:
a single row runs as two, which costs it little where a step is bound by reading the weights.

It computes the base model only: a step is compiled when every row runs at rank 0 and no rank is
merged into the weights (freezing copied them as they were at compile time); any other step is
the lean one. :meth:`server.runner.ModelRunner.enable_compiled_decode` compiles it at start-up
(one graph, ~30–120 s for SmolLM2 on 2 cores) and checks it against the lean step on a probe.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from server.decoder import LeanDecoder


class _StepContext(threading.local):
    """What the attention op reads besides its tensors: the running batch's cache and the step's
    additive mask (B, 1, 1, L+1), set by :meth:`CompiledDecode.step` around the graph's call."""

    cache = None
    bias: torch.Tensor | None = None
    decoder: LeanDecoder | None = None


_CTX = _StepContext()


@torch.library.custom_op("mlora::attend", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """q (B, Hq, D), k (B, Hkv, D), v (B, Hkv·D) → (B, Hq·D): k and v appended to layer
    ``layer`` of the step's cache, then attention over it under the step's mask, the query heads
    of one KV head folded together (as the lean step)."""
    lean, cache, bias = _CTX.decoder, _CTX.cache, _CTX.bias
    B, d, hkv, g = bias.shape[0], lean.d, lean.hkv, lean.g  # the batch's rows: q may carry a padding row
    keys, values = cache.layers[layer].update(k[:B, :, None], v[:B].reshape(B, hkv, 1, d))  # (B, Hkv, L+1, D)
    out = F.scaled_dot_product_attention(q[:B].reshape(B, hkv, g, d), keys, values, attn_mask=bias,
                                         scale=lean.scaling).reshape(B, lean.hq * d)
    return out if B == q.shape[0] else torch.cat([out, out.new_zeros(q.shape[0] - B, out.shape[1])])


@attend.register_fake
def _attend_shape(q, k, v, layer):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _weights(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's base weight and bias: an adapted module's frozen layer, else the module."""
    base = getattr(module, "base", module)
    return base.weight, base.bias


def _stacked(modules, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each module's output for h, from one GEMM with their base weights stacked (frozen, the
    stack is made once when the graph is compiled): 4 GEMMs a layer instead of 7."""
    ws, bs = zip(*(_weights(m) for m in modules))
    bias = None if all(b is None for b in bs) else torch.cat(
        [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(ws, bs)])
    return F.linear(h, torch.cat(ws), bias).split([w.shape[0] for w in ws], -1)


class CompiledDecode:
    """The base model's decode step compiled (see the module docstring); :meth:`step` has the
    lean step's signature."""

    def __init__(self, lean: LeanDecoder):
        self.lean = lean
        self._graph = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The lean step's layers and logits, every projection a plain GEMM on base weights."""
        def attend_op(i, attn, q, k, v):
            return torch.ops.mlora.attend(q, k, v, i)

        return self.lean._logits(self.lean._layers(ids, positions, attend_op, _stacked), _stacked)

    def step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """``ids`` (B,), ``mask`` (B, L+1) 1 = a real column, ``positions`` (B,), ``cache`` the
        batch's cache (each layer gains a column) → next-token logits (B, V) of the base model."""
        _CTX.bias, _CTX.cache, _CTX.decoder = self.lean.step_bias(mask), cache, self.lean
        rows = ids.shape[0]
        if rows == 1:  # padded to two rows, so that one graph (B ≥ 2) serves every step; the padding row's
            ids, positions = ids.repeat(2), positions.repeat(2)  # attention is skipped, its logits dropped
        try:
            with torch._inductor.config.patch(freezing=True):  # (compile's options={"freezing": True} is not applied)
                return self._graph(ids, positions)[:rows]
        finally:
            _CTX.cache = _CTX.bias = None
