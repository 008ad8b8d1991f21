"""Per-request sampling, batched: the OpenAI knobs, a grammar for structured output, logprobs.

For each row of the logits block ``(B, V)`` (one running request per row), in vLLM's order:

1. **grammar**: tokens the row's ``response_format`` grammar refuses → -inf (:mod:`server.structured`);
2. **logit_bias**: ``logit[t] += bias[t]``;
3. **repetition_penalty** ``rp`` (CTRL, as HF and vLLM) over the prompt *and* the output:
   ``logit[t] = logit[t] / rp if logit[t] > 0 else logit[t] * rp`` for every token seen;
4. **presence / frequency penalties** (OpenAI) over the output only:
   ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``;
5. greedy rows: argmax. Sampling rows: **temperature** → **min_p** (drop ``p < min_p * max p``) →
   **top_k** → **top_p** (nucleus; the most likely token always stays) → a multinomial draw with
   the request's own seeded generator.

Why this order (vLLM's v1 sampler): the grammar comes first so that no bias or penalty can bring back
a token the format forbids (-inf stays -inf through 2–4); bias and penalties change the argmax, so
they apply to greedy rows too; min_p, top_k, top_p do not, so only sampling rows pay for them, on the
tempered distribution, min_p before top-k/top-p as vLLM applies it.

**Logprobs** are of the model's *raw* distribution, ``log_softmax`` of the unprocessed logits in
float32 (vLLM's default ``raw_logprobs``; what lm-evaluation-harness reads): penalties, bias and
grammar choose the token, they do not rewrite its reported probability.

Cost: a greedy row with nothing to apply is part of one batched argmax; every other feature gathers
only the rows that use it, and one that no row uses costs nothing. The only per-row Python loops are
the multinomial draws (each request has its own generator) and the grammar masks.
:func:`filter_logits` is the one-row reference of temperature / top-k / top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.structured import Matcher, allowed_tokens

if TYPE_CHECKING:
    from server.structured import Grammar

GREEDY_BELOW = 1e-5  # as vLLM's _SAMPLING_EPS
NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """How one request picks its next token. A temperature below ``GREEDY_BELOW`` is greedy
    (dividing the logits by a tinier one overflows them to inf, and sampling NaNs).
    Ranges are the API layer's to check (OpenAI's: penalties -2..2, bias -100..100, ``rp`` > 0)."""

    max_new_tokens: int = 128  # 0 is allowed: echo-only requests generate nothing
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # reproducible sampling when set
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks, load tests)
    min_p: float = 0.0  # drop tokens whose prob < min_p * the top prob (after temperature); 0: off
    presence_penalty: float = 0.0  # logit -= this, once, for every token already in the output
    frequency_penalty: float = 0.0  # logit -= this * (times the token occurs in the output)
    repetition_penalty: float = 1.0  # over prompt + output: logit > 0 → / rp, else * rp; 1: off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    logprobs: int | None = None  # None: none; n: the chosen token's logprob and the n most likely
    grammar: Grammar | None = None  # compiled response_format (server.structured); None: free text

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(slots=True)  # one per row and step: slots make them cheaper to build
class TokenLogprob:
    token: int
    logprob: float  # of the chosen token, under the model's raw distribution
    top: list[tuple[int, float]]  # the n most likely (id, logprob), most likely first


@dataclass(slots=True)
class Sampled:
    token: int
    logprob: TokenLogprob | None  # None unless params.logprobs is not None


class RowSampling:
    """Per-request sampling state the engine keeps for one running row (created at admission).

    Penalty counts are kept incrementally: a (V,) float32 CPU tensor per row, created the first
    time a penalty needs it, into which each step folds the tokens accepted since the last one.
    Stacking them costs the same at any output length, where rebuilding them every step from the
    token lists grows with it. Measured on 1 CPU thread of a loaded machine, V = 49152, 32 rows:
    folding and stacking take ~1.4 ms a step after 1,000 output tokens and after 4,000, where
    rebuilding with scatter_add takes 12 and 27 ms (most of it turning the lists into tensors)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], generator: torch.Generator):
        self.params = params
        self.prompt_ids = prompt_ids
        self.generator = generator
        self.output: list[int] = []  # every accepted token, in order
        self.matcher: Matcher | None = params.grammar.matcher() if params.grammar is not None else None
        p = params
        self.penalised = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        self.repeats = p.repetition_penalty != 1.0
        self.biased = bool(p.logit_bias)
        # a greedy row with nothing to apply takes the batch's one argmax
        self.plain = p.greedy and self.matcher is None and not (self.penalised or self.repeats or self.biased)
        self._bias = (torch.tensor(list(p.logit_bias), dtype=torch.long),
                      torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)) if self.biased else None
        self._counts: torch.Tensor | None = None  # (V,) float32: occurrences of each id in the output
        self._counted = 0  # how many of self.output _counts holds
        self._prompt_seen: torch.Tensor | None = None  # (V,) bool: ids in the prompt

    def accept(self, token: int) -> None:
        """Record a generated token: it counts for the penalties and advances the grammar
        (a token the grammar refuses raises ValueError, and nothing is recorded)."""
        if self.matcher is not None:
            self.matcher.accept(token)
        self.output.append(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing but ending (the engine finishes the row, reason "stop")."""
        return self.matcher is not None and self.matcher.done

    def output_counts(self, width: int) -> torch.Tensor:
        """(width,) float32, CPU: how often each token id occurs in the output so far."""
        if self._counts is None or self._counts.numel() != width:  # first use: the width is the logits'
            self._counts, self._counted = torch.zeros(width), 0
        new = self.output[self._counted:]  # usually the one token accepted since the last step
        if new:
            self._counts.index_put_((torch.tensor(new, dtype=torch.long),), torch.ones(len(new)), accumulate=True)
            self._counted = len(self.output)
        return self._counts

    def seen(self, width: int) -> torch.Tensor:
        """(width,) bool, CPU: the token ids in the prompt or the output (repetition penalty)."""
        if self._prompt_seen is None or self._prompt_seen.numel() != width:
            ids = torch.tensor(self.prompt_ids, dtype=torch.long)
            self._prompt_seen = torch.zeros(width, dtype=torch.bool).index_fill_(0, ids[ids < width], True)
        return self._prompt_seen | (self.output_counts(width) > 0)

    def bias(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, values) of ``logit_bias``; an id outside the model's ``width`` ids raises ValueError."""
        ids, values = self._bias
        bad = ids[(ids < 0) | (ids >= width)]
        if bad.numel():
            raise ValueError(f"logit_bias names token id {int(bad[0])}, but the model has ids 0..{width - 1}")
        return ids, values


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of one row's logits (V,).
    The reference that :func:`filter_batch` (which adds min_p) must agree with."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), NEG_INF)
    return logits


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> list[Sampled]:
    """Next token per row. ``logits`` (B, V) on any device, one :class:`RowSampling` per row.
    Raises ValueError if a grammar allows no token at all, or a logit_bias id is out of range."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"logits has {logits.shape[0]} rows but {len(rows)} RowSampling were given")
    logits = logits.float()  # (B, V); argmax of bf16 on the CPU is twice as slow as converting first
    tokens = logits.max(-1).indices  # (B,) every plain greedy row's answer: the first maximum, as argmax
    # gives it, in a third of argmax's time on the CPU (16 × 49152: 184 against 578 µs)
    work = [i for i, r in enumerate(rows) if not r.plain]
    if work:
        idx = torch.tensor(work, device=logits.device)
        picked = [rows[i] for i in work]
        tokens[idx] = choose(process(logits[idx], picked), picked)  # logits[idx] is a copy: processed in place
    out = tokens.tolist()
    logprobs = raw_logprobs(logits, rows, out)
    return [Sampled(t, logprobs.get(i)) for i, t in enumerate(out)]


def process(x: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Steps 1–4 of the module docstring, in place on ``x`` (W, V) float32, one row per ``rows``."""
    V, dev = x.shape[1], x.device

    g, gi = pick(rows, lambda r: r.matcher is not None, dev)
    if g:
        allowed = allowed_tokens([rows[j].matcher for j in g], V, dev)  # (G, V)
        some = allowed.any(-1)
        if not bool(some.all()):
            stuck = rows[g[some.tolist().index(False)]].params.grammar
            raise ValueError(f"the response_format grammar {stuck} allows no next token")
        x[gi] = x[gi].masked_fill(~allowed, NEG_INF)

    b, _ = pick(rows, lambda r: r.biased, dev)
    if b:
        pairs = [rows[j].bias(V) for j in b]
        local = torch.repeat_interleave(torch.tensor(b), torch.tensor([len(ids) for ids, _ in pairs]))
        x.index_put_((local.to(dev), torch.cat([ids for ids, _ in pairs]).to(dev)),
                     torch.cat([vals for _, vals in pairs]).to(dev), accumulate=True)

    rp, rpi = pick(rows, lambda r: r.repeats, dev)
    if rp:
        seen = torch.stack([rows[j].seen(V) for j in rp]).to(dev)  # (R, V)
        penalty = column([rows[j].params.repetition_penalty for j in rp], dev)  # (R, 1)
        sub = x[rpi]
        x[rpi] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)

    pf, pfi = pick(rows, lambda r: r.penalised, dev)
    if pf:
        counts = torch.stack([rows[j].output_counts(V) for j in pf]).to(dev)  # (F, V)
        presence = column([rows[j].params.presence_penalty for j in pf], dev)  # (F, 1)
        frequency = column([rows[j].params.frequency_penalty for j in pf], dev)
        x[pfi] -= presence * (counts > 0) + frequency * counts
    return x


def choose(x: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """(W,) long on x's device: argmax for greedy rows, a seeded draw from the filtered
    distribution for the others (step 5)."""
    chosen = x.max(-1).indices  # argmax (the first maximum), faster on the CPU
    s, si = pick(rows, lambda r: not r.params.greedy, x.device)
    if s:
        probs = filter_batch(x[si], [rows[j].params for j in s]).softmax(-1).cpu()  # (S, V)
        drawn = [torch.multinomial(probs[k], 1, generator=rows[j].generator) for k, j in enumerate(s)]
        chosen[si] = torch.cat(drawn).to(x.device)
    return chosen


def filter_batch(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature → min_p → top_k → top_p over (S, V), each row with its own settings; a cut
    only touches the rows that ask for it. Agrees row by row with :func:`filter_logits` (min_p
    aside, which it has not)."""
    V, dev = x.shape[1], x.device
    x = x / column([p.temperature for p in params], dev)

    m, mi = pick(params, lambda p: p.min_p > 0.0, dev)
    if m:
        sub = x[mi]
        probs = sub.softmax(-1)
        floor = column([params[i].min_p for i in m], dev) * probs.amax(-1, keepdim=True)  # (M, 1)
        x[mi] = sub.masked_fill(probs < floor, NEG_INF)

    k, ki = pick(params, lambda p: 0 < p.top_k < V, dev)
    if k:
        sub = x[ki]
        ks = torch.tensor([params[i].top_k for i in k], device=dev)
        kth = sub.topk(max(params[i].top_k for i in k), dim=-1).values.gather(1, (ks - 1).unsqueeze(1))  # (K, 1)
        x[ki] = sub.masked_fill(sub < kth, NEG_INF)

    t, ti = pick(params, lambda p: p.top_p < 1.0, dev)
    if t:
        sub = x[ti]
        sorted_logits, order = sub.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= column([params[i].top_p for i in t], dev)
        x[ti] = sub.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), NEG_INF)
    return x


def pick(items: list, keep, device: torch.device) -> tuple[list[int], torch.Tensor | None]:
    """Positions of the items that ``keep(item)``: as a list, and as an index tensor on ``device``."""
    picked = [i for i, item in enumerate(items) if keep(item)]
    return picked, torch.tensor(picked, device=device) if picked else None


def column(values: list[float], device: torch.device) -> torch.Tensor:
    """(N, 1) float32: one per-row setting, broadcast across the vocabulary."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def raw_logprobs(logits: torch.Tensor, rows: list[RowSampling], tokens: list[int]) -> dict[int, TokenLogprob]:
    """Row index → the chosen token's logprob and the top n, for the rows that ask; one batched
    float32 log_softmax over those rows of the *unprocessed* logits."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return {}
    idx = torch.tensor(want, device=logits.device)
    lp = logits[idx].float().log_softmax(-1)  # (L, V), float32 whatever the model's dtype
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in want], device=logits.device).unsqueeze(1))
    n = min(max(rows[i].params.logprobs for i in want), lp.shape[1])
    top_lp, top_ids = lp.topk(n, dim=-1) if n > 0 else (lp[:, :0], lp[:, :0].long())  # sorted, most likely first
    chosen, top_lp, top_ids = chosen.squeeze(1).tolist(), top_lp.tolist(), top_ids.tolist()
    out = {}
    for k, i in enumerate(want):
        n_i = rows[i].params.logprobs
        out[i] = TokenLogprob(tokens[i], chosen[k], list(zip(top_ids[k][:n_i], top_lp[k][:n_i])))
    return out
