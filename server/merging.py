"""Automatic merging: keep the rank most of the traffic uses folded into the weights.

With rank m merged, a row at rank m costs what the base model costs, and a row at another rank k
adds only its difference ``c_k − c_m`` (exact; see ``NestedAdapter.inference_coeffs``). So the
best rank to merge is the one most rows run at. :class:`AutoMerge` decides which (a pure function
of the ranks it is shown and the time); the engine applies it between steps with
``NestedAdapter.remerge``, which rebuilds the weights from a copy of the base (no drift, however
often it switches). The KV cache stays valid across a switch: every row's effective weights are
the same before and after.

Decision: each engine step adds one unit per running row to its rank's share; shares decay with
a half-life of ``half_life_s``. The leading rank is merged once it has led for ``dwell_s`` and at
least ``dwell_s`` has passed since the last switch (a switch costs a rebuild of every adapted
weight: ~0.1–0.5 s for a 135M model on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AutoMerge:
    merged: int  # the rank folded in now (0: the plain base weights)
    dwell_s: float = 2.0
    half_life_s: float = 2.0
    shares: dict[int, float] = field(default_factory=dict)
    _t: float | None = None
    _leader_since: float | None = None
    _leader: int | None = None
    _last_switch: float = float("-inf")

    def observe(self, ranks: list[int], now: float) -> int | None:
        """Record one step's row ranks; return the rank to merge now, or None to keep the current one."""
        if self._t is not None:
            decay = 0.5 ** (max(0.0, now - self._t) / self.half_life_s) if self.half_life_s > 0 else 0.0
            self.shares = {k: v * decay for k, v in self.shares.items() if v * decay > 1e-6}
        self._t = now
        for k in ranks:
            self.shares[k] = self.shares.get(k, 0.0) + 1.0
        if not self.shares:
            return None
        best = max(self.shares.values())
        # the merged rank keeps its place on a tie; otherwise the larger rank (the more accurate)
        leader = self.merged if self.shares.get(self.merged) == best else max(
            k for k, v in self.shares.items() if v == best)
        if leader == self.merged:
            self._leader = self._leader_since = None
            return None
        if leader != self._leader:
            self._leader, self._leader_since = leader, now
        if now - self._leader_since >= self.dwell_s and now - self._last_switch >= self.dwell_s:
            self.merged, self._last_switch = leader, now
            self._leader = self._leader_since = None
            return leader
        return None
