"""Limits and settings of a server; every one is configurable (flags of `adsvc serve`)."""

from __future__ import annotations

from dataclasses import dataclass

from adsvc.runtime.cost import memory_fraction

MIB = 1024 * 1024
HEADROOM_THREADS = 4  # pool threads beyond the adsvc slots: health, reflection, server info




@dataclass(frozen=True)
class ServerConfig:
    """What a server enforces and how it runs. 0 disables a numeric limit.

    Concurrency: at most `max_concurrent_rpcs` adsvc calls (GetServerInfo excepted) run
    at once; a call beyond that answers RESOURCE_EXHAUSTED at once instead of queuing.
    The thread pool has `max(threads, max_concurrent_rpcs)` threads plus a few spare
    ones (HEADROOM_THREADS) so health checks, reflection and GetServerInfo always find
    a thread even when every adsvc slot is taken. An EvaluateStream call that waits
    longer than `stream_idle_seconds` for its next message is cancelled, freeing its
    thread and slot. Compiled graphs are cached up to `cache_entries` entries *and*
    `max_cache_nodes` compiled nodes in total (least recently used evicted first).
    """

    max_message_bytes: int = 64 * MIB  # request and response size (set on the gRPC server)
    max_nodes: int = 1_000_000  # inputs + nodes of a received graph
    max_compiled_nodes: int = 4_000_000  # inputs + nodes of a differentiated graph
    max_tensor_elements: int = 16_000_000  # any constant, feed or intermediate result
    max_order: int = 4  # differentiation passes per request
    max_stream_feeds: int = 1_000_000  # feeds in one EvaluateStream call
    cache_entries: int = 256  # compiled graphs kept (LRU)
    threads: int = 8  # worker threads of the (synchronous) gRPC server per process
    max_concurrent_rpcs: int = 8  # adsvc calls in progress at once; more: RESOURCE_EXHAUSTED
    stream_idle_seconds: float = 60.0  # a stream idle this long (no message): cancelled
    max_cache_nodes: int = 2_000_000  # compiled nodes held in total (~0.8 KB each)
    grace_seconds: float = 10.0  # SIGTERM: how long in-flight calls may take to finish
    drain_seconds: float = 0.0  # SIGTERM: report NOT_SERVING this long before stopping
    token: str | None = None  # bearer token required on every call except health/reflection
    # the peak bytes of live values one evaluation may plan for (refused before it runs)
    # (1/16 of RAM: with the default 8 slots, all evaluations at once stay within half)
    max_eval_bytes: int = memory_fraction(1 / 16)
    max_cache_bytes: int = 1024 * MIB  # compiled graphs + plans + constants held in the cache
    max_name_bytes: int = 1024  # input/output names and node labels (UTF-8 bytes)
    tls_cert: str | None = None  # PEM server certificate chain (with tls_key: TLS on)
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a cert it signed
    store: str | None = None  # redis://host:port/db: compiled graphs shared by replicas
    store_ttl_seconds: int = 86_400  # how long a stored compiled graph lives in the store
    store_max_bytes: int = 64 * MIB  # larger compiled graphs are not stored
    store_secret: bytes | None = None  # signs stored entries (HMAC); the same on every replica
    metrics_port: int | None = None  # Prometheus /metrics on this HTTP port (None: off)

    @property
    def pool_threads(self) -> int:
        """Size of the gRPC thread pool: the adsvc slots (or `threads`, if more) plus
        HEADROOM_THREADS for health checks, reflection and GetServerInfo."""
        return max(self.threads, self.max_concurrent_rpcs) + HEADROOM_THREADS

    def limit(self, value: int) -> int | None:
        """A limit as used by the compiler: None when disabled (0)."""
        return value or None
