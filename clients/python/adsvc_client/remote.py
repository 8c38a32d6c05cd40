"""The remote client: the interface of `adsvc.local()`, computed by an adsvc server.

Graphs are compiled once per (graph, modes, wrt, seed) with Differentiate and then
named by their content-hash handle; if the server does not hold a handle (restart,
eviction, another replica behind a load balancer) the graph is re-sent transparently.
Error statuses come back as the same typed exceptions the local client raises. Feeds
are checked and converted against the compiled graph's inputs before they are sent (the
rule the server applies). Graphs are of the type the client's `GraphCodec` speaks:
`adsvc.v1.Graph` protos by default; `adsvc.connect` passes adsvc's codec, so traced
graphs go in and `differentiate` returns an `adsvc.Graph`.

UNAVAILABLE (no server listening yet, a restart, a worker that died) is retried by the
SDK with jittered exponential backoff for up to `retry_seconds` (default 15 s), never
beyond the call's own timeout: every adsvc RPC is a pure function of its request
(`idempotency_level = NO_SIDE_EFFECTS` in service.proto), so a retry cannot do anything
twice. No other status is retried, and an EvaluateStream call only while it has not
received a response. gRPC's own retry policy (at most 5 attempts, about 0.6 s) is not
used. `tls=` / `credentials=` make a TLS channel (`adsvc_client.tls`).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf import descriptor_pb2

from adsvc_client.status import error_from_rpc
from adsvc_client.tls import TLS, channel_security
from adsvc_protocol import errors as E
from adsvc_protocol import sparse
from adsvc_protocol.client import ClientBase, Compiled
from adsvc_protocol.feeds import check_feeds
from adsvc_protocol.graphs import PROTOS, GraphCodec
from adsvc_protocol.lru import LRUCache
from adsvc_protocol.modes import TO_ENUM
from adsvc_protocol.proto import ir_pb2, service_pb2, service_pb2_grpc
from adsvc_protocol.scalar_wire import ScalarCall, all_scalars
from adsvc_protocol.secrets import read_secret_file
from adsvc_protocol.tensors import dtype_from_enum, from_tensor, shape_from_proto, to_tensor
from adsvc_protocol.wire import LEAN_BYTES, evaluate_request, read_evaluate_response, worth_it

SERVICE = "adsvc.v1.AutodiffService"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FALLBACK_STREAM_FEEDS = 1024  # feeds per stream when the server's limit is unknown
DEFAULT_RETRY_SECONDS = 15.0  # how long UNAVAILABLE is retried (0: not at all)
RETRY_FIRST_DELAY = 0.05  # seconds before the first retry; doubles up to RETRY_MAX_DELAY
RETRY_MAX_DELAY = 1.0  # each delay is jittered: a uniform draw in [delay/2, delay]
# The channel reconnects at least this often while the server is down (gRPC's default
# backoff grows to 120 s, so a retried call would not notice a server back up).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 1000)]

_METHODS = service_pb2.DESCRIPTOR.services_by_name["AutodiffService"].methods_by_name
# The RPCs service.proto declares free of side effects (or idempotent): retried on
# UNAVAILABLE. All of them are; a new method without the option would not be retried.
RETRY_SAFE = frozenset(
    name for name, m in _METHODS.items()
    if m.GetOptions().idempotency_level != descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN)


class Retry:
    """The retry budget of one RPC: after an UNAVAILABLE attempt, `again` sleeps a
    jittered, exponentially growing delay and says whether to try once more, which is
    while `seconds` have not passed since the first attempt and the call's deadline
    (`timeout` seconds from now, if any) leaves time for it."""

    def __init__(self, seconds: float, timeout: float | None):
        self.start = time.monotonic()
        self.deadline = None if timeout is None else self.start + timeout
        self.end = self.start + seconds
        if self.deadline is not None:
            self.end = min(self.end, self.deadline)
        self.delays: list[float] = []  # slept between attempts

    @property
    def attempts(self) -> int:
        """Attempts made so far."""
        return len(self.delays) + 1

    def remaining(self) -> float | None:
        """The time left until the call's deadline (the next attempt's timeout)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def again(self, err: grpc.RpcError) -> bool:
        """Sleep and return True if the failed attempt `err` is to be retried."""
        code = err.code() if hasattr(err, "code") else None
        if code != grpc.StatusCode.UNAVAILABLE:
            return False
        delay = min(RETRY_MAX_DELAY, RETRY_FIRST_DELAY * 2 ** (self.attempts - 1))
        delay *= random.uniform(0.5, 1.0)
        if time.monotonic() + delay >= self.end:
            return False
        time.sleep(delay)
        self.delays.append(delay)
        return True

    def error(self, err: grpc.RpcError) -> E.AdsvcError:
        """The typed error of the last attempt, saying how often it was tried."""
        e = error_from_rpc(err)
        if self.attempts > 1 and type(e) is E.UnavailableError:
            e = E.UnavailableError(f"{e.description} (tried {self.attempts} times over "
                                   f"{time.monotonic() - self.start:.1f} s)", e.field,
                                   e.context)
        return e


def _read_token(path: str) -> str:
    """The token in `token_file` (the shared secret-file rule); UsageError if unusable."""
    token = read_secret_file(path, "token_file",
                             lambda m: E.UsageError(m, field="token_file"))
    if not token:
        raise E.UsageError(f"the token file {path!r} is empty: its first line is the token",
                           field="token_file")
    return token


def _signature(named) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {t.name: (dtype_from_enum(t.type.dtype, t.name, E.AdsvcError),
                     shape_from_proto(t.type, t.name)) for t in named}


def _encode_feeds(compiled: Compiled, feeds: Mapping[str, object],
                  prefix: str = "") -> dict[str, ir_pb2.Tensor]:
    """The feeds checked and converted against the compiled graph's inputs (the rule the
    server applies too), as tensors of the declared dtypes."""
    return _tensors(compiled, check_feeds(compiled.inputs, feeds, prefix))


def _tensors(compiled: Compiled, arrays) -> dict[str, ir_pb2.Tensor]:
    """Checked feed arrays as Tensors of the signature's dtypes."""
    return {name: to_tensor(a, sig[0]) for (name, sig), a in zip(compiled.inputs.items(), arrays)}


def _small_call(compiled: Compiled, only: tuple) -> ScalarCall | None:
    """The small-call path of `compiled` for output selection `only` (kept in its memo,
    rebuilt when the handle changes), or None: not all float64 scalars."""
    key = ("scalar_call", only)
    small = compiled.memo.get(key)
    handle = compiled.handle.handle
    if small is None or (small and small.handle != handle):
        outs = {k: compiled.outputs.get(k) for k in only} if only else compiled.outputs
        small = (ScalarCall(handle, compiled.inputs, compiled.outputs, only)
                 if all_scalars(compiled.inputs) and all_scalars(outs) else False)
        compiled.memo[key] = small
    return small or None


def _serialized(request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _outputs(response: bytes) -> tuple[str, dict]:
    """(handle, {output: (Tensor, raw bytes)}) of an Evaluate response's bytes: large
    ones read in place (`read_evaluate_response`), small ones parsed by protobuf."""
    if len(response) >= LEAN_BYTES:
        return read_evaluate_response(response)
    msg = service_pb2.EvaluateResponse.FromString(response)
    return msg.handle, {k: (t, None) for k, t in msg.outputs.items()}


def _decode(tensors: Mapping[str, ir_pb2.Tensor]) -> dict[str, np.ndarray]:
    return {name: from_tensor(t, f"outputs.{name}", E.AdsvcError) for name, t in tensors.items()}


@dataclass
class RemoteHandle:
    """What the server needs to find or rebuild a compiled graph."""

    handle: str
    graph: ir_pb2.Graph
    differentiation: service_pb2.Differentiation


class RemoteClient(ClientBase):
    """A client for an adsvc server; see the module docstring.

    `target` is "host:port". `timeout` is the default per-call deadline in seconds (each
    method also takes `timeout=`). `token` (or the first line of `token_file`) is sent
    as "authorization: Bearer <token>". `tls=True` verifies the server against the
    system's roots; `tls=TLS(ca_file, cert_file, key_file, server_name)` against a CA
    file, with a client certificate (mTLS) and a server-name override; `credentials`
    (any `grpc.ChannelCredentials`) instead of `tls`. UNAVAILABLE is retried for up to
    `retry_seconds` (0: never; see the module docstring). `max_message_bytes` bounds
    sent and received messages; `options` are extra gRPC channel options. At most
    `cache_size` compiled handles (and patterns) are kept, holding at most
    `max_cache_bytes` of graphs and patterns in all.
    """

    def __init__(self, target: str, *, timeout: float | None = None, token: str | None = None,
                 token_file: str | None = None, tls: bool | TLS | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, options=(),
                 cache_size: int = 128, max_cache_bytes: int = 256 << 20,
                 graphs: GraphCodec = PROTOS):
        if token and token_file:
            raise E.UsageError("give token= or token_file=, not both", field="token_file")
        if not retry_seconds >= 0:
            raise E.UsageError(f"retry_seconds must be >= 0, not {retry_seconds}",
                               field="retry_seconds")
        secure, tls_options = channel_security(tls, credentials)
        self.target = target
        self.graphs = graphs
        self.default_timeout = timeout
        self.retry_seconds = float(retry_seconds)
        self._token = _read_token(token_file) if token_file else token
        opts = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *RECONNECT_OPTIONS, *tls_options, *options,
        ]
        self._channel = (grpc.secure_channel(target, secure, options=opts)
                         if secure is not None
                         else grpc.insecure_channel(target, options=opts))
        self._stub = service_pb2_grpc.AutodiffServiceStub(self._channel)
        # Evaluate on bytes both ways: requests a message or already serialized, responses
        # read by `_outputs` (adsvc_protocol.wire: tensors as views of the bytes)
        self._evaluate = self._channel.unary_unary(
            "/adsvc.v1.AutodiffService/Evaluate", request_serializer=_serialized,
            response_deserializer=None)
        # what a cached entry holds: the graph kept for re-sending, or a sparsity pattern
        self.cache = LRUCache(cache_size, max_cache_bytes)
        self._stream_feeds: int | None = None  # the server's max_stream_feeds, once known

    # -- plumbing ----------------------------------------------------------------------
    def _metadata(self):
        md = [("x-request-id", os.urandom(16).hex())]  # (random, as uuid4().hex: cheaper)
        if self._token:
            md.append(("authorization", f"Bearer {self._token}"))
        return md

    def _timeout(self, timeout):
        return self.default_timeout if timeout is None else timeout

    def _retry(self, rpc: str, timeout) -> Retry:
        return Retry(self.retry_seconds if rpc in RETRY_SAFE else 0.0, self._timeout(timeout))

    def _call(self, rpc: str, request, timeout, method=None):
        """A unary RPC by name (or `method`, a multicallable of it), retried on
        UNAVAILABLE; typed errors."""
        method = method or getattr(self._stub, rpc)
        retry = self._retry(rpc, timeout)
        metadata = self._metadata()  # one request id for every attempt
        while True:
            try:
                return method(request, timeout=retry.remaining(), metadata=metadata)
            except grpc.RpcError as err:
                if not retry.again(err):
                    raise retry.error(err) from None

    def server_info(self, *, timeout: float | None = None) -> service_pb2.ServerInfo:
        """The server's versions, op list, limits and counters."""
        return self._call("GetServerInfo", service_pb2.GetServerInfoRequest(), timeout)

    def close(self) -> None:
        """Close the channel and drop the cached handles."""
        self._channel.close()
        self.cache.clear()

    # -- primitives --------------------------------------------------------------------
    def _differentiate(self, graph, diff, omit_graph: bool, timeout):
        return self._call("Differentiate", service_pb2.DifferentiateRequest(
            graph=graph, differentiation=diff, omit_graph=omit_graph), timeout)

    def _compile(self, g, modes, wrt, seed, timeout) -> Compiled:
        # modes were checked by ClientBase (normalize_modes); a cached graph is not encoded
        key = (self.graphs.key(g), tuple(modes), None if wrt is None else tuple(wrt),
               bool(seed))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        graph = self.graphs.encode(g)
        diff = service_pb2.Differentiation(modes=[TO_ENUM[m] for m in modes],
                                           wrt=list(wrt or ()), seed=bool(seed))
        resp = self._differentiate(graph, diff, True, timeout)
        compiled = Compiled(RemoteHandle(resp.handle, graph, diff),
                            _signature(resp.inputs), _signature(resp.outputs))
        self.cache.put(key, compiled, weight=graph.ByteSize())
        return compiled

    def _sparsity(self, g, kind, wrt, timeout) -> sparse.Sparsity:
        """The pattern and colorings from the Sparsity RPC, kept in the client's cache (the
        sweeps then run over EvaluateStream like every other derivative)."""
        key = ("sparsity", self.graphs.key(g), kind, None if wrt is None else tuple(wrt))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        resp = self._call("Sparsity", service_pb2.SparsityRequest(
            graph=self.graphs.encode(g), kind=sparse.KIND_TO_ENUM[kind], wrt=list(wrt or ())),
            timeout)
        found = sparse.from_proto(resp)
        self.cache.put(key, found, weight=found.nbytes)
        return found

    def _graph(self, compiled, timeout):
        """The differentiated graph, fetched from the server once (Differentiate with the
        graph) and kept with the compiled entry."""
        if compiled.graph is None:
            h: RemoteHandle = compiled.handle
            full = self._differentiate(h.graph, h.differentiation, False, timeout)
            compiled.graph = self.graphs.decode(full.graph)
        return compiled.graph

    def _run(self, compiled, feeds, timeout, outputs=None) -> dict[str, np.ndarray]:
        h: RemoteHandle = compiled.handle
        only = tuple(outputs or ())  # the request's output_filter
        small = _small_call(compiled, only)
        request = small.pack(feeds) if small is not None else None
        if request is None:
            request = self._request(compiled, feeds, only)
        try:
            response = self._call("Evaluate", request, timeout, self._evaluate)
        except E.HandleNotFoundError:  # evicted, restarted or another replica: re-send
            response = self._call("Evaluate", service_pb2.EvaluateRequest(
                graph=h.graph, differentiation=h.differentiation,
                inputs=_encode_feeds(compiled, feeds), output_filter=only), timeout,
                self._evaluate)
        got = small.read(response) if small is not None else None
        if got is not None:  # the small-call path's layout: float64 scalars
            return got
        handle, outs = _outputs(response)
        h.handle = handle or h.handle  # (the graph's handle, new after a re-send)
        return {name: from_tensor(t, f"outputs.{name}", E.AdsvcError, raw=raw)
                for name, (t, raw) in outs.items()}

    @staticmethod
    def _request(compiled, feeds, only: tuple):
        """The EvaluateRequest by handle for `feeds` (checked against the signature)."""
        arrays = check_feeds(compiled.inputs, feeds)
        if worth_it(arrays):  # written around the arrays' buffers: one copy of each
            typed = [(name, sig[0], a)
                     for (name, sig), a in zip(compiled.inputs.items(), arrays)]
            return evaluate_request(compiled.handle.handle, typed, only)
        return service_pb2.EvaluateRequest(handle=compiled.handle.handle,
                                           inputs=_tensors(compiled, arrays),
                                           output_filter=only)

    def _stream_chunk(self, timeout) -> int:
        """Feeds per EvaluateStream call: the server's max_stream_feeds (asked once per
        client), or FALLBACK_STREAM_FEEDS if the server does not say."""
        if self._stream_feeds is None:
            try:
                limit = self.server_info(timeout=timeout).limits.max_stream_feeds
            except E.AdsvcError:
                return FALLBACK_STREAM_FEEDS  # not cached: ask again next time
            self._stream_feeds = limit if limit > 0 else 0
        return self._stream_feeds

    def _run_many(self, compiled, feeds: Sequence[Mapping[str, object]],
                  timeout) -> list[dict[str, np.ndarray]]:
        encoded = [_encode_feeds(compiled, f, f"feeds[{i}].") for i, f in enumerate(feeds)]
        if not encoded:
            return []
        chunk = len(encoded) if len(encoded) == 1 else self._stream_chunk(timeout)
        chunk = chunk or len(encoded)
        out: list[dict[str, np.ndarray]] = []
        for start in range(0, len(encoded), chunk):
            out.extend(self._run_stream(compiled.handle, encoded[start:start + chunk], timeout))
        return out

    def _run_stream(self, h: RemoteHandle, encoded, timeout) -> list[dict[str, np.ndarray]]:
        try:
            return self._stream(service_pb2.StreamTarget(handle=h.handle), encoded, timeout)
        except E.HandleNotFoundError as e:
            if e.field != "handle":
                raise
            return self._stream(service_pb2.StreamTarget(
                graph=h.graph, differentiation=h.differentiation), encoded, timeout)

    def _stream(self, target, encoded, timeout) -> list[dict[str, np.ndarray]]:
        def requests():
            yield service_pb2.EvaluateStreamRequest(target=target)
            for inputs in encoded:
                yield service_pb2.EvaluateStreamRequest(feed=service_pb2.Feed(inputs=inputs))

        out: list[dict[str, np.ndarray]] = [{} for _ in encoded]
        retry = self._retry("EvaluateStream", timeout)
        metadata = self._metadata()
        while True:
            received = 0  # retried only while nothing came back
            try:
                for resp in self._stub.EvaluateStream(requests(), timeout=retry.remaining(),
                                                      metadata=metadata):
                    out[resp.index] = _decode(resp.outputs)
                    received += 1
                return out
            except grpc.RpcError as err:
                if received or not retry.again(err):
                    raise retry.error(err) from None
