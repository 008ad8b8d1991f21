"""Stop strings in streamed text: where one starts, and how much of a tail must be held back."""

from __future__ import annotations


def find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index of the earliest stop string in ``text`` that reaches past what was already sent."""
    best = None
    for s in stops:
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
