"""Prometheus metrics of the server (prometheus_client, text exposition format at GET /metrics).

One registry per app, so several apps (tests) never share counts. Requests are counted by route and
status code in an ASGI middleware that sees every response, the errors the routes raise included;
paths that are not routes are counted as route 'other', so a scan of random URLs cannot grow the
number of series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's counters, histograms and gauges, in a registry of their own."""

    def __init__(self, queue_depth: Callable[[], int], in_progress: Callable[[], int], model: dict[str, str]) -> None:
        reg = self.registry = CollectorRegistry()
        self.requests = Counter(
            "eva02_requests", "HTTP requests answered, by route and status code", ["route", "status"], registry=reg
        )
        self.latency = Histogram(
            "eva02_request_duration_seconds",
            "time from a request's arrival to its response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "eva02_batch_size", "images per model call, by kind", ["kind"], buckets=BATCH_BUCKETS, registry=reg
        )
        self.batch_seconds = Histogram(
            "eva02_batch_duration_seconds", "time of one model call, by kind", ["kind"],
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.heads = Counter(
            "eva02_zero_shot_heads", "zero-shot head lookups: hit (cached), miss (computed), shared (being computed)",
            ["result"], registry=reg,
        )  # fmt: skip
        Gauge("eva02_queue_depth", "images waiting for a batch", registry=reg).set_function(queue_depth)
        Gauge(
            "eva02_requests_in_progress", "requests admitted and not answered yet (bounded by --max-queue)",
            registry=reg,
        ).set_function(in_progress)  # fmt: skip
        Info("eva02_model", "the model served", registry=reg).info(model)

    def observe_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)

    def observe_head(self, result: str) -> None:
        self.heads.labels(result).inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware: counts each HTTP response by route and status code and times it."""

    def __init__(self, app, metrics: Metrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500  # what the server answers if the app fails before it starts a response

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
