"""The in-process client: the same interface as the SDK's remote client, no server."""

from __future__ import annotations

import time

from adsvc.interrupt import REFUSE_MARGIN
from adsvc.ir.codec import as_graph
from adsvc.passes.sparsity import sparsity
from adsvc.passes.sweeps import sweeps_graph
from adsvc.runtime.buffers import SPARES
from adsvc.runtime.cost import memory_fraction
from adsvc.runtime.plan import compile_plan, plan_bytes, plan_for, plan_nodes
from adsvc.runtime.tape import TapePlan
from adsvc_protocol.client import ClientBase, Compiled
from adsvc_protocol.errors import DeadlineExceededError, LimitExceededError
from adsvc_protocol.lru import LRUCache


def deadline_check(timeout: float | None):
    """A check that raises DeadlineExceededError once `timeout` seconds have passed, or
    when the `upcoming` step (estimated seconds) cannot finish before then."""
    if timeout is None:
        return None
    end = time.monotonic() + timeout

    def check(steps: int = 0, upcoming: float = 0.0):
        left = end - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(f"deadline of {timeout}s exceeded")
        if upcoming > left * REFUSE_MARGIN:
            raise DeadlineExceededError(
                f"deadline of {timeout}s: the next step (about {upcoming:.3g}s) cannot "
                f"finish in the {left:.3g}s left; stopped after {steps} steps")
    return check


# bytes a sparsity pattern entry may take while it is computed (index, value, products):
# max_eval_bytes bounds the pattern entries too
PATTERN_ENTRY_BYTES = 16


class LocalClient(ClientBase):
    """Compiles and evaluates in this process; compiled plans are cached (LRU, bounded
    by entries, by bytes held — `max_cache_bytes`, default 1 GiB — and, optionally, by
    compiled nodes). An evaluation whose planned peak of live values
    is over `max_eval_bytes` (default: half of this machine's memory; 0: no limit) is
    refused before it runs, as the server refuses it."""

    def __init__(self, cache_size: int = 128, max_cache_nodes: int = 0,
                 max_eval_bytes: int | None = None, max_cache_bytes: int = 1 << 30):
        self.cache = LRUCache(cache_size, (max_cache_bytes, max_cache_nodes))
        self.max_eval_bytes = memory_fraction(0.5) if max_eval_bytes is None \
            else max_eval_bytes

    def _compile(self, g, modes, wrt, seed, timeout) -> Compiled:
        graph = as_graph(g)
        return self._cached((graph.key, modes, wrt, seed), lambda: compile_plan(
            graph, modes, wrt, seed, deadline_check(timeout), self.max_eval_bytes))

    def _compile_sweeps(self, g, mode, wrt, count, timeout) -> Compiled:
        graph = as_graph(g)
        return self._cached((graph.key, "sweeps", mode, wrt, count), lambda: plan_for(
            sweeps_graph(graph, mode, wrt, count, deadline_check(timeout))))

    def _cached(self, key, build) -> Compiled:
        """The compiled plan of `key`, built (`build()` gives the plan) on a miss."""
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        plan = build()
        ins, outs = plan.signature
        # a tape builds its differentiated graph only if asked for (`adsvc show`)
        graph = (lambda: plan.graph) if isinstance(plan, TapePlan) else plan.graph
        compiled = Compiled(plan, ins, outs, graph)
        self.cache.put(key, compiled, weight=(plan_bytes(plan), plan_nodes(plan)))
        return compiled

    def _run(self, compiled, feeds, timeout, outputs=None):
        plan = compiled.handle.bound(feeds)  # a graph with symbolic sizes: bound by feeds
        if outputs is not None:  # only what those outputs need (`grad`: not the value)
            plan = plan.only(outputs)
        if self.max_eval_bytes and plan.cost.peak_bytes > self.max_eval_bytes:
            raise LimitExceededError(
                f"this evaluation needs about {plan.cost.peak_bytes / 2**20:.1f} MiB at its "
                f"peak; the budget is {self.max_eval_bytes / 2**20:.1f} MiB (max_eval_bytes "
                f"of adsvc.local()){plan.memory_note()}", field="graph")
        return plan.run(feeds, interrupt=deadline_check(timeout))

    def _sparsity(self, g, kind, wrt, timeout):
        """The pattern and colorings, computed once and kept with the plain compiled graph."""
        compiled = self._compile(g, (), None, False, timeout)
        key = (kind, wrt)
        hit = compiled.sparsity.get(key)
        if hit is None:
            limit = self.max_eval_bytes // PATTERN_ENTRY_BYTES if self.max_eval_bytes else None
            hit = sparsity(compiled.graph, kind, wrt, deadline_check(timeout), limit)
            compiled.sparsity[key] = hit
        return hit

    def close(self) -> None:
        """Drop the cached plans and the spare buffers of runs (the client stays
        usable)."""
        self.cache.clear()
        SPARES.clear()


def local(cache_size: int = 128, max_cache_nodes: int = 0,
          max_eval_bytes: int | None = None, max_cache_bytes: int = 1 << 30) -> LocalClient:
    """An in-process client (the embedded default): `cache_size` compiled graphs are
    kept, holding at most `max_cache_bytes` (and `max_cache_nodes` compiled nodes; 0: no
    node bound); `max_eval_bytes` bounds one evaluation's planned peak memory (see
    LocalClient)."""
    return LocalClient(cache_size, max_cache_nodes, max_eval_bytes, max_cache_bytes)
