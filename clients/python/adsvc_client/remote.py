"""The remote client: the interface of `adsvc.local()`, computed by an adsvc server.

Graphs are compiled once per (graph, modes, wrt, seed) with Differentiate and then
named by their content-hash handle; if the server does not hold a handle (restart,
eviction, another replica behind a load balancer) the graph is re-sent transparently.
Error statuses come back as the same typed exceptions the local client raises. Feeds
are checked and converted against the compiled graph's inputs before they are sent (the
rule the server applies). Graphs are of the type the client's `GraphCodec` speaks:
`adsvc.v1.Graph` protos by default; `adsvc.connect` passes adsvc's codec, so traced
graphs go in and `differentiate` returns an `adsvc.Graph`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from adsvc_client.status import error_from_rpc
from adsvc_protocol import errors as E
from adsvc_protocol.client import ClientBase, Compiled
from adsvc_protocol.feeds import check_feeds
from adsvc_protocol.graphs import PROTOS, GraphCodec
from adsvc_protocol.lru import LRUCache
from adsvc_protocol.modes import TO_ENUM
from adsvc_protocol.proto import ir_pb2, service_pb2, service_pb2_grpc
from adsvc_protocol.tensors import dtype_from_enum, from_tensor, to_tensor

SERVICE = "adsvc.v1.AutodiffService"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FALLBACK_STREAM_FEEDS = 1024  # feeds per stream when the server's limit is unknown


def service_config(max_attempts: int = 4) -> str:
    """gRPC service config: retry UNAVAILABLE with exponential backoff."""
    return json.dumps({"methodConfig": [{
        "name": [{"service": SERVICE}],
        "retryPolicy": {
            "maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]})


def _signature(named) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {t.name: (dtype_from_enum(t.type.dtype, t.name, E.AdsvcError),
                     tuple(int(d) for d in t.type.dims)) for t in named}


def _encode_feeds(compiled: Compiled, feeds: Mapping[str, object],
                  prefix: str = "") -> dict[str, ir_pb2.Tensor]:
    """The feeds checked and converted against the compiled graph's inputs (the rule the
    server applies too), as tensors of the declared dtypes."""
    arrays = check_feeds(compiled.inputs, feeds, prefix)
    return {name: to_tensor(a, sig[0]) for (name, sig), a in zip(compiled.inputs.items(), arrays)}


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
    method also takes `timeout=`). `token` is sent as "authorization: Bearer <token>".
    `max_message_bytes` bounds sent and received messages. UNAVAILABLE is retried up to
    `max_attempts` times by gRPC (service config). `credentials` makes a secure channel.
    """

    def __init__(self, target: str, *, timeout: float | None = None, token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_attempts: int = 4,
                 credentials: grpc.ChannelCredentials | None = None, options=(),
                 cache_size: int = 128, graphs: GraphCodec = PROTOS):
        self.target = target
        self.graphs = graphs
        self.default_timeout = timeout
        self._token = token
        opts = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(max_attempts)),
            *options,
        ]
        self._channel = (grpc.secure_channel(target, credentials, options=opts)
                         if credentials is not None
                         else grpc.insecure_channel(target, options=opts))
        self._stub = service_pb2_grpc.AutodiffServiceStub(self._channel)
        self.cache = LRUCache(cache_size)
        self._stream_feeds: int | None = None  # the server's max_stream_feeds, once known

    # -- plumbing ----------------------------------------------------------------------
    def _metadata(self):
        md = [("x-request-id", uuid.uuid4().hex)]
        if self._token:
            md.append(("authorization", f"Bearer {self._token}"))
        return md

    def _timeout(self, timeout):
        return self.default_timeout if timeout is None else timeout

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata())
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    def server_info(self, *, timeout: float | None = None) -> service_pb2.ServerInfo:
        """The server's versions, op list, limits and counters."""
        return self._call(self._stub.GetServerInfo, service_pb2.GetServerInfoRequest(), timeout)

    def close(self) -> None:
        """Close the channel and drop the cached handles."""
        self._channel.close()
        self.cache.clear()

    # -- primitives --------------------------------------------------------------------
    def _differentiate(self, graph, diff, omit_graph: bool, timeout):
        return self._call(self._stub.Differentiate, service_pb2.DifferentiateRequest(
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
        self.cache.put(key, compiled)
        return compiled

    def _graph(self, compiled, timeout):
        """The differentiated graph, fetched from the server once (Differentiate with the
        graph) and kept with the compiled entry."""
        if compiled.graph is None:
            h: RemoteHandle = compiled.handle
            full = self._differentiate(h.graph, h.differentiation, False, timeout)
            compiled.graph = self.graphs.decode(full.graph)
        return compiled.graph

    def _run(self, compiled, feeds, timeout) -> dict[str, np.ndarray]:
        h: RemoteHandle = compiled.handle
        inputs = _encode_feeds(compiled, feeds)
        try:
            resp = self._call(self._stub.Evaluate,
                              service_pb2.EvaluateRequest(handle=h.handle, inputs=inputs),
                              timeout)
        except E.HandleNotFoundError:  # evicted, restarted or another replica: re-send
            resp = self._call(self._stub.Evaluate, service_pb2.EvaluateRequest(
                graph=h.graph, differentiation=h.differentiation, inputs=inputs), timeout)
            h.handle = resp.handle
        return _decode(resp.outputs)

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
        try:
            for resp in self._stub.EvaluateStream(requests(), timeout=self._timeout(timeout),
                                                  metadata=self._metadata()):
                out[resp.index] = _decode(resp.outputs)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return out
