"""Prometheus metrics of the gateway (its own registry, so tests can run several apps in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("cocoon_calls_total", "Calls by function and outcome", ["function", "status"],
                             registry=self.registry)
        self.latency = Histogram("cocoon_call_duration_seconds", "End-to-end call latency at the gateway",
                                 ["function"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.inflight = Gauge("cocoon_inflight_calls", "Calls in flight", ["function"], registry=self.registry)
        self.replicas = Gauge("cocoon_replicas", "Ready replicas", ["function"], registry=self.registry)
        self.stream_buffered = Gauge("cocoon_stream_buffered_bytes", "Bytes of streamed items held for clients "
                                     "that have not taken them yet (each stream: at most COCOON_STREAM_WINDOW_BYTES "
                                     "plus one item)", registry=self.registry)
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe(self, function: str, status: str, seconds: float) -> None:
        """Count one call; the labelled children are cached (labels() per call is measurable on the hot path)."""
        key = (function, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (self.calls.labels(function, status), self.latency.labels(function))
        child[0].inc()
        child[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
