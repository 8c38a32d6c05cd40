"""Limits and settings of a server; every one is configurable (flags of `adsvc serve`)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """What a server enforces and how it runs. 0 disables a numeric limit."""

    max_message_bytes: int = 64 * MIB  # request and response size (set on the gRPC server)
    max_nodes: int = 1_000_000  # inputs + nodes of a received graph
    max_compiled_nodes: int = 4_000_000  # inputs + nodes of a differentiated graph
    max_tensor_elements: int = 16_000_000  # any constant, feed or intermediate result
    max_order: int = 4  # differentiation passes per request
    max_stream_feeds: int = 1_000_000  # feeds in one EvaluateStream call
    cache_entries: int = 256  # compiled graphs kept (LRU)
    threads: int = 8  # worker threads of the (synchronous) gRPC server per process
    grace_seconds: float = 10.0  # SIGTERM: how long in-flight calls may take to finish
    drain_seconds: float = 0.0  # SIGTERM: report NOT_SERVING this long before stopping
    token: str | None = None  # bearer token required on every call except health/reflection

    def limit(self, value: int) -> int | None:
        """A limit as used by the compiler: None when disabled (0)."""
        return value or None
