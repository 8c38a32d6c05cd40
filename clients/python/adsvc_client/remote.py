"""The remote client: the interface of `adsvc.local()`, computed by an adsvc server.

Graphs are compiled once per (graph, modes, wrt, seed) with Differentiate and then
named by their content-hash handle; if the server does not hold a handle (restart,
eviction, another replica behind a load balancer) the graph is re-sent transparently.
Error statuses come back as the same typed exceptions the local client raises.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from adsvc_protocol import errors as E
from adsvc_protocol.client import ClientBase, Compiled
from adsvc_protocol.proto import ir_pb2, service_pb2, service_pb2_grpc
from adsvc_protocol.tensors import dtype_from_enum, from_tensor, to_tensor

SERVICE = "adsvc.v1.AutodiffService"
MODE_ENUM = {"forward": service_pb2.MODE_FORWARD, "reverse": service_pb2.MODE_REVERSE}
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FALLBACK_STREAM_FEEDS = 1024  # feeds per stream when the server's limit is unknown

# A status without our ErrorInfo (raised by gRPC itself) -> exception class.
_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: E.InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: E.LimitExceededError,
    grpc.StatusCode.NOT_FOUND: E.HandleNotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: E.UnauthenticatedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: E.DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: E.UnavailableError,
    grpc.StatusCode.CANCELLED: E.CancelledError,
}


def service_config(max_attempts: int = 4) -> str:
    """gRPC service config: retry UNAVAILABLE with exponential backoff."""
    return json.dumps({"methodConfig": [{
        "name": [{"service": SERVICE}],
        "retryPolicy": {
            "maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]})


def error_from_rpc(err: grpc.RpcError) -> E.AdsvcError:
    """The typed exception for a failed call (class from ErrorInfo.reason)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(err)
    field = description = reason = context = ""
    cycle = ()
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # inconsistent status details
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            if br.field_violations:
                field = br.field_violations[0].field
                description = br.field_violations[0].description
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            context = info.metadata.get("context", "")
            if info.metadata.get("cycle"):
                cycle = [int(c) for c in info.metadata["cycle"].split(",")]
    cls = E.ERROR_CLASSES.get(reason) or _BY_CODE.get(code, E.AdsvcError)
    if not description:
        description = f"{code.name}: {message}" if cls is E.AdsvcError else message
    if cls is E.CycleError:
        return E.CycleError(description, field, context, cycle=cycle)
    return cls(description, field, context)


def _graph_proto(g) -> ir_pb2.Graph:
    if isinstance(g, ir_pb2.Graph):
        return g
    to_proto = getattr(g, "to_proto", None)
    if to_proto is None:
        raise E.InvalidRequestError(
            f"expected an adsvc graph or an adsvc.v1.Graph proto, got {type(g).__name__}",
            field="graph")
    return to_proto()


def _signature(named) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {t.name: (dtype_from_enum(t.type.dtype, t.name, E.AdsvcError),
                     tuple(int(d) for d in t.type.dims)) for t in named}


def _encode_feeds(feeds: Mapping[str, object], prefix: str = "") -> dict[str, ir_pb2.Tensor]:
    out = {}
    for name, value in feeds.items():
        try:
            out[name] = to_tensor(value)
        except (TypeError, ValueError) as e:
            raise E.InputError(f"input {name!r} cannot be sent as a tensor: {e}",
                               field=f"{prefix}inputs.{name}") from None
    return out


def _decode(tensors: Mapping[str, ir_pb2.Tensor]) -> dict[str, np.ndarray]:
    return {name: from_tensor(t, f"outputs.{name}", E.AdsvcError) for name, t in tensors.items()}


@dataclass
class RemoteHandle:
    """What the server needs to find or rebuild a compiled graph."""

    handle: str
    graph: ir_pb2.Graph
    differentiation: service_pb2.Differentiation


class RemoteCompiled(Compiled):
    """A Compiled whose differentiated graph is fetched from the server on first use."""

    def __init__(self, handle: RemoteHandle, inputs, outputs, fetch):
        self._fetch = fetch
        self._graph = None
        super().__init__(handle, inputs, outputs, None)

    @property
    def graph(self):
        if self._graph is None and self._fetch is not None:
            self._graph = self._fetch()
        return self._graph

    @graph.setter
    def graph(self, value):
        self._graph = value


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
                 cache_size: int = 128):
        self.target = target
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
        self._compiled: OrderedDict[tuple, RemoteCompiled] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
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
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- primitives --------------------------------------------------------------------
    def _differentiate(self, graph, diff, omit_graph: bool, timeout):
        return self._call(self._stub.Differentiate, service_pb2.DifferentiateRequest(
            graph=graph, differentiation=diff, omit_graph=omit_graph), timeout)

    def _compile(self, g, modes, wrt, seed, timeout) -> Compiled:
        graph = _graph_proto(g)  # modes were checked by ClientBase (normalize_modes)
        diff = service_pb2.Differentiation(modes=[MODE_ENUM[m] for m in modes],
                                           wrt=list(wrt or ()), seed=bool(seed))
        key = (hashlib.sha256(graph.SerializeToString(deterministic=True)).digest(),
               tuple(modes), None if wrt is None else tuple(wrt), bool(seed))
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
        resp = self._differentiate(graph, diff, True, timeout)

        def fetch():
            full = self._differentiate(graph, diff, False, timeout)
            try:
                from adsvc.ir.codec import graph_from_proto
            except ImportError:  # the SDK installed on its own
                return full.graph
            return graph_from_proto(full.graph)

        compiled = RemoteCompiled(RemoteHandle(resp.handle, graph, diff),
                                  _signature(resp.inputs), _signature(resp.outputs), fetch)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def _run(self, compiled, feeds, timeout) -> dict[str, np.ndarray]:
        h: RemoteHandle = compiled.handle
        inputs = _encode_feeds(feeds)
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
        encoded = [_encode_feeds(f, f"feeds[{i}].") for i, f in enumerate(feeds)]
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
