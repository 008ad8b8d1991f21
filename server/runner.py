"""The model runner: one base model + one nested adapter, a batch of rows at their own ranks.

Pure tensor work, no threads or HTTP. The running batch keeps one KV cache, left-padded::

    row 0:  pad pad  p  p  p  g  g      mask 0 0 1 1 1 1 1    next position 5
    row 1:   p   p   p  p  p  g  g      mask 1 1 1 1 1 1 1    next position 7

* :meth:`prefill` runs new prompts (left-padded together, each at its rank) and returns their
  cache, which :meth:`join` pads to the batch's width and appends as new rows;
* :meth:`prefill_piece` runs one long prompt a piece at a time (chunked prefill: the engine
  decodes the running rows between pieces), and returns the same once the prompt is complete;
* :meth:`decode` feeds one token per row and returns the next-token logits;
* :meth:`decode_with_piece` does both in one forward: the rows' decode tokens and the long
  prompt's next piece packed as ``(1, B + n)`` (``server.kvcache.MixedCache``), so the piece
  rides on the decode step's pass over the weights instead of costing a pass of its own;
* :meth:`leave` drops finished rows and trims columns that only padding uses.

Each row's adapter rank is applied through per-row coefficients (``NestedAdapter.set_row_ranks``):
``A[:k_max] x`` once for the batch, rows past their own rank zeroed, ``s(k_row)`` applied, then
``B``. K and V depend on the rank (k_proj/v_proj are adapted), so a row's cache is only valid at
its own rank, which never changes while the row runs; nothing is shared between rows.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from server.decoder import LeanDecoder, lean_decoder
from server.kvcache import (MIXED_ATTENTION, MixedCache, RaggedCache, fork, register_mixed_attention, room_cache,
                            select_rows, stack_left)
from server.sampling import TokenLogprob
from trainer.inject import NestedAdapter
from trainer.kernels import contiguous_head_input

log = logging.getLogger(__name__)
RAGGED_MIN_PADDING = 0.1  # a batched prefill goes unpadded once padding would be this fraction of its tokens
HEAD_CHUNK = 256  # prompt positions per lm_head call when scoring a prompt: (256, V) logits at a time


@dataclass
class Prefilled:
    """New rows after prefill, not yet part of the batch."""

    cache: DynamicCache
    mask: torch.Tensor  # (b, Lp) 1 = real token
    positions: torch.Tensor  # (b,) next position id per row
    ranks: list[int]
    logits: torch.Tensor  # (b, V) next-token logits
    # per row: None, or the prompt's own logprobs (one entry per prompt token, the first None)
    prompt_logprobs: list[list[TokenLogprob | None] | None] | None = None


@dataclass
class PartialPrefill:
    """One prompt being prefilled a piece at a time: its cache holds ``prompt[:done]``."""

    prompt: list[int]
    rank: int
    prompt_logprobs: int | None = None
    cache: DynamicCache = field(default_factory=room_cache)
    done: int = 0
    hidden: list[torch.Tensor] = field(default_factory=list)  # each piece's hidden states, when scoring

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done


@dataclass
class Batch:
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (B, L)
    positions: torch.Tensor | None = None  # (B,)
    ranks: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.ranks)


class ModelRunner:
    def __init__(self, model, adapter: NestedAdapter | None, pad_id: int):
        self.model = model
        self.adapter = adapter
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.batch = Batch()
        self._coeff_key: tuple[int, ...] | None = None
        contiguous_head_input(model)  # a prefill's last positions: one GEMM, not a bmm over weight copies
        # where the model runs SDPA, forwards run under our attention: SDPA too, but decode steps
        # fold grouped-query heads (kvcache._decode_attention) and mixed steps split (mixed_attention)
        self._attention = MIXED_ATTENTION if model.config._attn_implementation == "sdpa" else None
        if self._attention:
            register_mixed_attention()
        self.mixed = False  # decode_with_piece available (enable_mixed(): checked on a probe)
        self.ragged = False  # prefill of unequal prompts unpadded (enable_mixed(): checked on a probe)
        self.lean: LeanDecoder | None = None  # decode steps in few ops (enable_lean_decode(): checked on a probe)
        self.compiled = None  # rank-0 decode steps as one compiled graph (enable_compiled_decode())

    # -- adapter coefficients ----------------------------------------------------------------------
    def _use_ranks(self, ranks: list[int]) -> None:
        key = tuple(ranks)
        if self.adapter is None or key == self._coeff_key:
            return
        self.adapter.set_row_ranks(list(ranks))
        self._coeff_key = key

    def _use_token_ranks(self, ranks: list[int], counts: list[int]) -> None:
        """Coefficients for one packed sequence (a mixed step, a ragged prefill) whose segment i is
        ``counts[i]`` tokens at rank ``ranks[i]``: one row for every token when the ranks agree,
        else a row per token, ``(1, Σn, r)`` (each segment one row expanded, not copied)."""
        if self.adapter is None:
            return
        if len(set(ranks)) == 1:
            self._use_ranks(ranks[:1])
            return
        rows = [self.adapter.inference_coeffs(k).expand(n, -1) for k, n in zip(ranks, counts)]
        self.adapter.set_coeffs(torch.cat(rows)[None])
        self._coeff_key = None

    def remerge(self, k: int) -> None:
        """Fold rank k into the weights (``NestedAdapter.remerge``); the running rows keep their
        ranks and their caches (their effective weights do not change), their coefficients are
        recomputed relative to k."""
        self.adapter.remerge(k)
        self._coeff_key = None

    def _forward(self, ids, mask, positions, cache, ranks: list[int]) -> torch.Tensor:
        self._use_ranks(ranks)
        with self._attention_as(self._attention):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1]  # (B, V)

    @contextlib.contextmanager
    def _attention_as(self, name: str | None):
        """The model's attention implementation set to ``name`` (None: as it is) for one forward."""
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = name or before
        try:
            yield
        finally:
            config._attn_implementation = before

    # -- the three operations ------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], ranks: list[int],
                prompt_logprobs: list[int | None] | None = None) -> Prefilled:
        """New rows, each at its rank. ``prompt_logprobs[i]`` = n also scores row i's prompt
        (echo): each prompt token's logprob under the rows' model and its n most likely
        alternatives, from the same forward (the decoder's hidden states through the head in
        chunks, never the whole (b, L, V) logits at once)."""
        width = max(len(p) for p in prompts)
        scoring = prompt_logprobs and any(n is not None for n in prompt_logprobs)
        padding = sum(width - len(p) for p in prompts)
        if self.ragged and not scoring and padding >= RAGGED_MIN_PADDING * width * len(prompts):
            return self._prefill_ragged(prompts, ranks)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (b, Lp)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
        ids, mask = ids.to(self.device), _left_padded_mask([len(p) for p in prompts], self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, Lp)
        cache = room_cache()
        if not prompt_logprobs or all(n is None for n in prompt_logprobs):
            logits = self._forward(ids, mask, positions, cache, ranks)
            return Prefilled(cache, mask, positions[:, -1] + 1, list(ranks), logits)
        captured = {}

        def keep_hidden(module, args, out):
            captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (b, Lp, H)

        hook = self.model.get_decoder().register_forward_hook(keep_hidden)
        try:
            logits = self._forward(ids, mask, positions, cache, ranks)
        finally:
            hook.remove()
        scored = [None if n is None else self._score_prompt(captured["h"][i, width - len(p):], p, n)
                  for i, (p, n) in enumerate(zip(prompts, prompt_logprobs))]
        return Prefilled(cache, mask, positions[:, -1] + 1, list(ranks), logits, scored)

    def _prefill_ragged(self, prompts: list[list[int]], ranks: list[int]) -> Prefilled:
        """:meth:`prefill` of several prompts as one unpadded sequence (:class:`RaggedCache`):
        each token computed once, at its own position, under its own row's rank."""
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long, device=self.device)  # (1, Σn)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]  # (1, Σn)
        cache = RaggedCache(lengths)
        self._use_token_ranks(ranks, lengths)
        ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1  # each prompt's last token
        if self.lean is not None:
            logits = self.lean.packed(ids[0], positions[0], cache, ends)
        else:
            with self._attention_as(MIXED_ATTENTION):
                logits = self.model(input_ids=ids, attention_mask=_PREPARED_MASK, position_ids=positions,
                                    use_cache=True, logits_to_keep=ends, **{self._cache_kw: cache}).logits[0]
        return Prefilled(cache.batch, _left_padded_mask(lengths, self.device), torch.tensor(lengths, device=self.device),
                         list(ranks), logits)

    @torch.inference_mode()
    def prefill_piece(self, part: PartialPrefill, n: int) -> Prefilled | None:
        """Feed the next ``n`` tokens of ``part``'s prompt (one row, no padding: positions
        ``done … done+n-1`` attend to the cache and to each other). Returns the row, as
        :meth:`prefill` would have, once the whole prompt is in; None before. The cache is
        replaced, never written into, so a piece that raises leaves ``part`` as it was. Where
        mixed forwards are on, the piece runs as one with no rows (its attention split at long
        pieces: ``server.kvcache._piece_attention``)."""
        if self.mixed:
            return self._with_piece(None, part, n)[1]
        a, b = part.done, min(part.done + n, len(part.prompt))
        ids = torch.tensor([part.prompt[a:b]], dtype=torch.long, device=self.device)  # (1, n)
        mask = torch.ones((1, b), dtype=torch.long, device=self.device)  # (1, done + n)
        positions = torch.arange(a, b, device=self.device).unsqueeze(0)  # (1, n)
        # appends past part.cache's end (part keeps its view); the first piece reserves the whole prompt
        cache = fork(part.cache) if a else room_cache(capacity=len(part.prompt))
        with self._keeping_hidden(part):
            logits = self._forward(ids, mask, positions, cache, [part.rank])
        part.cache, part.done = cache, b
        return self._piece_end(part, logits)

    @contextlib.contextmanager
    def _keeping_hidden(self, part: PartialPrefill, rows: int = 0):
        """While scoring ``part``'s prompt (echo): the decoder's hidden states of the forward's
        piece tokens (past its first ``rows`` positions) appended to ``part.hidden`` when it succeeds."""
        if part.prompt_logprobs is None:
            yield
            return
        captured = {}

        def keep_hidden(module, args, out):
            captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (1, B + n, H)

        hook = self.model.get_decoder().register_forward_hook(keep_hidden)
        try:
            yield
        finally:
            hook.remove()
        part.hidden.append(captured["h"][0, rows:])

    def _piece_end(self, part: PartialPrefill, logits: torch.Tensor) -> Prefilled | None:
        """After a piece: None while the prompt has more; else its row (prompt scored if asked)."""
        if part.remaining:
            return None
        scored = None
        if part.prompt_logprobs is not None:
            scored = [self._score_prompt(torch.cat(part.hidden), part.prompt, part.prompt_logprobs)]
            part.hidden = []
        e = len(part.prompt)
        return Prefilled(part.cache, torch.ones((1, e), dtype=torch.long, device=self.device),
                         torch.tensor([e], device=self.device), [part.rank], logits, scored)

    def _score_prompt(self, hidden: torch.Tensor, ids: list[int], n: int) -> list[TokenLogprob | None]:
        """``hidden`` (L, H): the prompt's hidden states; position j predicts token j + 1."""
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        target = torch.tensor(ids[1:], device=hidden.device)  # (L-1,)
        out: list[TokenLogprob | None] = [None]
        for a in range(0, len(ids) - 1, HEAD_CHUNK):
            logits = head(hidden[a:a + HEAD_CHUNK][:len(target) - a]).float()  # (c, V)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            lp = logits.log_softmax(-1)
            chosen = lp.gather(1, target[a:a + len(lp), None])[:, 0].tolist()
            top_v, top_i = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
            for j, (c, vs, is_) in enumerate(zip(chosen, top_v.tolist(), top_i.tolist())):
                out.append(TokenLogprob(ids[a + j + 1], c, list(zip(is_, vs))))
        return out

    @torch.inference_mode()
    def join(self, new: Prefilled, rows: list[int] | None = None) -> None:
        """Append prefilled rows (``rows``: only those indices of ``new``) to the running batch,
        left-padding whichever side is shorter."""
        if rows is not None and len(rows) < len(new.ranks):
            new = _select(new, rows)
        b = self.batch
        if b.cache is None:
            self.batch = Batch(new.cache, new.mask, new.positions, list(new.ranks))
            return
        width = max(b.mask.shape[1], new.mask.shape[1])
        mask = torch.cat([_pad_left(b.mask, width), _pad_left(new.mask, width)])
        self.batch = Batch(stack_left([b.cache, new.cache], width), mask, torch.cat([b.positions, new.positions]),
                           b.ranks + new.ranks)

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token per row in; next-token logits (B, V) out."""
        b = self.batch
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)  # (B, 1)
        b.mask = torch.cat([b.mask, b.mask.new_ones((b.size, 1))], dim=1)  # (B, L+1)
        if self.compiled is not None and self._base_only(b.ranks):
            logits = self.compiled.step(ids[:, 0], b.mask, b.positions, b.cache)
        elif self.lean is not None:
            self._use_ranks(b.ranks)
            logits = self.lean.step(ids[:, 0], b.mask, b.positions, b.cache)
        else:
            logits = self._forward(ids, b.mask, b.positions.unsqueeze(1), b.cache, b.ranks)
        b.positions = b.positions + 1
        return logits

    @torch.inference_mode()
    def decode_with_piece(self, tokens: list[int], part: PartialPrefill, n: int) -> tuple[torch.Tensor, Prefilled | None]:
        """:meth:`decode` and :meth:`prefill_piece` in one forward: returns the rows' next-token
        logits (B, V) and, once ``part``'s prompt is complete, its row (else None). Neither the
        batch nor ``part`` changes unless the forward succeeds (the batch's cache is written past
        its views' end, ``part``'s cache is forked). Not for a prompt scored with ``echo``."""
        return self._with_piece(tokens, part, n)

    def _with_piece(self, tokens: list[int] | None, part: PartialPrefill, n: int):
        """One packed forward (``server.kvcache.MixedCache``): a decode token per running row
        (``tokens``; None: no rows, the piece alone) and ``part``'s next n prompt tokens."""
        b = self.batch
        B, a = (b.size if tokens is not None else 0), part.done
        e = min(a + n, len(part.prompt))
        ids = torch.tensor([list(tokens or []) + part.prompt[a:e]], dtype=torch.long, device=self.device)  # (1, B + n)
        piece_pos = torch.arange(a, e, device=self.device)
        piece = fork(part.cache) if a else room_cache(capacity=len(part.prompt))
        if B:
            mask = torch.cat([b.mask, b.mask.new_ones((B, 1))], dim=1)  # (B, L+1)
            positions = torch.cat([b.positions, piece_pos])[None]  # (1, B + n)
            cache = MixedCache(b.cache, piece, B, mask, a, e - a)
            self._use_token_ranks([*b.ranks, part.rank], [1] * B + [e - a])  # each row's rank, then the piece's
        else:
            positions, cache = piece_pos[None], MixedCache(None, piece, 0, None, a, e - a, self.device)
            self._use_ranks([part.rank])
        keep = torch.tensor([*range(B), B + e - a - 1], device=self.device)  # the rows, the piece's last token
        if self.lean is not None and part.prompt_logprobs is None:  # (scoring reads the decoder's hidden states)
            logits = self.lean.packed(ids[0], positions[0], cache, keep)  # (B + 1, V)
        else:
            with self._keeping_hidden(part, B), self._attention_as(MIXED_ATTENTION):
                logits = self.model(input_ids=ids, attention_mask=_PREPARED_MASK, position_ids=positions,
                                    use_cache=True, logits_to_keep=keep, **{self._cache_kw: cache}).logits[0]
        if B:
            b.mask, b.positions = mask, b.positions + 1
        part.cache, part.done = piece, e
        return logits[:B], self._piece_end(part, logits[B:])

    @torch.inference_mode()
    def enable_mixed(self, probe: list[int] | None = None) -> bool:
        """Use :meth:`decode_with_piece` and unpadded (ragged) prefills if this model computes with
        them what separate, padded forwards compute: checked on a probe (two rows of unequal
        prompts at the top and lowest rank, a piece at the top rank); models with sliding-window
        or other non-full attention layers keep both off. Call with no rows running. Returns the
        decision (also ``self.mixed`` and ``self.ragged``)."""
        cfg = self.model.config
        kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        self.mixed = self.ragged = False
        if kinds != {"full_attention"} or getattr(cfg, "sliding_window", None) or self.batch.size:
            return False
        register_mixed_attention()
        ranks = [0, 0] if self.adapter is None else [self.adapter.config.ranks[-1], self.adapter.config.ranks[0]]
        probe = probe or [1, 2, 3, 4, 5, 6, 7]
        try:
            expect = self._probe(probe, ranks, mixed=False)
            self.ragged = self.mixed = True  # the probe's first prefill (4 and 2 tokens) unpadded, pieces packed
            got = self._probe(probe, ranks, mixed=True)
        except Exception as e:  # a model whose attention does not go through the cache and interface
            log.info("mixed decode + prefill piece unavailable for this model (%s); pieces run separately", e)
            self.ragged = self.mixed = False
            return False
        finally:
            self.reset()
        tol = self._probe_tolerance(expect)
        self.mixed = self.ragged = bool(torch.allclose(got, expect, rtol=0, atol=tol))
        if not self.mixed:
            log.warning("mixed decode + prefill piece differs from separate forwards by %.3g (tolerance %.3g); "
                        "pieces run separately, prompts padded", float((got - expect).abs().max()), tol)
        return self.mixed

    @torch.inference_mode()
    def enable_lean_decode(self, probe: list[int] | None = None) -> bool:
        """Run decode steps — and, where mixed forwards are on (:meth:`enable_mixed`, call it
        first), ragged prefills and pieces too — through :class:`server.decoder.LeanDecoder` if
        this model is one it computes and, on probes (two rows of unequal prompts at the top and
        lowest rank: three decode steps; :meth:`_probe`'s ragged prefill, pieces and mixed step),
        it gives the logits transformers' forward gives. Call with no rows running. Returns the
        decision (also ``self.lean``)."""
        self.lean = None
        lean = lean_decoder(self.model)
        if lean is None or self.batch.size:
            return False
        ranks = [0, 0] if self.adapter is None else [self.adapter.config.ranks[-1], self.adapter.config.ranks[0]]
        probe = probe or [1, 2, 3, 4, 5, 6, 7]
        try:
            expect = self._probe_decode(probe, ranks)
            if self.mixed:  # packed forwards (ragged prefill, pieces mixed into decode steps) run lean too
                expect = torch.cat([expect, self._probe(probe, ranks, mixed=True)])
            self.lean = lean
            got = self._probe_decode(probe, ranks)
            if self.mixed:
                got = torch.cat([got, self._probe(probe, ranks, mixed=True)])
        except Exception as e:  # a layer that does not compute the way the lean step calls it
            log.info("lean decode unavailable for this model (%s); decode steps run through transformers", e)
            self.lean = None
            return False
        finally:
            self.reset()
        if not self._agrees(got, expect, "lean decode differs from transformers' forward",
                            "decode steps run through transformers"):
            self.lean = None
        return self.lean is not None

    def _base_only(self, ranks: list[int]) -> bool:
        """Whether a step with these row ranks computes the base model as it was compiled: every
        row at rank 0, and the weights the plain base ones (nothing merged, or rank 0 "merged":
        ``NestedAdapter.remerge(0)`` restores them exactly — what ``--merge-rank auto`` does
        when rank 0 leads the traffic)."""
        return (self.adapter is None or not self.adapter.merged_rank) and not any(ranks)

    def enable_compiled_decode(self, probe: list[int] | None = None) -> bool:
        """Run decode steps whose rows are all at rank 0 on the plain base weights through
        :class:`server.compiled.CompiledDecode`: compiled now (one graph for every batch size,
        a single row padded to two), kept if on a probe (three decode steps of two rows, and of
        one) its logits are the lean step's within :meth:`_probe_tolerance` — twice it in bf16, where the compiled
        kernels keep float32 between ops that the lean step rounds to bf16. Needs the lean step
        (:meth:`enable_lean_decode` first) and a CPU; call with no rows running. Returns the
        decision (also ``self.compiled``)."""
        from server.compiled import CompiledDecode

        self.compiled = None
        if self.lean is None or self.batch.size or self.device.type != "cpu" or not self._base_only([]):
            return False
        probe = probe or [1, 2, 3, 4, 5, 6, 7]
        try:
            expect = torch.cat([self._probe_decode(probe, [0, 0]), self._probe_decode(probe, [0])])
            self.compiled = CompiledDecode(self.lean)
            got = torch.cat([self._probe_decode(probe, [0, 0]), self._probe_decode(probe, [0])])
        except Exception as e:  # a model or torch build the compiler does not handle
            log.warning("compiled decode unavailable (%s: %s); rank-0 decode steps run lean", type(e).__name__, e)
            self.compiled = None
            return False
        finally:
            self.reset()
        if not self._agrees(got, expect, "compiled decode differs from the lean step", "rank-0 decode steps run lean",
                            bf16_factor=2):
            self.compiled = None
        return self.compiled is not None

    def _agrees(self, got: torch.Tensor, expect: torch.Tensor, differs: str, fallback: str,
                bf16_factor: float = 1) -> bool:
        """Whether two ways of computing a probe agree within :meth:`_probe_tolerance` (times
        ``bf16_factor`` below fp32); logs what differs and what runs instead where they do not."""
        tol = self._probe_tolerance(expect) * (1 if self.model.dtype == torch.float32 else bf16_factor)
        err = float((got - expect).abs().max())
        if err > tol:
            log.warning("%s by %.3g (tolerance %.3g); %s", differs, err, tol, fallback)
        return err <= tol

    def _probe_tolerance(self, expect: torch.Tensor) -> float:
        """How far a probe's logits may differ between two ways of computing them: summation order
        in fp32, a few roundings in bf16, relative to the logits' size."""
        return (1e-4 if self.model.dtype == torch.float32 else 3e-2) * (1 + float(expect.abs().max()))

    def _probe_decode(self, probe: list[int], ranks: list[int]) -> torch.Tensor:
        """Logits of three decode steps of rows of unequal prompts (left padding in the mask),
        one row per rank given (at most two)."""
        self.reset()
        self.join(self.prefill([probe[:4], probe[:2]][:len(ranks)], ranks))
        steps = [self.decode([probe[4 + i], probe[i]][:len(ranks)]) for i in range(3)]
        return torch.cat(steps).float()

    def _probe(self, probe: list[int], ranks: list[int], mixed: bool) -> torch.Tensor:
        """Logits of two decode steps of two rows, the second with two 3-token pieces of a prompt
        (the first piece alone before it) — mixed in or separate."""
        self.reset()
        self.join(self.prefill([probe[:4], probe[:2]], ranks))
        part = PartialPrefill(probe, ranks[0])
        self.prefill_piece(part, 3)
        first = self.decode([probe[4], probe[5]])
        if mixed:
            rows, new = self.decode_with_piece([probe[6], probe[0]], part, 4)
        else:
            rows = self.decode([probe[6], probe[0]])
            new = self.prefill_piece(part, 4)
        return torch.cat([first, rows, new.logits]).float()

    @torch.inference_mode()
    def leave(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (indices into the batch), then drop all-padding columns."""
        b = self.batch
        if not keep:
            self.batch = Batch()
            return
        idx = torch.tensor(keep, device=self.device)
        mask = b.mask[idx]
        start = _first_used(mask)
        self.batch = Batch(select_rows(b.cache, idx, start), mask[:, start:], b.positions[idx], [b.ranks[i] for i in keep])

    def reset(self) -> None:
        self.batch = Batch()


_PREPARED_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)  # a 4D mask: transformers passes it through as is
# (a MixedCache forward's attention applies the rows' and the piece's own masks)


def _left_padded_mask(lengths: list[int], device) -> torch.Tensor:
    """(b, max length): 1 on each row's last ``lengths[i]`` columns, 0 (padding) left of them."""
    width = max(lengths)
    return (torch.arange(width, device=device)[None, :] >= width - torch.tensor(lengths, device=device)[:, None]).long()


def _first_used(mask: torch.Tensor) -> int:
    """The first column of ``mask`` (b, L) that some row uses (left of it: padding only)."""
    return int((mask.sum(0) > 0).nonzero()[0])


def _select(new: Prefilled, rows: list[int]) -> Prefilled:
    """Rows ``rows`` of ``new``, without the padding columns none of them uses."""
    idx = torch.tensor(rows, device=new.mask.device)
    mask = new.mask[idx]
    start = _first_used(mask)
    scored = None if new.prompt_logprobs is None else [new.prompt_logprobs[i] for i in rows]
    return Prefilled(select_rows(new.cache, idx, start), mask[:, start:], new.positions[idx],
                     [new.ranks[i] for i in rows], new.logits[idx], scored)


def _pad_left(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad ``t`` on the left of ``dim`` to ``width`` (the mask (B, L): dim 1)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
