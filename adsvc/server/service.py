"""The thin servicer: parse the request, call the pure functions of compiler.py, serialize.

Every method runs inside `_call`, which authenticates, assigns the request id (from
"x-request-id" metadata or a fresh one, returned in the trailing metadata), turns typed
errors into rich statuses (errors.py), counts the call and logs one line for it.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import threading
import time
import uuid
from collections import namedtuple
from collections.abc import Callable

import grpc
import numpy as np

from adsvc.interrupt import REFUSE_MARGIN
from adsvc.runtime.buffers import SPARES
from adsvc.server import errors as status_table
from adsvc.server.access_log import AccessLog
from adsvc.server.compiler import (
    Backend,
    Compiler,
    Entry,
    decode_feeds,
    encode_outputs,
    evaluate,
    evaluate_response_bytes,
    spec_from_proto,
)
from adsvc.server.config import ServerConfig
from adsvc.server.info import server_info
from adsvc.server.metrics import Metrics
from adsvc.server.watchdog import Watchdog
from adsvc_protocol import recipes, sparse
from adsvc_protocol.errors import (
    AdsvcError,
    CancelledError,
    DeadlineExceededError,
    InvalidRequestError,
    LimitExceededError,
    UnauthenticatedError,
)
from adsvc_protocol.modes import REVERSE, mode_from_enum
from adsvc_protocol.proto import ir_pb2, service_pb2, service_pb2_grpc
from adsvc_protocol.scalar_wire import leading_handle
from adsvc_protocol.tensors import to_tensor, type_to_proto
from adsvc_protocol.wire import LEAN_BYTES, read_evaluate_request, worth_it

_CPUS = os.cpu_count() or 1  # read once: the load estimate runs on every call
log = logging.getLogger("adsvc.server")
REQUEST_ID = "x-request-id"
TRIM_BYTES = 4 << 20  # requests larger than this: return freed heap memory afterwards
DEADLINE_SKEW = 0.25  # s: a cancel this close to the deadline is the client's deadline


class _Status(namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


_SERVICE = service_pb2.DESCRIPTOR.services_by_name["AutodiffService"]
# rpc name -> (request class, response class); requests arrive as raw bytes and are
# parsed inside the call, so garbage gets INVALID_ARGUMENT (after authentication).
METHODS = {m.name: (getattr(service_pb2, m.input_type.name),
                    getattr(service_pb2, m.output_type.name)) for m in _SERVICE.methods}
UNLIMITED_RPCS = frozenset({"GetServerInfo"})
RAW_RPCS = frozenset({"Evaluate"})  # (its small-call path reads the bytes: `_small_call`)
# bytes a response may take beyond its tensors' data (names, dims, tags, handles)
# before its exact size is asked for
RESPONSE_SLACK = 1 << 20  # cheap; not counted against the slots


def _parse(cls, data, field: str):
    if not isinstance(data, bytes | bytearray | memoryview):
        return data  # already a message (a direct call, e.g. from a test)
    msg = cls()
    try:
        msg.ParseFromString(data if isinstance(data, bytes) else bytes(data))  # no copy of bytes
    except Exception:  # DecodeError, RecursionError, ...: all mean "not this message"
        raise _not_a(cls, field) from None
    return msg


def _not_a(cls, field: str) -> InvalidRequestError:
    return InvalidRequestError(f"the request is not a valid {cls.DESCRIPTOR.full_name} "
                               "message", field=field)


def _parse_evaluate(data) -> tuple[service_pb2.EvaluateRequest, dict]:
    """(the EvaluateRequest, {input: its raw bytes read apart}): a large one's tensors
    are views of the request bytes (`wire.read_evaluate_request`), not copies."""
    if not isinstance(data, bytes) or len(data) < LEAN_BYTES:
        return _parse(service_pb2.EvaluateRequest, data, ""), {}
    try:
        return read_evaluate_request(data)
    except Exception:  # as `_parse`
        raise _not_a(service_pb2.EvaluateRequest, "") from None


def _peer(context) -> str:
    """The call's peer address for its log line."""
    try:
        return context.peer()
    except Exception:  # (a context that cannot say any more)
        return "unknown"


class Call:
    """Per-call state: request id, where errors are located, how the work ended."""

    __slots__ = ("rpc", "context", "start", "authorization", "request_id", "field_prefix",
                 "checks", "steps", "interrupted", "idle_expired", "detail", "status",
                 "load", "large", "lookup")

    def __init__(self, rpc: str, context: grpc.ServicerContext):
        self.rpc = rpc
        self.context = context
        self.start = time.perf_counter()
        self.authorization = []
        request_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID:
                request_id = value  # (the last one, as a dict of them would keep)
            elif key == "authorization":
                self.authorization.append(value)
        self.request_id = (request_id or uuid.uuid4().hex)[:128]
        self.field_prefix = ""
        self.checks = 0  # interrupt() calls during evaluation
        self.steps = 0  # evaluation steps done when last checked
        self.interrupted = False
        self.idle_expired = False
        self.detail = ""
        self.status = "OK"  # the status code name the call ended with (logged)
        self.load: Callable[[], float] = lambda: 1.0  # how much slower steps run now
        self.large = False  # the request was big (its memory is handed back afterwards)
        self.lookup = ""  # a cache lookup's result not counted yet (`_use`: at the end)

    def interrupt(self, steps: int = 0, upcoming: float = 0.0) -> None:
        """Raise if the deadline expired, the client went away, or the `upcoming` step
        (estimated seconds) cannot finish before the deadline (stops the evaluator)."""
        self.checks += 1
        self.steps = steps
        self.stop_if_done()
        remaining = self.context.time_remaining()
        upcoming *= self.load()  # concurrent calls share the cores: each step runs slower
        if remaining is not None and upcoming > remaining * REFUSE_MARGIN:
            self.interrupted = True
            raise DeadlineExceededError(
                f"the next evaluation step (about {upcoming:.3g}s) cannot finish in the "
                f"{remaining:.3g}s left before the deadline; the work was stopped")

    def stop_if_done(self) -> None:
        """Raise if the deadline expired or the client went away (stops any work)."""
        remaining = self.context.time_remaining()
        if remaining is not None and remaining <= 0:
            self.interrupted = True
            raise DeadlineExceededError("the deadline expired; the work was stopped")
        if not self.context.is_active():
            self.interrupted = True
            if remaining is not None and remaining < DEADLINE_SKEW:
                # the client gave up at its own deadline, a moment before ours
                raise DeadlineExceededError("the deadline expired; the work was stopped")
            raise CancelledError("the call was cancelled; the work was stopped")


def _call(method):
    """Wrap a unary or server-streaming handler with the per-call machinery."""
    rpc = method.__name__
    request_cls = METHODS[rpc][0]
    raw = rpc in RAW_RPCS  # the method parses the request's bytes itself

    def _admit(self, call: Call) -> bool:
        """Authenticate, then claim a slot (GetServerInfo needs none); True if claimed."""
        self._authorize(call)
        return rpc not in UNLIMITED_RPCS and self._take_slot()

    if rpc == "EvaluateStream":
        @functools.wraps(method)
        def stream_wrapper(self, request_iterator, context):
            with _Handled(self, self._begin(rpc, context)) as h:
                h.slot = _admit(self, h.call)
                yield from method(self, self._stream_requests(request_iterator, h.call),
                                  h.call)
        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        with _Handled(self, self._begin(rpc, context)) as h:
            h.slot = _admit(self, h.call)
            h.call.large = isinstance(request, bytes) and len(request) > TRIM_BYTES
            return method(self, request if raw else _parse(request_cls, request, ""), h.call)
    return unary_wrapper


class _Handled:
    """How an RPC's body ends (`_call`): a typed error aborts the call with its status
    (`_failed`), any other exception is a bug (`_crashed`, INTERNAL); either way, and on
    success, `_end` gives the slot back and counts and logs the call."""

    __slots__ = ("servicer", "call", "slot")

    def __init__(self, servicer, call: Call):
        self.servicer, self.call, self.slot = servicer, call, False

    def __enter__(self) -> _Handled:
        return self

    def __exit__(self, kind, e, tb) -> bool:
        try:
            if kind is not None and issubclass(kind, AdsvcError):
                self.servicer._failed(self.call, e)  # aborts, unless it already went idle
            elif kind is not None and issubclass(kind, Exception):
                self.servicer._crashed(self.call)
        finally:
            self.servicer._end(self.call, self.slot)
        return kind is not None and issubclass(kind, Exception)  # (GeneratorExit passes)


def _serialize(response) -> bytes:
    """A response message's bytes; a response already written as bytes as it is."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(servicer: AutodiffServicer, server: grpc.Server) -> None:
    """Register the servicer with raw-bytes requests (parsed by `_call`)."""
    handlers = {}
    for name in METHODS:
        fn = getattr(servicer, name)
        make = (grpc.stream_stream_rpc_method_handler if name == "EvaluateStream"
                else grpc.unary_unary_rpc_method_handler)
        handlers[name] = make(fn, request_deserializer=None, response_serializer=_serialize)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))


class AutodiffServicer(service_pb2_grpc.AutodiffServiceServicer):
    """The adsvc.v1.AutodiffService: the compile cache, call counters and concurrency
    slots shared by its RPCs."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.compiler = Compiler(config, self.metrics)
        self._lock = threading.Lock()
        self.counters = {"calls_in_flight": 0, "calls_total": 0, "evaluations_interrupted": 0,
                         "cut_short": 0}
        self.stopping = False  # set at shutdown: calls then ending CANCELLED were cut short
        self._calls: set[Call] = set()  # calls in progress
        self._busy = 0  # slots taken (of max_concurrent_rpcs), under _lock
        self.access = AccessLog(log)
        self.metrics.in_flight.set_function(lambda: self.counters["calls_in_flight"])
        self._watchdog = Watchdog()

    # -- per-call machinery --------------------------------------------------------
    def _count(self, key: str, delta: int = 1) -> None:
        with self._lock:
            self.counters[key] += delta

    def _load(self) -> float:
        """How many evaluations share each core now (at least 1): the slowdown of a
        step. Only calls that are evaluating count (not idle streams or refusals)."""
        with self._lock:
            evaluating = sum(1 for c in self._calls if c.checks)
        return max(1.0, evaluating / _CPUS)

    def _begin(self, rpc: str, context) -> Call:
        call = Call(rpc, context)
        call.load = self._load
        context.set_trailing_metadata(((REQUEST_ID, call.request_id),))
        with self._lock:
            c = self.counters
            c["calls_in_flight"] += 1
            c["calls_total"] += 1
            self._calls.add(call)
        return call

    def _end(self, call: Call, slot: bool) -> None:
        """The call's bookkeeping once it ended: its slot back, counters, metrics and
        the access line."""
        with self._lock:
            c = self.counters
            if slot:
                self._busy -= 1
            if self.stopping and call.status == "CANCELLED":
                c["cut_short"] += 1
            c["calls_in_flight"] -= 1
            self._calls.discard(call)
        seconds = time.perf_counter() - call.start
        self.metrics.calls.ended(call.rpc, call.status, seconds, call.lookup)
        self.access.write("rpc=%s request_id=%s status=%s ms=%.1f peer=%s%s", (
            call.rpc, call.request_id, call.status, seconds * 1000, _peer(call.context),
            call.detail))
        if call.large or " cache=miss" in call.detail:
            TRIMMER.note()  # big requests and compiles leave freed memory the allocator keeps

    def _failed(self, call: Call, e: AdsvcError) -> None:
        """A typed error: its status (with rich details) ends the call."""
        call.status = status_table.status_code(e).name
        if call.status == "RESOURCE_EXHAUSTED":
            self.metrics.refused.labels(_reason(e)).inc()
        if call.interrupted:
            self._count("evaluations_interrupted")
            call.detail += (f" interrupted after {call.steps} evaluation steps"
                            if call.checks else " interrupted while compiling")
        if call.idle_expired:  # the watchdog cancelled it: nobody is listening
            call.status = "CANCELLED"
            call.detail += " idle"
            return
        self._abort(call, status_table.to_status(e, call.field_prefix))

    def _crashed(self, call: Call) -> None:
        """A bug (or a client gone away mid-call): INTERNAL with the request id only."""
        if call.idle_expired or not call.context.is_active():
            call.status = "CANCELLED"
            call.detail += " idle" if call.idle_expired else ""
            return
        call.status = "INTERNAL"
        log.exception("rpc=%s request_id=%s failed", call.rpc, call.request_id)
        self._abort(call, status_table.internal_status(call.request_id))

    def _authorize(self, call: Call) -> None:
        token = self.config.token
        if not token:
            return
        if len(call.authorization) > 1:
            raise UnauthenticatedError(f"{len(call.authorization)} authorization headers "
                                       "were sent; send exactly one", field="authorization")
        scheme, _, credentials = (call.authorization or [""])[0].strip().partition(" ")
        # RFC 6750: the scheme is case-insensitive; the token itself is compared exactly.
        ok = hmac.compare_digest(credentials.strip().encode(), token.encode())
        if scheme.lower() != "bearer" or not ok:
            raise UnauthenticatedError("a valid bearer token is required "
                                       "(metadata 'authorization: Bearer <token>')",
                                       field="authorization")

    def _take_slot(self) -> bool:
        """Claim one of the `max_concurrent_rpcs` slots (given back by `_end`) or answer
        RESOURCE_EXHAUSTED."""
        limit = self.config.max_concurrent_rpcs
        if not limit:
            return False
        with self._lock:
            if self._busy < limit:
                self._busy += 1
                return True
            in_flight = self.counters["calls_in_flight"]
        raise LimitExceededError(
            f"the server is busy: all {limit} slots (max_concurrent_rpcs) are taken, "
            f"{in_flight} calls in flight; retry later (health checks are never refused)",
            field="")

    def _stream_requests(self, raw_iterator, call: Call):
        """Parsed stream messages; a wait longer than stream_idle_seconds cancels the call."""
        idle = self.config.stream_idle_seconds

        def expire():
            call.idle_expired = True
            call.context.cancel()

        index = -1
        while True:
            key = self._watchdog.arm(idle, expire) if idle and idle > 0 else None
            try:
                data = next(raw_iterator, None)
            finally:
                if key is not None:
                    self._watchdog.disarm(key)
            if call.idle_expired:
                raise CancelledError(f"no message for {idle} s; the stream was cancelled")
            if data is None:
                return
            try:
                msg = _parse(service_pb2.EvaluateStreamRequest, data,
                             "target" if index < 0 else f"feeds[{index}]")
            except InvalidRequestError:
                call.field_prefix = ""
                raise
            yield msg
            index += 1

    @staticmethod
    def _abort(call: Call, status: grpc.Status) -> None:
        md = tuple(status.trailing_metadata or ()) + ((REQUEST_ID, call.request_id),)
        call.context.abort_with_status(_Status(status.code, status.details, md))

    def _limit_response(self, response, values=None) -> None:
        """LimitExceededError if `response` (a message, or its bytes) is over the message
        limit. With the output `values` a message was made of, their bytes decide when
        they are well under the limit (ByteSize walks, and for large tensors costs as much
        as an encoding)."""
        limit = self.config.max_message_bytes
        if limit and values is not None and not isinstance(response, bytes):
            raw = sum(np.asarray(v).nbytes for v in values)
            if raw + RESPONSE_SLACK < limit:
                return
        size = len(response) if isinstance(response, bytes) else response.ByteSize() \
            if limit else 0
        if limit and size > limit:
            raise LimitExceededError(f"the response would be {size} bytes; the message "
                                     f"limit is {limit}", field="response")

    def _source(self, request, call: Call, where: str = ""):
        """The compiled entry for a request with a `source` oneof and `differentiation`."""
        kind = request.WhichOneof("source")
        if kind == "graph":
            spec = spec_from_proto(request.differentiation, self.config,
                                   f"{where}differentiation")
            entry, hit = self.compiler.compile(request.graph, spec, call.stop_if_done)
            call.detail += f" cache={'hit' if hit else 'miss'}"
            return entry
        if kind == "handle":
            call.detail += " cache=handle"
            return self.compiler.lookup(request.handle)
        raise InvalidRequestError("set either graph or handle", field=f"{where}source")

    # -- RPCs ------------------------------------------------------------------------
    @_call
    def Differentiate(self, request, call):
        """RPC: compile a graph for a differentiation: its handle, signature, stats, graph."""
        if not request.HasField("graph"):
            raise InvalidRequestError("graph is required", field="graph")
        spec = spec_from_proto(request.differentiation, self.config)
        entry, hit = self.compiler.compile(request.graph, spec, call.stop_if_done)
        graph = None if request.omit_graph else entry.proto()  # (a tape's: built now)
        call.detail = f" cache={'hit' if hit else 'miss'} nodes={entry.nodes_after}"
        resp = service_pb2.DifferentiateResponse(
            handle=entry.handle,
            stats=service_pb2.CompileStats(
                nodes_before=len(request.graph.inputs) + len(request.graph.nodes),
                nodes_after=entry.nodes_after, cache_hit=hit,
                compile_seconds=0.0 if hit else entry.compile_seconds))
        for name, (dt, shape) in entry.inputs.items():
            resp.inputs.add(name=name).type.CopyFrom(_type(dt, shape))
        for name, (dt, shape) in entry.outputs.items():
            resp.outputs.add(name=name).type.CopyFrom(_type(dt, shape))
        if graph is not None:
            resp.graph.CopyFrom(graph)
        self._limit_response(resp)
        return resp

    @_call
    def Evaluate(self, data, call):
        """RPC: evaluate a graph (compiled for `differentiation`) or a handle at one feed."""
        entry = self._small_entry(data)
        path = entry.scalar if entry is not None else None
        resp = path.read(data) if path else None  # request bytes as the SDK writes them
        request = None
        if resp is None:
            request, raws = _parse_evaluate(data)
            if entry is not None and request.WhichOneof("source") == "handle" \
                    and request.handle == entry.handle:
                self._use(entry, call)
            else:
                entry = self._source(request, call)
            path = self.compiler.scalar_path(entry)
            resp = path.evaluate(request) if path is not None else None
        else:
            self._use(entry, call)
        if resp is None:
            return self._evaluate(entry, request, call, raws)
        call.detail += entry.plan.cost.log_fields  # the small-call path: floats in, bytes out
        self._limit_response(resp)
        return resp

    def _use(self, entry: Entry, call: Call) -> None:
        """A `_small_entry` is this call's: counted as a cache lookup (at its end) as
        the cache counted it, logged."""
        call.lookup = "hit" if self.compiler.use(entry) else "miss"
        call.detail += " cache=handle"

    def _small_entry(self, data) -> Entry | None:
        """The locally cached entry of the handle that request bytes start with, if any
        (not counted as a cache lookup yet: `Evaluate` counts it once)."""
        handle = leading_handle(data) if isinstance(data, bytes) else None
        return self.compiler.peek(handle) if handle else None

    def _evaluate(self, entry, request, call, raws):
        """Evaluate's general path: feeds as arrays, outputs as Tensors (or bytes)."""
        feeds = decode_feeds(request.inputs, self.config, raws=raws)
        call.detail += _cost(self.compiler.runnable(entry, feeds))
        values = evaluate(entry, feeds, call.interrupt, tuple(request.output_filter))
        if worth_it(values.values()):  # bytes, sent as they are (`_serialize`)
            resp = evaluate_response_bytes(entry, values)
        else:
            resp = service_pb2.EvaluateResponse(outputs=encode_outputs(entry, values),
                                                handle=entry.handle)
        self._limit_response(resp, values.values())
        return resp

    @_call
    def Gradient(self, request, call):
        """RPC: value and gradient of the graph's one scalar float output."""
        mode = mode_from_enum(request.mode, "mode", default=REVERSE)
        kind = request.WhichOneof("source")
        if kind == "handle":
            source = self.compiler.lookup(request.handle)
        elif kind == "graph":
            source = request.graph
        else:
            raise InvalidRequestError("set either graph or handle", field="source")
        feeds = decode_feeds(request.inputs, self.config)
        backend = Backend(self.compiler, call.interrupt, call.stop_if_done)
        value, grads = recipes.value_and_grad(backend, source, tuple(request.wrt) or None,
                                              mode, feeds)
        entry = backend.entry
        name = recipes.scalar_output(entry.outputs)
        resp = service_pb2.GradientResponse(
            value=to_tensor(value, entry.outputs[name][0]), output_name=name,
            handle=entry.handle,
            gradients={x: to_tensor(g, entry.inputs[x][0]) for x, g in grads.items()})
        self._limit_response(resp, [value, *grads.values()])
        return resp

    @_call
    def EvaluateStream(self, request_iterator, call):
        """RPC: a target (graph or handle), then one response of outputs per feed message."""
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("kind") != "target":
            raise InvalidRequestError("the first message must be a target (graph or handle)",
                                      field="target")
        entry = self._source(first.target, call, "target.")
        plan = self.compiler.runnable(entry)  # every feed's response has these outputs
        call.detail += _cost(plan)
        limit = self.config.max_stream_feeds
        for index, msg in enumerate(request_iterator):
            call.field_prefix = f"feeds[{index}]."
            if limit and index >= limit:
                raise LimitExceededError(f"more than {limit} feeds in one stream", field="")
            if msg.WhichOneof("kind") != "feed":
                raise InvalidRequestError("only the first message may be a target",
                                          field="kind")
            feeds = decode_feeds(msg.feed.inputs, self.config)
            if plan is None:  # symbolic sizes: checked at each feed's
                self.compiler.runnable(entry, feeds)
            values = evaluate(entry, feeds, call.interrupt)
            resp = service_pb2.EvaluateStreamResponse(
                index=index, outputs=encode_outputs(entry, values), handle=entry.handle)
            self._limit_response(resp, values.values())
            yield resp
        call.field_prefix = ""

    @_call
    def Sparsity(self, request, call):
        """RPC: the pattern (COO, no values) and colorings of a Jacobian or Hessian."""
        if not request.HasField("graph"):
            raise InvalidRequestError("graph is required", field="graph")
        kind = sparse.kind_from_enum(request.kind)
        _, s = self.compiler.sparsity(request.graph, kind, tuple(request.wrt) or None,
                                      call.stop_if_done)
        call.detail = f" kind={kind} nnz={s.nnz} colors={_colors(s)}"
        resp = sparse.to_proto(s)
        self._limit_response(resp)
        return resp

    @_call
    def SparseDerivative(self, request, call):
        """RPC: a sparse Jacobian or Hessian (COO) or the exact Hessian diagonal."""
        if not request.HasField("graph"):
            raise InvalidRequestError("graph is required", field="graph")
        kind = sparse.kind_from_enum(request.kind)
        if request.diagonal_only and kind != sparse.HESSIAN:
            raise InvalidRequestError("diagonal_only is for Hessians", field="diagonal_only")
        if request.mode and kind != sparse.JACOBIAN:
            raise InvalidRequestError("mode is for Jacobians", field="mode")
        feeds = decode_feeds(request.inputs, self.config)
        backend = Backend(self.compiler, call.interrupt, call.stop_if_done)
        wrt = tuple(request.wrt) or None
        resp = service_pb2.SparseDerivativeResponse()
        if request.diagonal_only:
            diag = recipes.hessian_diag(backend, request.graph, wrt, feeds)
            for x, d in diag.items():
                resp.diagonal[x].CopyFrom(to_tensor(d, backend.last_sparsity.cols[x][0]))
            coloring = sparse.DIAGONAL
        else:
            mode = mode_from_enum(request.mode, "mode") if request.mode else None
            s, m = (recipes.sparse_jacobian_matrix(backend, request.graph, wrt, mode, feeds)
                    if kind == sparse.JACOBIAN else
                    recipes.sparse_hessian_matrix(backend, request.graph, wrt, feeds))
            resp.matrix.CopyFrom(sparse.matrix_to_proto(m))
            coloring = mode or s.mode
        s = backend.last_sparsity
        resp.rows.extend(sparse.named_types(s.rows))
        resp.cols.extend(sparse.named_types(s.cols))
        resp.coloring, resp.colors = coloring, s.colors()[coloring]
        call.detail = f" kind={kind} coloring={coloring} colors={resp.colors} nnz={s.nnz}"
        self._limit_response(resp)
        return resp

    @_call
    def GetServerInfo(self, request, call):
        """RPC: versions, op table, limits and counters of this server process."""
        with self._lock:
            c = dict(self.counters)
        cache = self.compiler.cache
        stats = service_pb2.ServerStats(
            calls_in_flight=c["calls_in_flight"], calls_total=c["calls_total"],
            cache_size=len(cache), cache_hits=cache.hits, cache_misses=cache.misses,
            evaluations_interrupted=c["evaluations_interrupted"])
        return server_info(self.config, stats)


class HeapTrimmer:
    """`trim_heap` once big calls have stopped for DELAY seconds. Trimming after every
    big call made the next one map and fault all its memory afresh (an 8 MB gradient:
    ~30 ms of a ~120 ms call); waiting for a pause returns the memory all the same."""

    DELAY = 1.0

    def __init__(self, trim: Callable[[], None] | None = None):
        self._trim = trim
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._last = 0.0
        self.trims = 0

    def note(self) -> None:
        """A big call (or a compile) ended: trim after the next pause."""
        with self._lock:
            self._last = time.monotonic()
            if self._timer is None:
                self._start(self.DELAY)

    def _start(self, wait: float) -> None:
        self._timer = threading.Timer(wait, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            wait = self._last + self.DELAY - time.monotonic()
            if wait > 0:  # another big call ended meanwhile: wait for its pause
                self._start(wait)
                return
            self._timer = None
            self.trims += 1
        (self._trim or trim_heap)()


def trim_heap() -> None:
    """Give freed heap memory back to the system (the plans' spare buffers, then glibc
    `malloc_trim`; elsewhere a no-op): after a large request or a compile, RSS
    otherwise stays at its peak."""
    SPARES.clear()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def limit_heap_arenas(arenas: int = 2) -> None:
    """Use at most `arenas` glibc malloc arenas (M_ARENA_MAX): with one per thread, a
    thread pool keeps many large freed buffers (a big request's) that trimming cannot
    return. Call before the server's threads start; elsewhere a no-op."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-8, arenas)  # -8 = M_ARENA_MAX
        # Large blocks from the heap, not each from a fresh mapping, and no release on
        # every free: a freed 8 MB tensor is then reused by the next call instead of
        # being mapped, faulted and zeroed again (several ms per 8 MB here). The
        # HeapTrimmer gives the memory back once big calls pause.
        libc.mallopt(-3, MMAP_THRESHOLD)  # -3 = M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD)  # -1 = M_TRIM_THRESHOLD


MMAP_THRESHOLD = 32 << 20  # glibc's largest (64-bit); bigger blocks are still mapped
TRIM_THRESHOLD = 1 << 30


TRIMMER = HeapTrimmer()


@functools.cache
def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def _reason(e: AdsvcError) -> str:
    """A bounded label for a refusal: the part of the request its field names."""
    if not e.field:
        return "busy" if "busy" in e.description else "limit"
    return e.field.split(".")[0].split("[")[0]


def _colors(s) -> str:
    """The colorings' sizes for the log line: `forward:5,reverse:5`."""
    return ",".join(f"{k}:{v}" for k, v in s.colors().items())


def _cost(plan) -> str:
    """The evaluation's planned cost for the call's log line (none: symbolic sizes)."""
    return " symbolic" if plan is None else plan.cost.log_fields


def _type(dtype: str, shape) -> ir_pb2.TensorType:
    return type_to_proto(dtype, shape)
