"""Prometheus metrics, recorded in one place from each engine step's :class:`StepStats`.

Names are ``mlora_<what>_<unit>``; labels are few (rank, status); buckets are explicit.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from server.engine_types import StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
disable_created_metrics()  # no *_created series: they double the output and nobody graphs them


# Every series name, defined once: the metrics below, the controller's and the tests' reads,
# and tests/test_deploy.py (which checks that the dashboards use only these) all take them
# from here. A counter's samples end in _total, a histogram's in _bucket / _sum / _count.
REQUESTS = "mlora_requests"
QUEUE_DEPTH = "mlora_queue_depth"
RUNNING_REQUESTS = "mlora_running_requests"
QUEUE_WAIT_SECONDS = "mlora_queue_wait_seconds"
TIME_TO_FIRST_TOKEN_SECONDS = "mlora_time_to_first_token_seconds"
INTER_TOKEN_LATENCY_SECONDS = "mlora_inter_token_latency_seconds"
GENERATED_TOKENS = "mlora_generated_tokens"
PROMPT_TOKENS = "mlora_prompt_tokens"
BATCH_SIZE = "mlora_batch_size"
MODEL = "mlora_model"
REQUESTS_RECEIVED = "mlora_requests_received"
CURRENT_AUTO_RANK = "mlora_current_auto_rank"
RANK_SWITCHES = "mlora_rank_switches"
CONTROLLER_DECISIONS = "mlora_controller_decisions"
MERGED_RANK = "mlora_merged_rank"
MERGE_SWITCHES = "mlora_merge_switches"
MERGE_SECONDS = "mlora_merge_seconds"
ENGINE_STALLS = "mlora_engine_stalls"
ENGINE_RETRIED_APART = "mlora_engine_retried_apart"
ENGINE_HEALTHY = "mlora_engine_healthy"
FORWARD_SECONDS = "mlora_forward_seconds"
FORWARD_PHASES = ("decode", "mixed", "prefill", "piece")
REQUESTS_TOTAL = REQUESTS + "_total"
GENERATED_TOKENS_TOTAL = GENERATED_TOKENS + "_total"
PROMPT_TOKENS_TOTAL = PROMPT_TOKENS + "_total"
REQUESTS_RECEIVED_TOTAL = REQUESTS_RECEIVED + "_total"
RANK_SWITCHES_TOTAL = RANK_SWITCHES + "_total"
CONTROLLER_DECISIONS_TOTAL = CONTROLLER_DECISIONS + "_total"
MERGE_SWITCHES_TOTAL = MERGE_SWITCHES + "_total"
ENGINE_STALLS_TOTAL = ENGINE_STALLS + "_total"
ENGINE_RETRIED_APART_TOTAL = ENGINE_RETRIED_APART + "_total"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(REQUESTS, "Finished requests by served rank and outcome "
                                "(stop, length, timeout, abort, error; rank 'none' if never started).",
                                ["rank", "status"], registry=r)
        self.queue_depth = Gauge(QUEUE_DEPTH, "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge(RUNNING_REQUESTS, "Requests in the running batch.", registry=r)
        self.queue_wait = Histogram(QUEUE_WAIT_SECONDS, "Arrival to admission into the batch.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(TIME_TO_FIRST_TOKEN_SECONDS, "Arrival to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(INTER_TOKEN_LATENCY_SECONDS, "Time between a request's tokens.",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mlora_e2e_request_latency_seconds", "Arrival to the final token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter(GENERATED_TOKENS, "Generated tokens by rank.", ["rank"], registry=r)
        self.prompt_tokens = Counter(PROMPT_TOKENS, "Prompt tokens prefilled.", registry=r)
        self.forward_s = Histogram(FORWARD_SECONDS, "Seconds of one engine step's model forward, by phase: decode, "
                                   "mixed (decode + a prompt piece), prefill (whole prompts), piece (a piece alone).",
                                   ["phase"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        for phase in FORWARD_PHASES:  # every series present from the start (0 until it happens)
            self.forward_s.labels(phase=phase)
        self.batch_size = Histogram(BATCH_SIZE, "Rows per engine step.", buckets=BATCH_BUCKETS, registry=r)
        self.info = Info(MODEL, "Served base model, adapter and ranks.", registry=r)
        self.received = Counter(REQUESTS_RECEIVED, "Requests accepted into the queue.", registry=r)
        self.auto_rank = Gauge(CURRENT_AUTO_RANK, "Rank the controller gives 'auto' requests now.",
                               registry=r)
        self.switches = Counter(RANK_SWITCHES, "Controller rank changes.", ["direction"], registry=r)
        self.decisions = Counter(CONTROLLER_DECISIONS, "Controller decisions by reason.", ["reason"],
                                 registry=r)
        self.merged_rank = Gauge(MERGED_RANK, "Rank folded into the weights (-1: none; 0: plain base).",
                                 registry=r)
        self.merged_rank.set(-1)
        self.merges = Counter(MERGE_SWITCHES, "Re-merges at another rank (--merge-rank auto).", registry=r)
        self.merge_seconds = Histogram(MERGE_SECONDS, "Time one re-merge took.", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.stalls = Counter(ENGINE_STALLS, "Engine steps that ran past --step-timeout-s (reported "
                              "once each, while they run).", registry=r)
        self.retried_apart = Counter(ENGINE_RETRIED_APART, "Batched forwards that raised and were "
                                     "retried one row at a time (the failing rows fail alone).", registry=r)
        self.healthy = Gauge(ENGINE_HEALTHY, "1 while the engine can serve; 0 once it stopped or "
                             "while a step is stuck (then /health is 503).", registry=r)
        for d in ("up", "down"):
            self.switches.labels(direction=d)

    def watch(self, engine) -> None:
        """Read the engine's health at each scrape (it changes between steps, or without one)."""
        self.healthy.set_function(lambda: float(engine.health() is None))

    def record_stall(self, age_s: float) -> None:
        self.stalls.inc()

    def set_info(self, model: str, adapter: str, ranks: list[int], scaling: str, method: str) -> None:
        self.info.info({"model": model, "adapter": adapter, "ranks": ",".join(map(str, ranks)),
                        "scaling": scaling, "method": method})

    def record(self, s: StepStats) -> None:
        self.queue_depth.set(s.queue_depth)
        if s.arrivals:
            self.received.inc(s.arrivals)
        self.running.set(s.running)
        if s.batch_size:
            self.batch_size.observe(s.batch_size)
        for phase, seconds in s.forward_s.items():
            self.forward_s.labels(phase=phase).observe(seconds)
        for v in s.queue_waits:
            self.queue_wait.observe(v)
        for v in s.ttfts:
            self.ttft.observe(v)
        for v in s.inter_token:
            self.itl.observe(v)
        for rank, n in s.generated.items():
            self.generated.labels(rank=str(rank)).inc(n)
        if s.prefill_tokens:
            self.prompt_tokens.inc(s.prefill_tokens)
        if s.retried_apart:
            self.retried_apart.inc(s.retried_apart)
        if s.merged is not None:
            self.merged_rank.set(s.merged[0])
            self.merges.inc()
            self.merge_seconds.observe(s.merged[1])
        for rank, status, e2e in s.finished:
            self.requests.labels(rank="none" if rank is None else str(rank), status=status).inc()
            if status in ("stop", "length"):
                self.e2e.observe(e2e)
