"""Drives the pure controller (:mod:`server.controller`) from the server's own metrics.

* :class:`StatsWindow` keeps the engine's per-step :class:`StepStats` (the same objects the
  metrics record) over a sliding window and turns them into an :class:`Observation`: arrival
  rate, tokens per request, p50/p95 latencies (exact, not bucket bounds).
* :class:`ClusterSignals` optionally asks a Prometheus server (PromQL over HTTP, on its own
  thread) for the queue depth summed over all replicas, so that replicas downshift together.
* :class:`RankController` ticks the decision function from the engine loop, records the
  decision metrics, and answers "what rank does an ``auto`` request get now?".

The throughput table it acts on is measured by :mod:`server.calibration`.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time

import httpx
from server.controller import ControllerConfig, Decision, Observation, decide, initial_state, rungs
from server.engine_types import StepStats
from server.metrics import Metrics

log = logging.getLogger(__name__)


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of ``values`` (nearest rank), or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class StatsWindow:
    """The engine's per-step :class:`StepStats`, kept for ``window_s`` seconds: what the controller
    observes. The same objects the metrics record (stats flow one way, engine → metrics and
    controller), so the controller never reads Prometheus series back by name."""

    def __init__(self, window_s: float = 20.0):
        self.window_s = window_s
        self._steps: collections.deque[tuple[float, StepStats]] = collections.deque()
        self._lock = threading.Lock()  # record() runs on the engine thread, observe() may not
        self._started: float | None = None
        self._last: StepStats | None = None

    def record(self, stats: StepStats, t: float | None = None) -> None:
        t = time.monotonic() if t is None else t
        with self._lock:
            self._steps.append((t, stats))
            self._last = stats
            if self._started is None:
                self._started = t

    def observe(self, t: float) -> Observation:
        with self._lock:
            if self._started is None:
                self._started = t
            while self._steps and t - self._steps[0][0] > self.window_s:
                self._steps.popleft()
            steps = [st for _, st in self._steps]
            last = self._last
        span = max(min(self.window_s, t - self._started), 1e-9)
        done = [e2e for st in steps for _, status, e2e in st.finished if status in ("stop", "length")]
        finished = sum(len(st.finished) for st in steps)
        tokens = sum(n for st in steps for n in st.generated.values())
        return Observation(
            t=t,
            queue_depth=float(last.queue_depth if last else 0),
            running=float(last.running if last else 0),
            arrival_rate=sum(st.arrivals for st in steps) / span,
            tokens_per_request=tokens / finished if finished else 0.0,
            tokens_per_s=tokens / span,
            p95_e2e_s=_quantile(done, 0.95), p50_e2e_s=_quantile(done, 0.5),
            p95_ttft_s=_quantile([v for st in steps for v in st.ttfts], 0.95),
            p95_queue_wait_s=_quantile([v for st in steps for v in st.queue_waits], 0.95),
        )


class ClusterSignals:
    """Queue depth summed over all replicas, from a Prometheus server, polled on a thread."""

    QUERY = "sum(mlora_queue_depth)"

    def __init__(self, url: str, interval_s: float = 2.0, stale_s: float = 15.0):
        self.url, self.interval_s, self.stale_s = url.rstrip("/"), interval_s, stale_s
        self._value: tuple[float, float] | None = None  # (monotonic time, value)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="promql", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        with httpx.Client(timeout=self.interval_s) as http:
            while not self._stop.is_set():
                try:
                    r = http.get(f"{self.url}/api/v1/query", params={"query": self.QUERY})
                    result = r.json()["data"]["result"]
                    if result:
                        self._value = (time.monotonic(), float(result[0]["value"][1]))
                except (httpx.HTTPError, KeyError, ValueError, IndexError) as e:
                    log.warning("PromQL query to %s failed: %s", self.url, e)
                self._stop.wait(self.interval_s)

    def queue_depth(self) -> float | None:
        """The cluster-wide queue depth, or None when no fresh value is known."""
        v = self._value
        return v[1] if v is not None and time.monotonic() - v[0] < self.stale_s else None


class RankController:
    """The controller's state between ticks, and its metrics."""

    def __init__(self, cfg: ControllerConfig, metrics: Metrics, throughput: dict[int, float] | None = None,
                 cluster: ClusterSignals | None = None, interval_s: float = 0.5, window_s: float = 20.0):
        self.cfg, self.metrics, self.throughput, self.cluster = cfg, metrics, throughput or {}, cluster
        self.interval_s = interval_s
        self.signals = StatsWindow(window_s)
        self.state = initial_state(cfg, time.monotonic())
        self.last: Decision | None = None
        self.last_observation: Observation | None = None
        self._next_tick = 0.0
        metrics.auto_rank.set(self.state.rank)

    @property
    def rank(self) -> int:
        return self.state.rank

    def record(self, stats: StepStats) -> None:
        """Every engine step's stats (the engine hands the same object to the metrics)."""
        self.signals.record(stats)

    def tick(self, now: float | None = None) -> None:
        """Called from the engine loop; decides at most every ``interval_s``."""
        now = time.monotonic() if now is None else now
        if now < self._next_tick:
            return
        self._next_tick = now + self.interval_s
        obs = self.signals.observe(now)
        if self.cluster is not None and (q := self.cluster.queue_depth()) is not None:
            obs = Observation(**{**obs.__dict__, "queue_depth": q})
        d = decide(obs, self.state, self.cfg, self.throughput)
        self.state, self.last, self.last_observation = d.state, d, obs
        self.metrics.decisions.labels(reason=d.reason).inc()
        if d.changed:
            self.metrics.switches.labels(direction="down" if d.changed < 0 else "up").inc()
            self.metrics.auto_rank.set(d.rank)
            log.info("auto rank → %d (%s; queue avg %.1f)", d.rank, d.reason, d.state.queue_avg)

    def describe(self) -> dict:
        obs = self.last_observation
        return {"policy": self.cfg.policy, "rank": self.rank, "ladder": list(self.cfg.ladder),
                "rungs": list(rungs(self.cfg, self.throughput)), "min_gain": self.cfg.min_gain,
                "cost_curve": {str(k): v for k, v in sorted(self.throughput.items())},
                "since_s": round(time.monotonic() - self.state.since, 1),
                "last_reason": self.last.reason if self.last else None,
                "queue_avg": round(self.state.queue_avg, 2), "busy_avg": round(self.state.busy_avg, 2),
                "observed": None if obs is None else {k: v for k, v in obs.__dict__.items() if k != "t"}}
