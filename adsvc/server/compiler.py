"""Pure service logic: request specs, graph decoding under limits, cached compilation,
evaluation. No gRPC here; service.py parses requests and calls these."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from adsvc.ir.codec import graph_from_proto, graph_to_proto
from adsvc.ir.graph import Graph, subgraphs
from adsvc.ir.node import nodes_created
from adsvc.passes.pipeline import compile_graph, estimate_nodes, signature
from adsvc.passes.sparsity import sparsity
from adsvc.runtime.plan import Plan, SymbolicPlan, plan_bytes, plan_for, plan_nodes
from adsvc.runtime.tape import TapePlan, tape_plan
from adsvc.server.config import ServerConfig
from adsvc.server.metrics import Metrics
from adsvc.server.scalar_path import ScalarPath
from adsvc.server.store import RedisStore
from adsvc_protocol.dims import is_symbolic
from adsvc_protocol.dtypes import to_numpy
from adsvc_protocol.errors import (
    AdsvcError,
    HandleNotFoundError,
    InputError,
    InvalidRequestError,
    LimitExceededError,
)
from adsvc_protocol.lru import LRUCache
from adsvc_protocol.modes import TO_ENUM, mode_from_enum, normalize_modes
from adsvc_protocol.proto import ir_pb2, service_pb2
from adsvc_protocol.recipes import Compiled
from adsvc_protocol.sparse import HESSIAN, Sparsity
from adsvc_protocol.tensors import from_tensor, to_tensor
from adsvc_protocol.wire import evaluate_response

log = logging.getLogger("adsvc.server")


@dataclass(frozen=True)
class Spec:
    """What to do to a graph before evaluating it (empty modes: only simplify)."""

    modes: tuple[str, ...] = ()
    wrt: tuple[str, ...] | None = None
    seed: bool = False

    def describe(self) -> str:
        """The spec for error messages: `modes=[...] wrt=[...] seed=...`."""
        return f"modes={list(self.modes)} wrt={list(self.wrt or [])} seed={self.seed}"


@dataclass
class Entry:
    """A compiled graph in the cache."""

    handle: str
    spec: Spec
    plan: Plan | SymbolicPlan | TapePlan
    compile_seconds: float
    inputs: dict = field(default_factory=dict)  # name -> (dtype, shape)
    outputs: dict = field(default_factory=dict)
    _proto: ir_pb2.Graph | None = None
    # {(kind, wrt): Sparsity} of this graph (an entry compiled without differentiation)
    sparsity: dict = field(default_factory=dict)
    fits: bool = False  # its outputs were found to fit in one response message
    # its small-call path (`Compiler.scalar_path`): False until looked at, then the
    # ScalarPath or None
    scalar: ScalarPath | None | bool = False

    @property
    def graph(self) -> Graph:
        """The compiled graph (a tape's is built on first use: `runtime.tape`)."""
        return self.plan.graph

    @property
    def nodes_after(self) -> int:
        """Inputs plus nodes of the compiled graph (CompileStats.nodes_after); a tape
        whose graph was not asked for: its registers and derivative instructions."""
        if isinstance(self.plan, TapePlan) and not self.plan.graph_built:
            return plan_nodes(self.plan)
        return self.graph.total_nodes

    def proto(self) -> ir_pb2.Graph:
        """The compiled graph as a Graph proto, encoded on first use and kept."""
        if self._proto is None:
            self._proto = graph_to_proto(self.graph)
        return self._proto

    @property
    def weight(self) -> tuple[int, int]:
        """(bytes, nodes) this entry holds in the cache: nodes, plan steps and kernels at
        NODE_BYTES each, plus constants' data and names/labels."""
        extra = sum(s.nbytes for s in self.sparsity.values())
        return plan_bytes(self.plan) + extra, plan_nodes(self.plan)


def spec_from_proto(d: service_pb2.Differentiation, config: ServerConfig,
                    where: str = "differentiation") -> Spec:
    """The Spec of a Differentiation message (modes through the one normaliser)."""
    names = [mode_from_enum(m, f"{where}.modes[{i}]") for i, m in enumerate(d.modes)]
    modes = normalize_modes(names, d.order or None, max_order=config.max_order,
                            labels=("modes", "order"), field_prefix=f"{where}.",
                            allow_empty=True)
    if not modes and (d.wrt or d.seed):
        raise InvalidRequestError("wrt/seed given without any mode", field=f"{where}.modes")
    return Spec(modes, tuple(d.wrt) if d.wrt else None, bool(d.seed))


def spec_to_proto(spec: Spec) -> service_pb2.Differentiation:
    """The Differentiation message of a Spec (what the shared store keeps with a graph)."""
    return service_pb2.Differentiation(modes=[TO_ENUM[m] for m in spec.modes],
                                       wrt=list(spec.wrt or ()), seed=spec.seed)


def check_elements(graph: Graph, config: ServerConfig, what: str) -> None:
    """LimitExceededError if a node of `graph` (called `what` in the message) has more
    than max_tensor_elements elements."""
    limit = config.max_tensor_elements
    if not limit:
        return
    for i, n in enumerate(graph.nodes):
        if is_symbolic(n.shape):
            continue  # checked at the sizes the feeds bind (Compiler.runnable)
        size = math.prod(int(d) for d in n.shape)  # exact: no int64 wrap-around
        if size > limit:
            raise LimitExceededError(
                f"{what} node {i} ({n.op}) has shape {list(n.shape)} = {size} elements; the "
                f"limit is {limit}", field="nodes" if n.op != "input" else f"inputs.{n.name}")
        for k, gs in subgraphs(n):  # loop bodies and branches: the same limit inside
            for j, sub in enumerate(gs):
                where = f"{k}[{j}]" if isinstance(n.attr(k), tuple) else k
                check_elements(sub, config, f"{what}'s node {i} ({n.op}) {where}:")


def decode_graph(proto: ir_pb2.Graph, config: ServerConfig,
                 check: Callable[[], None] | None = None) -> Graph:
    """Decode and validate a client's graph under the server's limits."""
    graph = graph_from_proto(proto, max_nodes=config.limit(config.max_nodes),
                             max_elements=config.limit(config.max_tensor_elements),
                             check=check, max_name_bytes=config.limit(config.max_name_bytes))
    check_elements(graph, config, "graph")
    return graph


def cache_key(graph: Graph, spec: Spec) -> str:
    """The handle of a compiled graph: the graph's structural key (from its nodes'
    digests, no encoding) and the spec."""
    h = hashlib.blake2b(graph.key, digest_size=32)
    h.update(repr((spec.modes, spec.wrt, spec.seed)).encode())
    return h.hexdigest()


class Compiler:
    """Compiles graphs once per content hash and keeps them in a bounded LRU; with a
    shared store (`config.store`), also finds what other replicas compiled."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.cache = LRUCache(config.cache_entries,
                              (config.max_cache_bytes, config.max_cache_nodes))
        self.store = None
        if config.store:
            self.store = RedisStore(config.store, config.store_ttl_seconds,
                                    config.store_max_bytes, secret=config.store_secret)
            if config.store_secret is None:
                log.warning("--store without --store-secret-file: entries are not signed, "
                            "so Redis must be as trusted as the servers")
            self.store.on_event = lambda e: self.metrics.store.labels(e).inc()

    def lookup(self, handle: str) -> Entry:
        """The entry of `handle` from the local cache or the shared store;
        HandleNotFoundError if neither has it, which tells the client to send the graph."""
        entry = self._cached(handle) if handle else None
        if entry is None:
            raise HandleNotFoundError(
                f"no compiled graph with handle {handle[:16]!r}... on this server; send "
                "the graph instead", field="handle")
        return entry

    def peek(self, handle: str) -> Entry | None:
        """The local cache's entry of `handle`, or None; not counted as a lookup (the
        caller counts one it uses: `use`)."""
        return self.cache.peek(handle)

    def use(self, entry: Entry) -> bool:
        """A `peek`ed entry is used: looked up in the cache (now recently used); False if
        it was evicted since. The caller counts the lookup in the metrics."""
        return self.cache.get(entry.handle) is not None

    def _cached(self, key: str) -> Entry | None:
        entry = self.cache.get(key)
        self.metrics.calls.looked_up("hit" if entry is not None else "miss")
        if entry is None and self.store is not None:
            entry = self._from_store(key)
        return entry

    def _from_store(self, key: str) -> Entry | None:
        """The stored compiled graph of `key`, validated under the limits like a client's
        graph and planned; None if the store does not have it (or it is unusable)."""
        stored = self.store.get(key)
        if stored is None:
            return None
        try:
            spec = spec_from_proto(stored.differentiation, self.config)
            graph = decode_graph(stored.graph, dataclasses.replace(
                self.config, max_nodes=self.config.max_compiled_nodes))  # compiled sizes
            limit = self.config.max_compiled_nodes
            if limit and graph.total_nodes > limit:
                raise LimitExceededError("stored graph over max_compiled_nodes")
        except AdsvcError as e:
            log.warning("stored entry %s... refused: %s", key[:16], e)
            return None
        start = time.perf_counter()
        plan = plan_for(graph)
        if isinstance(plan, Plan):
            plan.cost  # noqa: B018  (computed once, with the entry)
        ins, outs = signature(graph)
        entry = Entry(key, spec, plan, time.perf_counter() - start, ins, outs)
        self.cache.put(key, entry, weight=entry.weight)
        return entry

    def compile(self, proto: ir_pb2.Graph, spec: Spec,
                check: Callable[[], None] | None = None) -> tuple[Entry, bool]:
        """(entry, cache_hit). `check` may raise to stop the work (deadline, cancel); it
        is passed to the core's decoder and passes and called between stages."""
        graph = decode_graph(proto, self.config, check)
        key = cache_key(graph, spec)
        entry = self._cached(key)
        if entry is not None:
            return entry, True
        if check is not None:
            check()
        start = time.perf_counter()
        plan = self._plan(graph, spec, check)
        limit = self.config.max_compiled_nodes
        if limit and plan_nodes(plan) > limit:
            raise LimitExceededError(f"the compiled graph has {plan_nodes(plan)} nodes; the "
                                     f"limit is {limit}", field="differentiation")
        ins, outs = plan.signature
        entry = Entry(key, spec, plan, time.perf_counter() - start, ins, outs)
        if check is not None:
            check()  # finished after the deadline or a cancel: neither answer nor cache it
        self.cache.put(key, entry, weight=entry.weight)
        self.metrics.compile.observe(entry.compile_seconds)
        if self.store is not None:
            self.store.put(key, lambda: service_pb2.DifferentiateRequest(
                graph=entry.proto(), differentiation=spec_to_proto(spec)))
        return entry, False

    def sparsity(self, proto: ir_pb2.Graph, kind: str, wrt: tuple[str, ...] | None,
                 check: Callable[[], None] | None = None) -> tuple[Entry, Sparsity]:
        """(entry, sparsity): the graph compiled without differentiation (or found) and
        the pattern and colorings of its Jacobian or Hessian, computed once and kept with
        the entry (the cache re-weighs it). A pattern is bounded by max_tensor_elements
        entries; the gradient graph of a Hessian pattern by max_compiled_nodes."""
        entry, _ = self.compile(proto, Spec(), check)
        key = (kind, wrt)
        found = entry.sparsity.get(key)
        if found is None:
            if kind == HESSIAN:
                check = self._growth_check(entry.graph, Spec(("reverse",), wrt, True), check)
            found = sparsity(entry.graph, kind, wrt, check,
                             self.config.limit(self.config.max_tensor_elements))
            entry.sparsity[key] = found
            self.cache.put(entry.handle, entry, weight=entry.weight)
        return entry, found

    def _plan(self, graph: Graph, spec: Spec, check) -> Plan | SymbolicPlan | TapePlan:
        """`graph` compiled for `spec` and planned: a first derivative of a scalar graph as
        a native tape (its graph built only if asked for: the Differentiate RPC, the
        store), anything else differentiated under the node and element limits."""
        eval_bytes = self.config.max_eval_bytes
        tape = tape_plan(graph, spec.modes, spec.wrt, spec.seed, lambda: compile_graph(
            graph, spec.modes, spec.wrt, spec.seed, eval_bytes=eval_bytes))
        if tape is not None:
            return tape
        out = compile_graph(graph, spec.modes, spec.wrt, spec.seed,
                            check=self._growth_check(graph, spec, check),
                            eval_bytes=eval_bytes)
        limit = self.config.max_compiled_nodes
        if limit and out.total_nodes > limit:
            raise LimitExceededError(f"the compiled graph has {out.total_nodes} nodes; the "
                                     f"limit is {limit}", field="differentiation")
        if check is not None:
            check()
        check_elements(out, self.config, "compiled graph")
        plan = plan_for(out, check)
        if isinstance(plan, Plan):  # symbolic sizes: measured per binding, when it runs
            plan.measure(check)  # once, with the entry, not on every evaluation
        return plan

    def _growth_check(self, graph: Graph, spec: Spec, check):
        """Refuse a compile whose estimated size is over max_compiled_nodes before it
        starts, and stop one as soon as it has grown past the limit (`check` runs every
        few hundred nodes of every pass)."""
        limit = self.config.max_compiled_nodes
        if not limit:
            return check
        estimate = estimate_nodes(graph, spec.modes, spec.wrt)
        if estimate > limit:
            raise LimitExceededError(
                f"the compiled graph would have about {estimate} nodes ({len(graph.nodes)} "
                f"nodes, {len(spec.modes)} passes); the limit is {limit}",
                field="differentiation")
        start = nodes_created() - len(graph.nodes)

        def grown():  # counts every node made, simplified-away ones too: allow twice
            if check is not None:
                check()
            if nodes_created() - start > 2 * limit:
                raise LimitExceededError(f"the compiled graph grew past the limit of {limit} "
                                         "nodes; compilation was stopped",
                                         field="differentiation")
        return grown

    def scalar_path(self, entry: Entry) -> ScalarPath | None:
        """The entry's small-call path (`scalar_path`), or None: not such a tape, or
        over a limit (the general path then says which)."""
        path = entry.scalar
        if path is False:
            try:
                self.runnable(entry)
                path = ScalarPath.of(entry)
            except AdsvcError:
                path = None
            entry.scalar = path
        return path

    def runnable(self, entry: Entry, feeds: Mapping | None = None) -> Plan | None:
        """LimitExceededError before an evaluation whose planned peak of live values is
        over max_eval_bytes (or whose outputs cannot fit in one message); returns the plan
        that will run. A graph with symbolic sizes is checked at the sizes of `feeds`
        (element limits too); without feeds, nothing is checked and None returned."""
        plan = entry.plan
        if isinstance(plan, SymbolicPlan):
            if feeds is None:
                return None
            plan = plan.bound(feeds)
            check_elements(plan.graph, self.config, "graph at these sizes")
            _check_output_bytes(plan.output_types, self.config, "response")
        elif not entry.fits:
            check_response_size(entry, self.config)
            entry.fits = True  # (fixed sizes: the same answer every call)
        budget = self.config.max_eval_bytes
        cost = plan.cost
        if budget and cost.peak_bytes > budget:
            raise LimitExceededError(
                f"this evaluation needs about {_mb(cost.peak_bytes)} at its peak (largest "
                f"value {_mb(cost.largest_bytes)}); the budget is {_mb(budget)} "
                f"(--max-eval-bytes){plan.memory_note()}", field="graph")
        return plan


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def decode_feeds(tensors: Mapping[str, ir_pb2.Tensor], config: ServerConfig,
                 prefix: str = "", raws: Mapping | None = None) -> dict[str, np.ndarray]:
    """A request's feeds as arrays, bounded by max_tensor_elements; checking them
    against the graph's inputs is left to the plan. `raws`: tensors' raw bytes read
    apart (`wire.read_evaluate_request`: views of the request, not copied)."""
    raws = raws or {}
    limit = config.limit(config.max_tensor_elements)
    out = {}
    for name, t in tensors.items():
        n = len(name.encode("utf-8", "surrogatepass"))
        if config.max_name_bytes and n > config.max_name_bytes:
            raise InputError(f"an input name is {n} bytes long; the limit is "
                             f"{config.max_name_bytes}", field=f"{prefix}inputs")
        where = f"{prefix}inputs.{name}"
        try:
            out[name] = from_tensor(t, where, max_elements=limit, raw=raws.get(name))
        except (ValueError, OverflowError) as e:  # numpy range errors: a bad feed
            raise InputError(f"input {name!r} cannot be decoded: {e}", field=where) from None
    return out


@contextlib.contextmanager
def _encoding() -> Iterator[None]:
    """An output numpy cannot convert to its declared dtype: InvalidRequestError."""
    try:
        yield
    except (ValueError, OverflowError, TypeError) as e:
        raise InvalidRequestError(f"an output cannot be encoded: {e}", field="outputs") from None


def encode_outputs(entry: Entry, values: Mapping[str, np.ndarray]) -> dict[str, ir_pb2.Tensor]:
    """The output values as Tensor protos of the compiled graph's output dtypes."""
    with _encoding():
        return {name: to_tensor(v, entry.outputs[name][0]) for name, v in values.items()}


def evaluate_response_bytes(entry: Entry, values: Mapping[str, np.ndarray]) -> bytes:
    """The serialized EvaluateResponse, written around the output arrays' buffers
    (`adsvc_protocol.wire`: one copy of each)."""
    with _encoding():
        return evaluate_response(entry.handle, [(name, entry.outputs[name][0], v)
                                                for name, v in values.items()])


def check_response_size(entry: Entry, config: ServerConfig, what: str = "response") -> None:
    """RESOURCE_EXHAUSTED before evaluating when the outputs cannot fit in one message
    (a graph with symbolic sizes: when they are bound, `Compiler.runnable`)."""
    if not isinstance(entry.plan, SymbolicPlan):
        _check_output_bytes(list(entry.outputs.values()), config, what)


def _check_output_bytes(types, config: ServerConfig, what: str) -> None:
    limit = config.max_message_bytes
    size = sum(math.prod(int(d) for d in shape) * np.dtype(to_numpy(dt)).itemsize
               for dt, shape in types)
    if limit and size > limit:
        raise LimitExceededError(f"the outputs of this graph take {size} bytes; the message "
                                 f"limit is {limit}", field=what)


def evaluate(entry: Entry, feeds: Mapping[str, np.ndarray],
             interrupt: Callable[[], None] | None,
             outputs: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """{output name: value} of the compiled entry at `feeds` (only `outputs`, when given:
    the plan cut to them); `interrupt` may raise to stop the work."""
    if not outputs:
        return entry.plan.run(feeds, interrupt=interrupt)
    for name in outputs:
        if name not in entry.outputs:
            raise InvalidRequestError(
                f"{name!r} is not an output of the compiled graph (its outputs: "
                f"{', '.join(map(repr, entry.outputs))})", field="output_filter")
    values = entry.plan.bound(feeds).only(outputs).run(feeds, interrupt=interrupt)
    return {name: values[name] for name in dict.fromkeys(outputs)}  # (a tape runs all)


class Backend:
    """The compiler and cache as the recipes' backend (the Gradient RPC): a graph proto
    is compiled (or found) for the recipe's spec; a cached entry is used as it is when
    it was compiled for that spec. `entry` is the last one used."""

    def __init__(self, compiler: Compiler, interrupt: Callable[[], None] | None,
                 check: Callable[[], None] | None):
        self.compiler, self.interrupt, self.check = compiler, interrupt, check
        self.entry: Entry | None = None
        self.last_sparsity: Sparsity | None = None

    def sparsity(self, source, kind, wrt) -> Sparsity:
        """The pattern and colorings of a graph proto's Jacobian or Hessian (cached with
        its plain compiled entry); a handle cannot be used (it names a compiled graph)."""
        if isinstance(source, Entry):
            raise InvalidRequestError("sparse derivatives need the graph, not a handle",
                                      field="handle")
        self.last_sparsity = self.compiler.sparsity(source, kind, wrt, self.check)[1]
        return self.last_sparsity

    def compile(self, source, modes, wrt, seed) -> Compiled:
        """The Compiled for a graph proto (compiled or found in the cache for this spec) or
        for a cached Entry, which must have been compiled for this very spec (wrt None:
        its own wrt)."""
        if isinstance(source, Entry):
            want = Spec(modes, wrt if wrt is not None else source.spec.wrt, seed)
            if source.spec != want:
                raise InvalidRequestError(
                    f"this handle was compiled for {source.spec.describe()}; this call needs "
                    f"{want.describe()} (send the graph instead)", field="handle")
            entry = source
        else:
            entry, _ = self.compiler.compile(source, Spec(modes, wrt, seed), self.check)
        self.compiler.runnable(entry)
        self.entry = entry
        graph = (lambda: entry.graph) if isinstance(entry.plan, TapePlan) else entry.graph
        return Compiled(entry, entry.inputs, entry.outputs, graph)  # a tape's: built if asked

    def run(self, compiled: Compiled, feeds, outputs=None) -> dict[str, np.ndarray]:
        """{output name: value} of the compiled entry at `feeds` (a graph with symbolic
        sizes is checked against the limits at these sizes first); only `outputs` when
        given (`evaluate`)."""
        if isinstance(compiled.handle.plan, SymbolicPlan):
            self.compiler.runnable(compiled.handle, feeds)
        return evaluate(compiled.handle, feeds, self.interrupt, tuple(outputs or ()))

    def run_many(self, compiled: Compiled, feeds) -> list[dict[str, np.ndarray]]:
        """One {output name: value} per set of feeds, evaluated in turn."""
        return [self.run(compiled, f) for f in feeds]
