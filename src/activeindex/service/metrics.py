"""Prometheus metrics of the service: requests by route and status, latency histograms per route and
per stage (upload read, queue, decode, model, search, add, activate, remove, thumbnail), the batch
sizes the model sees and the collection's size.

Each app has its own registry (not prometheus_client's global one), so that several apps can live in
one process (tests) and ``/metrics`` shows only this service's series. Routes are labelled by their
template (``/api/images/{image_id}``), never by the raw path, so a scan of random URLs cannot blow
up the number of series.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds: from a fraction of a millisecond (search) to tens of seconds (activation of a large image).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "activeindex_http_requests", "HTTP requests by route template, method and status code",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "activeindex_http_request_seconds", "HTTP request latency by route template and method",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.stage = Histogram(
            "activeindex_stage_seconds", "Time spent per processing stage",
            ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "activeindex_extract_batch_size", "Images per model call of the query batcher",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry,
        )
        self.rejected = Counter(
            "activeindex_uploads_rejected", "Uploads refused, by HTTP status", ["status"], registry=self.registry,
        )
        self.images = Gauge("activeindex_images", "Images indexed in the collection", registry=self.registry)

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage.labels(stage).observe(time.perf_counter() - t0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request and times it, labelled by the route that served it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or _static_label(scope.get("path", ""))
            method = scope.get("method", "")
            self.metrics.requests.labels(label, method, str(status)).inc()
            self.metrics.latency.labels(label, method).observe(time.perf_counter() - t0)


def _static_label(path: str) -> str:
    """Mounted static files carry no route in the scope: one label for all of them."""
    return "/static" if path.startswith(("/static/", "/docs-static/")) else "unmatched"
