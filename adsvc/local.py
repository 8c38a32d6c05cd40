"""The in-process client: the same interface as the remote SDK client, no server."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from adsvc.ir.codec import graph_from_proto
from adsvc.ir.graph import Graph
from adsvc.passes.pipeline import differentiate
from adsvc.passes.simplify import simplify
from adsvc.runtime.plan import Plan
from adsvc_protocol.client import ClientBase, Compiled
from adsvc_protocol.errors import DeadlineExceededError, InvalidRequestError
from adsvc_protocol.proto import ir_pb2


def as_graph(g) -> Graph:
    """Accept an IR graph or a Graph proto."""
    if isinstance(g, Graph):
        return g
    if isinstance(g, ir_pb2.Graph):
        return graph_from_proto(g)
    raise InvalidRequestError(f"expected an adsvc graph or Graph proto, got {type(g).__name__}")


def compile_graph(graph: Graph, modes: tuple[str, ...], wrt, seed: bool,
                  check=None) -> Graph:
    """Simplify (no modes) or differentiate; `check` may raise to stop (deadlines)."""
    if not modes:
        return simplify(graph, check)
    return differentiate(graph, list(modes), None if wrt is None else list(wrt),
                         order=len(modes), seed=seed, check=check)


def signature(graph: Graph):
    return ({n.name: (n.dtype, n.shape) for n in graph.inputs},
            {k: (n.dtype, n.shape) for k, n in graph.outputs})


def deadline_check(timeout: float | None):
    if timeout is None:
        return None
    end = time.monotonic() + timeout

    def check():
        if time.monotonic() > end:
            raise DeadlineExceededError(f"deadline of {timeout}s exceeded")
    return check


class LocalClient(ClientBase):
    """Compiles and evaluates in this process; compiled plans are cached (LRU)."""

    def __init__(self, cache_size: int = 128):
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _compile(self, g, modes, wrt, seed, timeout) -> Compiled:
        graph = as_graph(g)
        # Nodes are interned, so (inputs, outputs) identify the graph; the key holds them
        # strongly so the ids cannot be reused while cached.
        key = (graph.inputs, graph.outputs, modes, wrt, seed)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        out = compile_graph(graph, modes, wrt, seed, deadline_check(timeout))
        ins, outs = signature(out)
        compiled = Compiled(Plan(out), ins, outs, out)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _run(self, compiled, feeds, timeout):
        return compiled.handle.run(feeds, interrupt=deadline_check(timeout))


def local(cache_size: int = 128) -> LocalClient:
    """An in-process client (the embedded default)."""
    return LocalClient(cache_size)
