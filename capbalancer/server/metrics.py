"""The proxy's own Prometheus metrics, in their own registry (never the process-global one).

Label children are bound once per (model, backend, status) and cached, so a request costs a few dict
lookups and increments, not a label resolution per metric. The two gauges that move on every request (requests in
flight per backend, requests held) are read when scraped (`set_function`) from a plain count, not set per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class InflightCount:
    """Requests in flight on one backend, counted by the relay: a plain attribute (a Gauge's inc and dec took a lock
    and a check each, twice per request); the backend's gauge reads it when scraped."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def read(self) -> float:
        return float(self.n)


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("capbalancer_requests_total", "Requests answered, by model, backend and status",
                                ("model", "backend", "status"), registry=r)
        self.inflight = Gauge("capbalancer_backend_inflight_requests", "Requests in flight on a backend",
                              ("backend",), registry=r)
        self.held = Gauge("capbalancer_held_requests", "Requests held in the proxy's queue", registry=r)
        self.hold_wait = Histogram("capbalancer_hold_wait_seconds", "Time a request spent held",
                                   buckets=_LATENCY_BUCKETS_S, registry=r)
        self.ttfb = Histogram("capbalancer_time_to_first_byte_seconds",
                              "Request arrival to the first response byte from the backend", ("backend",),
                              buckets=_LATENCY_BUCKETS_S, registry=r)
        self.latency = Histogram("capbalancer_request_duration_seconds", "Request arrival to the last byte",
                                 ("model",), buckets=_LATENCY_BUCKETS_S, registry=r)
        self.health = Gauge("capbalancer_backend_up", "1 if the backend is routable by health, else 0",
                            ("backend",), registry=r)
        self.retries = Counter("capbalancer_retries_total", "Attempts retried on another backend",
                               ("backend", "reason"), registry=r)
        self._requests_children: dict[tuple[str, str, int], Counter] = {}
        self._inflight_counts: dict[str, InflightCount] = {}
        self._ttfb_children: dict[str, Histogram] = {}
        self._latency_children: dict[str, Histogram] = {}

    def count(self, model: str, backend: str, status: int) -> None:
        key = (model, backend, status)
        child = self._requests_children.get(key)
        if child is None:
            child = self._requests_children[key] = self.requests.labels(model, backend, str(status))
        child.inc()

    def inflight_for(self, backend: str) -> InflightCount:
        count = self._inflight_counts.get(backend)
        if count is None:
            count = self._inflight_counts[backend] = InflightCount()
            self.inflight.labels(backend).set_function(count.read)
        return count

    def observe_ttfb(self, backend: str, seconds: float) -> None:
        child = self._ttfb_children.get(backend)
        if child is None:
            child = self._ttfb_children[backend] = self.ttfb.labels(backend)
        child.observe(seconds)

    def observe_latency(self, model: str, seconds: float) -> None:
        child = self._latency_children.get(model)
        if child is None:
            child = self._latency_children[model] = self.latency.labels(model)
        child.observe(seconds)

    def set_health(self, backend: str, up: bool) -> None:
        self.health.labels(backend).set(1.0 if up else 0.0)

    def forget_backend(self, backend: str) -> None:
        for metric in (self.inflight, self.health, self.ttfb):
            try:
                metric.remove(backend)
            except KeyError:
                pass
        self._inflight_counts.pop(backend, None)
        self._ttfb_children.pop(backend, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
