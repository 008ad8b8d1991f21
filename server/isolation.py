"""Fault isolation for batched forwards: a request that breaks the batch fails alone.

When a batched prefill or decode raises, the engine does not know which row caused it. It
retries the rows one at a time: a row that fails alone is the culprit and fails with its error;
the others are joined back into one batch and go on. Retrying a decode needs the batch as it
was before the failed forward, and that is free: a forward writes the cache's new column past
the end of every view handed out (``server.kvcache.RoomLayer``), never into one, and replaces the
runner's mask and positions, so references taken before the step are a snapshot.

If every row fails alone, the fault may be the model's rather than the requests': a one-token
probe at rank 0 decides. If the probe fails too the model is unusable (a lost device, weights
gone) and :class:`ModelBroken` tells the engine to stop; otherwise only those requests fail.

The plain path costs nothing extra: one list of tensor references per decode step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from server.kvcache import RoomLayer, room_cache
from server.runner import Batch, ModelRunner, PartialPrefill, Prefilled

log = logging.getLogger(__name__)
PROBE_TOKEN = 0  # any id is in range of the embedding table


class ModelBroken(RuntimeError):
    """The model fails even on a one-token probe: nothing can be served, the engine stops."""


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass
class Outcome:
    """Rows that survived (indices into the step's rows, in order), their next-token logits
    ``(len(kept), V)``, and the error of each row that failed alone."""

    kept: list[int]
    logits: torch.Tensor | None
    errors: dict[int, str]
    prompt_logprobs: list | None = None  # prefill: per kept row, its prompt's logprobs (or None)


@torch.inference_mode()
def prefill(runner: ModelRunner, prompts: list[list[int]], ranks: list[int],
            prompt_logprobs: list[int | None] | None = None) -> tuple[Outcome, list[Prefilled]]:
    """Prefill ``prompts`` together; if that raises, one at a time. Returns the outcome and the
    prefilled parts (not yet joined to the running batch)."""
    scored = prompt_logprobs or [None] * len(prompts)
    try:
        new = runner.prefill(prompts, ranks, scored)
        return Outcome(list(range(len(prompts))), new.logits, {}, new.prompt_logprobs), [new]
    except Exception as e:
        log.warning("prefill of %d prompts raised %s; retrying them one at a time", len(prompts), describe(e))
        done, errors = _apart(len(prompts), e, lambda i: runner.prefill([prompts[i]], [ranks[i]], [scored[i]]))
    if not done:
        check_model(runner)
    parts = list(done.values())
    plp = [(p.prompt_logprobs or [None])[0] for p in parts]
    return Outcome(list(done), torch.cat([p.logits for p in parts]) if parts else None, errors, plp), parts


@torch.inference_mode()
def prefill_piece(runner: ModelRunner, part: PartialPrefill, n: int) -> tuple[Prefilled | None, str | None]:
    """The next ``n`` tokens of a long prompt (``ModelRunner.prefill_piece``) → (the row once
    complete, else None; None, or this request's error). A piece that raises fails its request
    alone, unless the model fails the probe too (:class:`ModelBroken`)."""
    try:
        return runner.prefill_piece(part, n), None
    except Exception as e:
        log.warning("a prefill piece (tokens %d–%d of %d) raised %s", part.done, part.done + n, len(part.prompt),
                    describe(e))
        check_model(runner)
        return None, describe(e)


@torch.inference_mode()
def decode(runner: ModelRunner, tokens: list[int]) -> Outcome:
    """One decode step for the running batch; if it raises, every row alone from the snapshot.
    On return ``runner.batch`` holds exactly the kept rows, in order."""
    snap = _snapshot(runner.batch)
    try:
        return Outcome(list(range(len(tokens))), runner.decode(tokens), {})
    except Exception as e:
        log.warning("decode of %d rows raised %s; retrying them one at a time", len(tokens), describe(e))
        first = e

    def alone(i: int) -> Prefilled:
        runner.batch = _row(snap, i)
        logits = runner.decode([tokens[i]])
        b = runner.batch
        return Prefilled(b.cache, b.mask, b.positions, b.ranks, logits)

    done, errors = _apart(len(tokens), first, alone)
    runner.reset()
    if not done:
        check_model(runner)
    for s in done.values():  # all the same width (one snapshot, one step): join only concatenates
        runner.join(s)
    solos = list(done.values())
    return Outcome(list(done), torch.cat([s.logits for s in solos]) if solos else None, errors)


@torch.inference_mode()
def decode_with_piece(runner: ModelRunner, tokens: list[int], part: PartialPrefill, n: int
                      ) -> tuple[Outcome, tuple[Prefilled | None, str | None]]:
    """One step that decodes the running rows and feeds ``part``'s next piece in one forward
    (``ModelRunner.decode_with_piece``) → (the decode's outcome, the piece's as
    :func:`prefill_piece` gives it). If that forward raises, the batch is restored from its
    snapshot and both run apart (:func:`decode`, :func:`prefill_piece`), so a bad row or a bad
    prompt fails alone, as without mixing."""
    snap = _snapshot(runner.batch)
    try:
        logits, new = runner.decode_with_piece(tokens, part, n)
        return Outcome(list(range(len(tokens))), logits, {}), (new, None)
    except Exception as e:
        log.warning("a decode step with a prefill piece raised %s; running them apart", describe(e))
    runner.batch = Batch(room_cache([RoomLayer.adopt(k, v) for k, v in snap.layers]), snap.mask, snap.positions,
                         list(snap.ranks))
    out = decode(runner, tokens)
    return out, prefill_piece(runner, part, n)


def _apart(n: int, first: BaseException, run_one) -> tuple[dict[int, Prefilled], dict[int, str]]:
    """``run_one(i)`` for each row alone → (results of the rows that ran, errors of the others).
    A batch of one is not run again: its error is ``first``."""
    if n == 1:
        return {}, {0: describe(first)}
    done, errors = {}, {}
    for i in range(n):
        try:
            done[i] = run_one(i)
        except Exception as e:
            errors[i] = describe(e)
    return done, errors


def check_model(runner: ModelRunner) -> None:
    """Raise ModelBroken unless a one-token prompt at rank 0 runs."""
    try:
        runner.prefill([[PROBE_TOKEN]], [0])
    except Exception as e:
        raise ModelBroken(f"the model fails on a one-token probe at rank 0 ({describe(e)}); "
                          "it cannot serve anything") from e


@dataclass
class _Snapshot:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (B, H, L, D)
    mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B,)
    ranks: list[int]


def _snapshot(b: Batch) -> _Snapshot | None:
    if b.cache is None:
        return None
    return _Snapshot([(l.keys, l.values) for l in b.cache.layers], b.mask, b.positions, list(b.ranks))


def _row(s: _Snapshot, i: int) -> Batch:
    """Row ``i`` of the snapshot as a batch of one (its own copy of that row's cache)."""
    layers = [RoomLayer.adopt(k[i:i + 1], v[i:i + 1]) for k, v in s.layers]  # (1, H, L, D); copied on update
    return Batch(room_cache(layers), s.mask[i:i + 1], s.positions[i:i + 1], [s.ranks[i]])
