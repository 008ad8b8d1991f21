"""A decode step of a Llama-family model in few ops: transformers' layers, our loop.

A decode step is one token per running row through every layer. transformers' modules compute it
in ~50 tensor ops a layer (an RMSNorm is seven, the rotary embedding fourteen, the mask is rebuilt
and converted in every attention call), and on a CPU each op costs its dispatch, 2–10 µs, whatever
its size. Measured in a SmolLM2 step (8 rows, bf16, packed GEMMs): 31 ms, of which the 121 GEMMs
are 19 ms and the ~1,500 small ops most of the rest. This module computes the same function with
the model's own weights and modules, per layer::

    h  = rmsnorm(x)                                  x (B, H): the residual stream, one token per row
    z  = [q | k | v] = qkv(h)                        one fused GEMM (+ adapter) when q/k/v are fused
    qk = rope(z[:, :(Hq+Hkv)·D])                     q and k rotated together: 4 ops for both
    K, V ← cache.update(k, v)                        the running batch's cache, appended in place
    a  = sdpa(q as (B, Hkv, g, D), K, V, mask)       g query heads per KV head folded (one KV read)
    x += o(a);  h = rmsnorm(x);  x += down(act(gate(h)) ⊙ up(h))

with the mask built once per step (additive, for every layer) and the rotary angles once per step.
The same layers also run packed sequences (:meth:`LeanDecoder.packed`): a decode step with a
prompt piece mixed in, a piece alone, or several prompts end to end (a ragged prefill), where the
cache (``server.kvcache.MixedCache`` / ``RaggedCache``) routes each token's K/V and attention
exactly as it does under transformers' forward.
The rotation is transformers' ``q·cos + rotate_half(q)·sin`` with ``rotate_half(q)·sin`` computed
as ``flip_halves(q)·(−sin₁, sin₂)`` (the same products, negated where rotate_half negates: equal
bit for bit); RMSNorm keeps transformers' float32 arithmetic and its two roundings.

It applies only where it computes what transformers computes: :func:`lean_decoder` accepts a
model whose architecture it knows (Llama, Qwen2, Mistral without a sliding window) and whose
layers hold exactly the modules it calls; :meth:`server.runner.ModelRunner.enable_lean_decode`
then checks it on a probe against transformers' forward before the engine uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAN_MODEL_TYPES = ("llama", "qwen2", "mistral")
_LAYER = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj", "act_fn"}


class LeanDecoder:
    """``model``'s decode step (:meth:`step`) and packed forwards (:meth:`packed`) in few ops, on
    its own modules and weights. Build with :func:`lean_decoder`."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.layers = list(self.decoder.layers)
        attn = self.layers[0].self_attn
        self.d = attn.head_dim
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.g = self.hq // self.hkv
        self.scaling = attn.scaling
        self.cap = getattr(cfg, "final_logit_softcapping", None)

    def step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """``ids`` (B,) one token per row, ``mask`` (B, L+1) 1 = a real column (this token's
        included), ``positions`` (B,), ``cache`` the batch's cache (L columns; each layer's
        ``update`` appends one) → next-token logits (B, V)."""
        bias = self.step_bias(mask)
        B, d, hkv, g = ids.shape[0], self.d, self.hkv, self.g

        def attend(i, attn, q, k, v):  # q (B, Hq, D), k (B, Hkv, D), v (B, Hkv·D)
            keys, values = cache.layers[i].update(k[:, :, None], v.view(B, hkv, 1, d))  # (B, Hkv, L+1, D)
            return F.scaled_dot_product_attention(q.reshape(B, hkv, g, d), keys, values, attn_mask=bias,
                                                  scale=self.scaling)  # (B, Hkv, g, D)

        return self._logits(self._layers(ids, positions, attend))

    def step_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """A decode step's additive mask for every layer: ``mask`` (B, L+1), 1 = a real column →
        (B, 1, 1, L+1), 0 there and −inf on padding."""
        bias = torch.zeros(mask.shape, dtype=self.head.weight.dtype, device=mask.device)
        return bias.masked_fill_(mask == 0, float("-inf"))[:, None, None, :]

    def packed(self, ids: torch.Tensor, positions: torch.Tensor, cache, keep: torch.Tensor) -> torch.Tensor:
        """One packed sequence of N tokens — the decode rows and a prompt piece (``MixedCache``),
        or several whole prompts end to end (``RaggedCache``) — each token at its own position;
        the cache routes each token's K/V and attention (``server.kvcache.mixed_attention``), as
        under transformers' forward. ``ids``, ``positions`` (N,), ``keep`` the positions whose
        logits are wanted → (len(keep), V)."""
        from server.kvcache import mixed_attention

        N, d, hkv = ids.shape[0], self.d, self.hkv

        def attend(i, attn, q, k, v):  # transformers' layout: (1, heads, N, D)
            kk, vv = cache.update(k.transpose(0, 1)[None], v.view(N, hkv, d).transpose(0, 1)[None], i)
            out, _ = mixed_attention(attn, q.transpose(0, 1)[None], kk, vv, None, scaling=self.scaling)
            return out  # (1, N, Hq, D)

        return self._logits(self._layers(ids, positions, attend)[keep])

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, attend, project=None) -> torch.Tensor:
        """The decoder layers over tokens ``ids`` (N,) at ``positions`` (N,) → hidden states (N, H);
        ``attend(i, attn, q, k, v)`` is layer i's attention (its cache update included),
        ``project(modules, h)`` each module's output for h (default :func:`_project`: the modules'
        own forwards; ``server.compiled`` passes plain GEMMs on their base weights)."""
        project = project or _project
        N, d, hq, hkv = ids.shape[0], self.d, self.hq, self.hkv
        x = self.decoder.embed_tokens(ids)  # (N, H)
        cos, sin = self.decoder.rotary_emb(x, positions[None])  # (1, N, D) each, x's dtype
        cos = cos.view(N, 1, d)
        sin = sin.view(N, 1, 2, d // 2) * torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device)[:, None]
        sin = sin.view(N, 1, d)  # (−sin₁, sin₂): rotate_half's sign, folded into the angles once
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms_norm(layer.input_layernorm, x)
            q, k, v = project((attn.q_proj, attn.k_proj, attn.v_proj), h)  # (N, Hq·D), (N, Hkv·D) ×2
            q, k = _rope(q, k, cos, sin, N, hq, hkv, d)  # (N, Hq, D), (N, Hkv, D)
            a = attend(i, attn, q, k, v)
            x = x + project((attn.o_proj,), a.reshape(N, hq * d))[0]
            h = _rms_norm(layer.post_attention_layernorm, x)
            gate, up = project((mlp.gate_proj, mlp.up_proj), h)
            x = x + project((mlp.down_proj,), mlp.act_fn(gate) * up)[0]
        return x

    def _logits(self, x: torch.Tensor, project=None) -> torch.Tensor:
        logits = (project or _project)((self.head,), _rms_norm(self.decoder.norm, x))[0]  # (N, V)
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' RMSNorm: float32 statistics, rounded back to x's dtype, then the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * xf.to(x.dtype)


def _project(modules: tuple[nn.Module, ...], h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each module's output for ``h`` (N, H) — column slices of one output when they are exactly
    one fused group (``trainer.fusion.FusedGroup``: q/k/v, gate/up), so q and k stay adjacent."""
    group = getattr(modules[0], "group", None)
    if group is not None and len(group.members) == len(modules) and all(
            a is b for a, b in zip(group.members, modules)):
        z = group.forward_all(h)  # (N, T) = [q | k | v] or [gate | up]
        return tuple(z[:, sl] for sl in group.slices)
    return tuple(m(h) for m in modules)


def _rope(q, k, cos, sin, B, hq, hkv, d):
    """transformers' rotary embedding of q and k (:func:`_rotate`): one pass for both when k's
    columns follow q's in one tensor (fused q/k/v), else one each (always while compiled: the
    compiler cannot compare storages, and fuses the two anyway)."""
    if not torch.compiler.is_compiling() and (q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() and q.stride() == k.stride()
            and k.data_ptr() == q.data_ptr() + q.shape[1] * q.element_size()):
        qk = _rotate(q.as_strided((B, hq + hkv, d), (q.stride(0), d, 1)), cos, sin)  # columns [q | k]
        return qk[:, :hq], qk[:, hq:]
    return _rotate(q.reshape(B, hq, d), cos, sin), _rotate(k.reshape(B, hkv, d), cos, sin)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``t·cos + rotate_half(t)·sin`` for t (N, heads, D), as ``t·cos + flip_halves(t)·sin`` with
    ``sin`` already signed (−sin₁, sin₂): the same products, bit for bit."""
    n, heads, d = t.shape
    return t * cos + t.view(n, heads, 2, d // 2).flip(-2).view(n, heads, d) * sin


def lean_decoder(model: nn.Module) -> LeanDecoder | None:
    """A :class:`LeanDecoder` for ``model``, or None where its architecture is not one it
    computes (every layer full attention, exactly the modules it calls, RMSNorm, no extra norms)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES:
        return None
    if getattr(cfg, "sliding_window", None) or set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {
            "full_attention"}:
        return None
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        return None
    try:
        decoder = model.get_decoder()
        layers = list(decoder.layers)
        rotary = decoder.rotary_emb
        head = model.get_output_embeddings()
    except (AttributeError, TypeError):
        return None
    if not layers or head is None or not callable(rotary):
        return None
    for layer in layers:
        if set(dict(layer.named_children())) != _LAYER:
            return None
        if set(dict(layer.self_attn.named_children())) != _ATTN or set(dict(layer.mlp.named_children())) != _MLP:
            return None
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                return None
    if not type(decoder.norm).__name__.endswith("RMSNorm"):
        return None
    return LeanDecoder(model)
