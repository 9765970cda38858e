"""Prometheus metrics on a registry of their own (one per runtime, so tests never share counters)."""

from __future__ import annotations

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
        self.pending = Gauge("blip2_pending", "Images accepted and not yet finished", registry=self.registry)
        self.http_requests = Counter(
            "blip2_http_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
