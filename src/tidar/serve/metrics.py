"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus-client).

Each app has its own CollectorRegistry (not the library's global one), so several apps in one
process (tests, embedding) keep separate counts. The metrics hold aggregates only: no prompt, no
output, no API key, nothing learned; so /metrics needs no key (scrapers usually have none), like
/health. Tokens per forward is the ratio of two counters:
rate(tidar_generated_tokens_total) / rate(tidar_forwards_total).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidar.decode import GenerationStats
from tidar.serve.worker import Observer, Worker

# Paths get their own label; anything else (404s, probes) is "other", so a scanner cannot grow the
# number of series without bound.
ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics(Observer):
    """The registry and every metric; the worker reports to it through the Observer hooks."""

    def __init__(self, worker: Worker) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tidar_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("tidar_request_duration_seconds", "arrival to the last byte of the response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tidar_time_to_first_token_seconds", "arrival (queueing included) to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter("tidar_generated_tokens", "tokens generated (kept in answers)", registry=r)
        self.forwards = Counter("tidar_forwards", "model forwards run, prefills included", registry=r)
        self.tokens_per_forward = Histogram(
            "tidar_tokens_per_forward", "the engine's tokens per decoding forward, one sample per request",
            buckets=(1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 6, 8, 16), registry=r)
        self.cancelled = Counter("tidar_cancelled_requests", "generations stopped before their end, by reason",
                                 ["reason"], registry=r)
        Gauge("tidar_queue_depth", "requests waiting for the worker", registry=r).set_function(lambda: worker.depth)
        Gauge("tidar_queue_capacity", "most requests allowed to wait (--max-queue)",
              registry=r).set_function(lambda: worker.max_queue)
        self.batch = Gauge("tidar_running_batch_size", "sequences decoding now", registry=r)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- Observer (the worker thread; prometheus-client's metrics are thread-safe) -----------------
    def on_batch(self, sequences: int) -> None:
        self.batch.set(sequences)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_step(self, tokens: int) -> None:
        self.forwards.inc()
        self.tokens.inc(tokens)

    def on_finished(self, stats: GenerationStats) -> None:
        if stats.sequence_steps:
            self.tokens_per_forward.observe(stats.tokens_per_forward)

    def on_cancelled(self, reason: str) -> None:
        self.cancelled.labels(reason).inc()


class RequestMetrics:
    """ASGI middleware, outermost: counts every response by endpoint and status (401, 413 and 429
    included, which never reach a route) and times it to its last byte (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500  # what a client gets when the app fails before answering
        t0 = time.perf_counter()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
