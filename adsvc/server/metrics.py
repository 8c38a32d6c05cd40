"""Prometheus metrics of one server process (the `prometheus-client` package), served on
their own HTTP port (`--metrics-port`): calls by RPC and status, latency, compile time,
cache and store hits and misses, refused calls by reason, calls in flight.

Each server has its own registry (several servers can live in one process, as in the
tests); `serve_http(port)` exposes it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The server's counters, histograms and gauges (names start with `adsvc_`)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.calls = Counter("adsvc_calls", "Calls by RPC and final status",
                             ("rpc", "status"), registry=r)
        self.latency = Histogram("adsvc_call_seconds", "Call latency by RPC", ("rpc",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.compile = Histogram("adsvc_compile_seconds", "Time to differentiate and plan "
                                 "a graph (cache misses only)", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.cache = Counter("adsvc_cache", "Local compiled-graph cache lookups", ("result",),
                             registry=r)
        self.store = Counter("adsvc_store", "Shared store lookups and failures", ("result",),
                             registry=r)
        self.refused = Counter("adsvc_refused", "Calls refused with RESOURCE_EXHAUSTED, by "
                               "the part of the request (or 'busy')", ("reason",), registry=r)
        self.in_flight = Gauge("adsvc_calls_in_flight", "Calls being handled", registry=r)
        self._children: dict[tuple, object] = {}  # (id of the metric, labels) -> its child

    def of(self, metric, *labels):
        """`metric.labels(*labels)`, looked up once per label values (prometheus_client
        checks and hashes them on every call: ~5 us, a few per tiny call)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def serve_http(self, port: int, host: str = "0.0.0.0"):
        """Serve /metrics on `port` (0: a free one) in a daemon thread; returns the
        (server, thread) pair of prometheus_client."""
        return start_http_server(port, addr=host, registry=self.registry)

    def text(self) -> str:
        """The metrics in the Prometheus text format (what /metrics answers)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
