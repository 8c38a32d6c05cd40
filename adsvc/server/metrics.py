"""Prometheus metrics of one server process (the `prometheus-client` package), served on
their own HTTP port (`--metrics-port`): calls by RPC and status, latency, compile time,
cache and store hits and misses, refused calls by reason, calls in flight.

Each server has its own registry (several servers can live in one process, as in the
tests); `serve_http(port)` exposes it.
"""

from __future__ import annotations

import bisect
import itertools
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)


class CallMetrics:
    """The metrics counted on every call — `adsvc_calls` (a counter by RPC and final
    status), `adsvc_call_seconds` (a histogram by RPC) and `adsvc_cache` (local cache
    lookups by result) — counted by `ended` and `looked_up` and read by the registry at
    scrape time (a custom collector): prometheus_client's Counter and Histogram cost a
    lock and a Python loop over the buckets each, several µs on every call."""

    def __init__(self):
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], int] = {}
        self._seconds: dict[str, list] = {}  # rpc -> [count per bucket..., +Inf, sum]
        self._lookups: dict[str, int] = {}  # "hit" / "miss" -> count

    def looked_up(self, result: str) -> None:
        """Count a local cache lookup ("hit" or "miss")."""
        with self._lock:
            self._lookups[result] = self._lookups.get(result, 0) + 1

    def ended(self, rpc: str, status: str, seconds: float, lookup: str = "") -> None:
        """Count a call that ended with `status` after `seconds` (and a cache lookup it
        made, "hit" or "miss", not counted yet)."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # (the first bound >= it)
        with self._lock:
            if lookup:
                self._lookups[lookup] = self._lookups.get(lookup, 0) + 1
            key = (rpc, status)
            self._calls[key] = self._calls.get(key, 0) + 1
            h = self._seconds.get(rpc)
            if h is None:
                h = self._seconds[rpc] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
            h[bucket] += 1
            h[-1] += seconds

    def collect(self):
        """The two metric families, as Counter and Histogram would write them."""
        with self._lock:
            calls, lookups = dict(self._calls), dict(self._lookups)
            hists = {rpc: list(h) for rpc, h in self._seconds.items()}
        cache = CounterMetricFamily("adsvc_cache", "Local compiled-graph cache lookups",
                                    labels=("result",))
        for result, n in lookups.items():
            cache.add_metric((result,), n)
        counter = CounterMetricFamily("adsvc_calls", "Calls by RPC and final status",
                                      labels=("rpc", "status"))
        for labels, n in calls.items():
            counter.add_metric(labels, n)
        hist = HistogramMetricFamily("adsvc_call_seconds", "Call latency by RPC",
                                     labels=("rpc",))
        for rpc, h in hists.items():
            cumulative = list(itertools.accumulate(h[:-1]))
            bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
            hist.add_metric((rpc,), list(zip(bounds, cumulative)), h[-1])
        return [counter, hist, cache]


class Metrics:
    """The server's counters, histograms and gauges (names start with `adsvc_`)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.calls = CallMetrics()  # adsvc_calls and adsvc_call_seconds
        r.register(self.calls)
        self.compile = Histogram("adsvc_compile_seconds", "Time to differentiate and plan "
                                 "a graph (cache misses only)", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.store = Counter("adsvc_store", "Shared store lookups and failures", ("result",),
                             registry=r)
        self.refused = Counter("adsvc_refused", "Calls refused with RESOURCE_EXHAUSTED, by "
                               "the part of the request (or 'busy')", ("reason",), registry=r)
        self.in_flight = Gauge("adsvc_calls_in_flight", "Calls being handled", registry=r)

    def serve_http(self, port: int, host: str = "0.0.0.0"):
        """Serve /metrics on `port` (0: a free one) in a daemon thread; returns the
        (server, thread) pair of prometheus_client."""
        return start_http_server(port, addr=host, registry=self.registry)

    def text(self) -> str:
        """The metrics in the Prometheus text format (what /metrics answers)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
