"""A shared compiled-graph store, so replicas behind a load balancer serve each other's
handles: `handle -> (differentiated graph, compile spec)` kept in Redis.

A replica that compiles a graph writes it here before it answers (so a client may send
the very next call, by handle, to any replica), waiting for the write at most a couple
of seconds; a replica that misses a handle in its own cache loads it from here — decoded and
validated under the server's limits like any client graph (the store is not trusted
more than a client) — and plans it, instead of answering NOT_FOUND. Redis bounds the
store (entries expire after a TTL; eviction follows Redis's `maxmemory-policy`);
values over `max_bytes` are neither stored nor read. With a shared secret
(`--store-secret-file`, the same on every replica) each value is signed with an
HMAC-SHA256 over its handle and bytes, and a value whose signature does not match is
ignored — so whoever can write to Redis cannot change what a handle computes; without
one, Redis must be as trusted as the servers (the server says so at startup). When
Redis cannot be reached the server keeps serving from its local cache, logs it, and
skips the store for a few seconds (never a crash, never a stalled call beyond the short
socket timeout).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from adsvc_protocol.proto import service_pb2

log = logging.getLogger("adsvc.server.store")
PREFIX = "adsvc:v1:graph:"
SIG = 32  # bytes of the HMAC-SHA256 signature before a stored value (with a secret)


class RedisStore:
    """The store on a Redis server at `url` (redis://host:port/db)."""

    def __init__(self, url: str, ttl_seconds: int = 86_400, max_bytes: int = 64 << 20,
                 timeout: float = 0.5, backoff_seconds: float = 5.0,
                 secret: bytes | None = None):
        import redis  # a dependency of the server; imported here so clients never need it

        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ValueError(f"--store: expected redis://host:port/db, got {url!r}")
        self.url, self.ttl, self.max_bytes = url, ttl_seconds, max_bytes
        self._secret = secret  # entries are signed with it (HMAC) and checked on load
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout)
        self._errors = (redis.RedisError, OSError)
        self._backoff, self._down_until = backoff_seconds, 0.0
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adsvc-store")
        self.hits = self.misses = self.failures = self.writes = 0
        self.on_event: Callable[[str], None] = lambda event: None  # metrics hook

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, err: Exception) -> None:
        with self._lock:
            self.failures += 1
            self._down_until = time.monotonic() + self._backoff
        self.on_event("failure")
        log.warning("store %s failed (%s: %s); serving from the local cache, store skipped "
                    "for %.0fs", what, type(err).__name__, err, self._backoff)

    def get(self, handle: str) -> service_pb2.DifferentiateRequest | None:
        """The stored (differentiated graph, spec) of `handle`, or None (missing, not
        parseable, or the store unavailable)."""
        if not self._available():
            return None
        try:  # at most max_bytes (+ the signature, + 1 to see a longer value)
            data = self._redis.getrange(PREFIX + handle, 0, self.max_bytes + SIG)
        except self._errors as e:
            self._failed("read", e)
            return None
        if not data:
            self.misses += 1
            self.on_event("miss")
            return None
        data = self._verified(handle, data)
        if data is None:
            self.misses += 1
            self.on_event("refused")
            return None
        stored = service_pb2.DifferentiateRequest()
        try:
            stored.ParseFromString(data)
        except Exception:  # garbage in the store: treated as a miss
            log.warning("store entry %s... is not a DifferentiateRequest; ignored", handle[:16])
            self.misses += 1
            return None
        self.hits += 1
        self.on_event("hit")
        return stored

    def put(self, handle: str, make: Callable[[], service_pb2.DifferentiateRequest],
            wait: float = 2.0) -> None:
        """Write `make()` (a value over max_bytes is not stored), waiting for it at most
        `wait` seconds; the write finishes in the background if it takes longer."""
        if not self._available():
            return
        done = self._writer.submit(self._write, handle, make)
        try:
            done.result(timeout=wait)
        except TimeoutError:
            log.warning("store write of %s... still running after %.1fs; answering now",
                        handle[:16], wait)

    def _write(self, handle: str, make) -> None:
        try:
            data = make().SerializeToString()
            if len(data) > self.max_bytes:
                return
            self._redis.set(PREFIX + handle, self._signed(handle, data), ex=self.ttl)
            self.writes += 1
        except self._errors as e:
            self._failed("write", e)
        except Exception:  # a bug must not take the writer thread down
            log.exception("store write of %s... failed", handle[:16])

    def _signed(self, handle: str, data: bytes) -> bytes:
        if self._secret is None:
            return data
        return hmac.new(self._secret, handle.encode() + b"\0" + data, "sha256").digest() + data

    def _verified(self, handle: str, data: bytes) -> bytes | None:
        """The payload of a stored value, or None: too long, or (with a secret) its
        signature does not match this handle and payload."""
        if self._secret is None:
            return data if len(data) <= self.max_bytes else None
        sig, payload = data[:SIG], data[SIG:]
        if len(payload) > self.max_bytes:
            return None
        want = hmac.new(self._secret, handle.encode() + b"\0" + payload, "sha256").digest()
        if not hmac.compare_digest(sig, want):
            log.warning("store entry %s... has a bad signature; ignored", handle[:16])
            return None
        return payload

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the writes submitted so far are done (tests, shutdown)."""
        self._writer.submit(lambda: None).result(timeout=timeout)

    def close(self) -> None:
        """Finish pending writes and close the connection."""
        self._writer.shutdown(wait=True, cancel_futures=False)
        self._redis.close()
