"""Prometheus metrics on a registry of their own (one per runtime, so tests never share counters)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.captions = Counter(
            "blip2_captions_total",
            "Images finished, by source and status",
            ["source", "status"],
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "blip2_cache_hits_total", "Requests answered from the store", ["source"], registry=self.registry
        )
        self.batch_size = Histogram(
            "blip2_batch_size",
            "Images per generate batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "blip2_batch_seconds",
            "Wall time of one batch on the inference thread",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "blip2_request_seconds",
            "Submit-to-result time of one image",
            ["source"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "blip2_stage_seconds",
            "Time one image spends in each pipeline stage (decode, lookup, preprocess, wait, infer, "
            "thumbnail, emoji, store): where a request's time goes outside the model",
            ["stage"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.pending = Gauge("blip2_pending", "Images accepted and not yet finished", registry=self.registry)
        # Gateway mode: the capacity signal. Timeouts and MAX_PENDING refusals rising while workers
        # are up say the workers are too few; no_worker / no_broker say something is down.
        self.gateway_requests = Counter(
            "blip2_gateway_requests_total",
            "Gateway requests by how they ended: answered, timeout (GATEWAY_TIMEOUT), unreadable (502), "
            "too_large (413), shutdown, refused_no_broker, refused_no_worker, refused_overloaded (MAX_PENDING)",
            ["outcome"],
            registry=self.registry,
        )
        self.gateway_seconds = Histogram(
            "blip2_gateway_seconds",
            "Gateway: from a request's send to its worker's reply",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.http_requests = Counter(
            "blip2_http_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.http_refused = Counter(
            "blip2_http_connections_refused_total",
            "New HTTP connections answered 503 and closed: MAX_CONNECTIONS were open",
            registry=self.registry,
        )
        self.queue_messages = Counter(
            "blip2_queue_messages_total", "Queue messages by outcome", ["outcome"], registry=self.registry
        )
        self.watch_files = Counter(
            "blip2_watch_files_total", "Watched files by outcome", ["outcome"], registry=self.registry
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block as one image's share of a pipeline stage."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
