"""Drives the pure controller (:mod:`server.controller`) from the server's own metrics.

* :class:`LocalSignals` reads the in-process Prometheus registry (the numbers ``/metrics``
  shows) and turns counters and histogram buckets into an :class:`Observation` over a sliding
  window: arrival rate, tokens per request, p50/p95 latencies.
* :class:`ClusterSignals` optionally asks a Prometheus server (PromQL over HTTP, on its own
  thread) for the queue depth summed over all replicas, so that replicas downshift together.
* :class:`RankController` ticks the decision function from the engine loop, records the
  decision metrics, and answers "what rank does an ``auto`` request get now?".

The throughput table it acts on is measured by :mod:`server.calibration`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import httpx
from prometheus_client import CollectorRegistry

from server.controller import ControllerConfig, Decision, Observation, decide, initial_state, rungs
from server.metrics import LATENCY_BUCKETS, Metrics

log = logging.getLogger(__name__)


def _quantile(bucket_deltas: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile q, from (le, cumulative count) pairs."""
    total = bucket_deltas[-1][1] if bucket_deltas else 0
    if total <= 0:
        return None
    for le, count in bucket_deltas:
        if count >= q * total:
            return le
    return bucket_deltas[-1][0]


class LocalSignals:
    """Observations from this server's registry, windowed over ``window_s`` seconds."""

    HISTOGRAMS = {"e2e": "mlora_e2e_request_latency_seconds", "ttft": "mlora_time_to_first_token_seconds",
                  "queue_wait": "mlora_queue_wait_seconds"}

    def __init__(self, registry: CollectorRegistry, window_s: float = 20.0):
        self.registry, self.window_s = registry, window_s
        self._snaps: collections.deque[tuple[float, dict]] = collections.deque()

    def _value(self, name: str, labels: dict | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def _sum(self, name: str) -> float:
        return sum(s.value for m in self.registry.collect() for s in m.samples if s.name == name)

    def _snapshot(self) -> dict:
        snap = {"arrivals": self._value("mlora_requests_received_total"),
                "finished": self._sum("mlora_requests_total"),
                "tokens": self._sum("mlora_generated_tokens_total")}
        for key, name in self.HISTOGRAMS.items():
            les = [*LATENCY_BUCKETS, float("inf")]
            snap[key] = [(le, self._value(f"{name}_bucket", {"le": _le(le)})) for le in les]
        return snap

    def observe(self, t: float) -> Observation:
        snap = self._snapshot()
        self._snaps.append((t, snap))
        while len(self._snaps) > 2 and t - self._snaps[1][0] >= self.window_s:
            self._snaps.popleft()
        t0, old = self._snaps[0]
        dt = max(t - t0, 1e-9)
        finished = snap["finished"] - old["finished"]
        deltas = {k: [(le, c - oc) for (le, c), (_, oc) in zip(snap[k], old[k])] for k in self.HISTOGRAMS}
        return Observation(
            t=t,
            queue_depth=self._value("mlora_queue_depth"),
            running=self._value("mlora_running_requests"),
            arrival_rate=(snap["arrivals"] - old["arrivals"]) / dt if t > t0 else 0.0,
            tokens_per_request=(snap["tokens"] - old["tokens"]) / finished if finished > 0 else 0.0,
            tokens_per_s=(snap["tokens"] - old["tokens"]) / dt if t > t0 else 0.0,
            p95_e2e_s=_quantile(deltas["e2e"], 0.95), p50_e2e_s=_quantile(deltas["e2e"], 0.5),
            p95_ttft_s=_quantile(deltas["ttft"], 0.95), p95_queue_wait_s=_quantile(deltas["queue_wait"], 0.95),
        )


def _le(v: float) -> str:
    return "+Inf" if v == float("inf") else repr(float(v))


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
        self.signals = LocalSignals(metrics.registry, window_s)
        self.state = initial_state(cfg, time.monotonic())
        self.last: Decision | None = None
        self.last_observation: Observation | None = None
        self._next_tick = 0.0
        metrics.auto_rank.set(self.state.rank)

    @property
    def rank(self) -> int:
        return self.state.rank

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
