"""Sibling fusion for serving: the adapted linears that read one input, computed as one GEMM.

Unfused, every adapted module of a decoder layer costs three ops — ``W x``, ``A x`` and the
``addmm`` that adds ``B (c ⊙ A x)`` — so at decode a Llama layer's seven modules cost 21 ops
against the base model's 7, whatever the rank: the adapter's price is its op count, not its
rank. Fused, the modules that read the same tensor (q/k/v, gate/up; o and down alone) are one
group, and a group is one GEMM plus one ``addmm``::

    G members (e.g. q, k, v), outputs T = out_q + out_k + out_v, adapter rank r

    weight (T + G·r, in) = [ W_q ; W_k ; W_v ; A_q[0] ; A_k[0] ; A_v[0] ; A_q[1] ; … ]
                             └─── base ────┘ └──── A, interleaved by component ────┘

    rank n:  z = x weight[:T + G·n]ᵀ                 (…, T + G·n)   one GEMM: W x and every A[:n] x
             y, h = z[…, :T], z[…, T:]             h = (A_q[0]x, A_k[0]x, A_v[0]x, A_q[1]x, …)
             h ← h ⊙ c  (c_j on component j)       skipped when c is one number (folded into α)
             out = y + α · h Bd[:G·n]               one addmm; Bd (G·r, T) is block-diagonal:
                                                    row G·j + g holds B_g[:, j]ᵀ in g's columns
             q, k, v = column slices of out

At n = 1 there is no GEMM to do: each member adds the outer product ``h_g B_g[:, 0]ᵀ`` in place
(``addcmul_``, one elementwise op per member on its column slice). A bf16 GEMM of a few rows costs
oneDNN's per-call floor whatever its size; measured in a SmolLM2 decode step (8 rows, bf16, packed
GEMMs), the 120 block-diagonal ``addmm`` calls of rank 1 cost ~9 ms (~75 µs each), the 360
``addcmul_`` ~2 ms.

With packed GEMMs (:mod:`trainer.kernels`) the ``B`` of every rank n ≥ 2 is one packed GEMM too:
``Bd[:G·n]ᵀ`` reordered once per n that is used, y added as oneDNN's post-op (the sum rounded
once, as ``addmm`` rounds it; a uniform α scales h first, as per-component c does). In the same
decode step the ``addmm`` calls cost 50–80 µs each whatever n (oneDNN's bf16 path for a few
rows: its per-call cost, not its bytes), the packed GEMM with its copy of y ~60 µs a group at 8
rows (~76 µs at 16): rank 64 of an r = 64 adapter 53 → 41 ms a step, rank 8 45 → 41 ms, rank 0
34 ms. The zero blocks then cost less than a call
(≤ 0.4 MB read per group at n = 64), so packed B is always the block-diagonal one.

Without packing, at larger n the zero blocks of ``Bd[:G·n]`` ((G−1)·n·T elements) cost more memory traffic than
an op saves (decode is memory-bound): past ``BLOCK_B_WASTE`` zeros each member adds its own
``B_g[:, :n]`` (one ``addmm`` per member, on its column slice of ``y``).

Because A's rows are interleaved by component, the first ``G·n`` rows of ``weight`` and ``Bd``
are every member's rank-n prefix: rank n reads a contiguous prefix, as unfused. Rank 0
(``coeffs`` None) is the GEMM of the base rows alone — cheaper than the unfused base model, which
makes three calls for q/k/v. Per-row coefficients (mixed ranks in one batch) work as unfused.

The members keep their identity: ``base.weight`` and ``lora_A`` become views into the group's
``weight``, so merging (``W += ΔW`` on ``base.weight``), re-merging and loading weights write
through to the fused matrix; ``Bd`` is rebuilt when any member's ``lora_Bt`` changes (tensor
versions). A fused adapter is for serving: its ``lora_A`` no longer takes gradients, and a later
``.to(dtype/device)`` would re-allocate the views, which the group detects and refuses.

Which modules share an input is found, not assumed (:func:`sibling_groups`): one forward of a
one-token probe records the tensor each adapted module receives; modules that receive the same
tensor object are siblings. :meth:`trainer.inject.NestedAdapter.fuse` then checks that the
fused model computes what the unfused one did on the probe before keeping it.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.kernels import PackedWeight, linear
from trainer.nested import NestedLoRALinear


BLOCK_B_WASTE = 1 << 15  # zeros (elements) the block-diagonal B may read before one addmm per member is cheaper


class FusedGroup:
    """Siblings that read the same input, computed together (see the module docstring)."""

    def __init__(self, members: list[NestedLoRALinear]):
        first = members[0]
        if any(m.r != first.r or m.base.in_features != first.base.in_features for m in members):
            raise ValueError("fused siblings need one rank and one input size")
        w0 = first.base.weight
        if any(t.dtype != w0.dtype or t.device != w0.device
               for m in members for t in (m.base.weight, m.lora_A, m.lora_Bt)):
            raise ValueError("fused siblings need one dtype and device for W, A and B")
        self.members = list(members)
        G, r, d_in = len(members), first.r, first.base.in_features
        outs = [m.base.out_features for m in members]
        self.T = sum(outs)
        self.slices = []  # each member's columns of the output
        weight = torch.empty(self.T + G * r, d_in, dtype=w0.dtype, device=w0.device)
        with_bias = any(m.base.bias is not None for m in members)
        bias = torch.zeros(self.T + G * r, dtype=w0.dtype, device=w0.device) if with_bias else None
        a_rows = weight[self.T:].view(r, G, d_in)  # component j of member g at row T + G·j + g
        off = 0
        with torch.no_grad():
            for g, (m, out) in enumerate(zip(members, outs)):
                weight[off:off + out].copy_(m.base.weight)
                a_rows[:, g].copy_(m.lora_A)
                if with_bias and m.base.bias is not None:
                    bias[off:off + out].copy_(m.base.bias)
                self.slices.append(slice(off, off + out))
                off += out
        self._originals = [(m.base.weight, m.base.bias, m.lora_A) for m in members]
        for g, (m, sl) in enumerate(zip(members, self.slices)):
            m.base.weight = nn.Parameter(weight[sl], requires_grad=False)
            if with_bias:
                m.base.bias = nn.Parameter(bias[sl], requires_grad=False)
            m.lora_A = nn.Parameter(a_rows[:, g], requires_grad=False)  # (r, in), row stride G·in
            m.group = self
        self.weight, self.bias = weight, bias
        self._packed = PackedWeight()  # used once the members are switched to packed GEMMs (trainer.kernels)
        self._ptrs = [(m.base.weight.data_ptr(), m.lora_A.data_ptr()) for m in members]
        self._bd: torch.Tensor | None = None
        self._bd_key: tuple[int, ...] | None = None
        self._bd_packed: dict[int, torch.Tensor] = {}  # n → Bd[:G·n]ᵀ in oneDNN's layout, for the bd it was packed from
        self._bd_packed_of: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    # -- forward ---------------------------------------------------------------------------------
    def output(self, member: NestedLoRALinear, x: torch.Tensor) -> torch.Tensor:
        """``member``'s output for input ``x``: the first sibling to ask computes all of them."""
        key = id(member)
        if x is not self._x or key not in self._pending:
            out = self.forward_all(x)
            self._pending = {id(m): out[..., sl] for m, sl in zip(self.members, self.slices)}
            self._x = x
        out = self._pending.pop(key)
        if not self._pending:
            self._x = None  # hold no activation past the layer
        return out

    def _linear(self, x: torch.Tensor, rows: int, small: int, packed) -> torch.Tensor:
        """The first ``rows`` rows of the fused weight times x: (..., rows). Packed, one copy of
        the whole weight serves every rank (its unused A rows cost G·(r − n) of T + G·r outputs)."""
        if packed is not None:
            return linear(x, self.weight, self.bias, packed=packed)[..., :rows]
        return linear(x, self.weight[:rows], None if self.bias is None else self.bias[:rows], small)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output for input ``x``, side by side: ``(..., T)``, member g in columns
        ``slices[g]`` (a caller that wants q and k together takes one slice of it)."""
        self._check_views()
        state = self.members[0].state
        c, T, G = state.coeffs, self.T, len(self.members)
        small = self.members[0].small_gemm_rows
        packed = self._packed if self.members[0].packed is not None and not torch.is_grad_enabled() else None
        if c is None:  # every adapter off: the base rows alone
            return self._linear(x, T, small, packed)  # (..., T)
        n = c.shape[-1]
        rows = T + G * n
        z = self._linear(x, rows, small, packed)  # (..., T + G n)
        y, h = z[..., :T], z[..., T:]  # (..., T), (..., G n)
        alpha = state.uniform
        if alpha is None:  # c_j scales component j of every member: (..., n, G) ⊙ (n, 1)
            if c.dim() == 2:  # one coefficient row per batch row: (rows, n) -> (rows, 1.., n, 1)
                c = c.view(c.shape[0], *([1] * (h.dim() - 2)), n, 1)
            else:  # (n,) or per token (1, tokens, n)
                c = c[..., None]
            h, alpha = (h.unflatten(-1, (n, G)) * c).flatten(-2), 1.0
        if n == 1 and not torch.is_grad_enabled():  # rank 1: G outer products, in place into y
            for g, (m, sl) in enumerate(zip(self.members, self.slices)):
                y[..., sl].addcmul_(h[..., g:g + 1], m.lora_Bt[0], value=alpha)
            return y
        if packed is not None:  # one packed GEMM for every member's B, y added by oneDNN (one rounding, as addmm)
            if alpha != 1.0:
                h = h * alpha
            out = torch.ops.mkldnn._linear_pointwise.binary(h.reshape(-1, G * n), y.reshape(-1, T).contiguous(),
                                                            self._packed_block_b(n), None, "add")
            return out.view(*x.shape[:-1], T)
        if (G - 1) * n * T <= BLOCK_B_WASTE:  # one addmm; its zero blocks cost little at this n
            return torch.addmm(y.reshape(-1, T), h.reshape(-1, G * n), self._block_b()[:G * n],
                               alpha=alpha).view(*x.shape[:-1], T)
        hs, y2 = h.reshape(-1, n, G), y.view(-1, T)  # component j of member g at [:, j, g]; y2 a view of z
        for g, (m, sl) in enumerate(zip(self.members, self.slices)):
            y2[:, sl].addmm_(hs[:, :, g], m.lora_Bt[:n], alpha=alpha)  # in place: z is ours
        return y

    def _block_b(self) -> torch.Tensor:
        """Bd (G·r, T): row G·j + g = member g's ``lora_Bt[j]`` in g's columns, zeros elsewhere."""
        key = tuple(m.lora_Bt._version for m in self.members) + tuple(id(m.lora_Bt) for m in self.members)
        if key != self._bd_key:
            first = self.members[0]
            G, r = len(self.members), first.r
            bd = torch.zeros(r, G, self.T, dtype=first.lora_Bt.dtype, device=first.lora_Bt.device)
            with torch.no_grad():
                for g, (m, sl) in enumerate(zip(self.members, self.slices)):
                    bd[:, g, sl] = m.lora_Bt
            self._bd, self._bd_key = bd.view(G * r, self.T), key
        return self._bd

    def _packed_block_b(self, n: int) -> torch.Tensor:
        """``Bd[:G·n]ᵀ`` (T, G·n) as a packed linear weight, one per rank n that is asked for
        (lazily: a server uses a few ranks), dropped whenever Bd is rebuilt."""
        bd = self._block_b()
        if self._bd_packed_of is not bd:
            self._bd_packed, self._bd_packed_of = {}, bd
        pk = self._bd_packed.get(n)
        if pk is None:
            G = len(self.members)
            pk = self._bd_packed[n] = torch.ops.mkldnn._reorder_linear_weight(bd[:G * n].t().contiguous(), None)
        return pk

    def _check_views(self) -> None:
        for m, (w, a) in zip(self.members, self._ptrs):
            if m.base.weight.data_ptr() != w or m.lora_A.data_ptr() != a:
                raise RuntimeError("a fused layer's weights were replaced (e.g. by .to() after fuse()); "
                                   "call NestedAdapter.unfuse() before changing the model's dtype or device")

    # -- undo ------------------------------------------------------------------------------------
    def unfuse(self) -> None:
        """Give every member its own tensors again (values as they are now, merges included)."""
        for m, (w0, b0, a0) in zip(self.members, self._originals):
            with torch.no_grad():
                m.base.weight = nn.Parameter(m.base.weight.detach().clone(), requires_grad=w0.requires_grad)
                if m.base.bias is not None and b0 is not None:
                    m.base.bias = nn.Parameter(m.base.bias.detach().clone(), requires_grad=b0.requires_grad)
                m.lora_A = nn.Parameter(m.lora_A.detach().clone(), requires_grad=a0.requires_grad)
            m.group = None
        self.members, self._originals, self._pending, self._x = [], [], {}, None


def sibling_groups(model: nn.Module, layers: dict[str, NestedLoRALinear], probe: torch.Tensor) -> list[list[str]]:
    """The adapted modules grouped by the input tensor they read in one forward of ``probe``
    (input ids, (1, L)), in call order. A module called more than once (shared weights) stays
    alone: its calls need not see the same siblings."""
    seen: list[tuple[torch.Tensor, str]] = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args, name=name: seen.append((args[0], name)))
             for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model(input_ids=probe)
    finally:
        for h in hooks:
            h.remove()
    calls: dict[str, int] = {}
    for _, name in seen:
        calls[name] = calls.get(name, 0) + 1
    groups: list[tuple[torch.Tensor, list[str]]] = []
    alone: set[str] = set()
    for x, name in seen:  # `seen` holds every input, so no id is reused while grouping
        if calls[name] > 1:
            if name not in alone:
                alone.add(name)
                groups.append((x, [name]))
            continue
        for gx, names in groups:
            if gx is x and calls[names[0]] == 1:
                names.append(name)
                break
        else:
            groups.append((x, [name]))
    placed = {n for _, names in groups for n in names}
    return [names for _, names in groups] + [[n] for n in layers if n not in placed]  # never called: alone
