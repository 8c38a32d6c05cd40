"""A compiled execution plan: the graph flattened to slot-indexed steps.

Each node gets a slot; each step is (kernel bound to its attributes, operand slots,
result slot). Every node is computed exactly once per run (memoization by
construction), and a value's slot is cleared right after its last use (liveness),
so peak memory follows what is live rather than the whole graph. `Plan.cost` knows
that peak, and each step's estimated seconds, before anything runs (runtime.cost).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import cached_property

import numpy as np

from adsvc.interrupt import CHECK_EVERY, CHECK_SECONDS, Interrupt
from adsvc.ir.graph import Graph
from adsvc.ir.opdef import OPS
from adsvc.runtime.cost import Cost, observe, plan_cost, speed
from adsvc_protocol.errors import EvaluationError, LimitExceededError
from adsvc_protocol.feeds import check_feeds


class Plan:
    """A graph ready to evaluate many times: slot-indexed steps that free each value after
    its last use (see the module docstring)."""

    def __init__(self, graph: Graph, check=None):
        """Plan `graph`; `check()` (optional) is called every CHECK_EVERY nodes and may
        raise to stop (a deadline while compiling)."""
        self.graph = graph
        nodes = graph.nodes
        slot = {id(n): i for i, n in enumerate(nodes)}
        self.input_slots = [slot[id(n)] for n in graph.inputs]
        self.inputs = {n.name: (n.dtype, n.shape) for n in graph.inputs}
        self._input_slot_set = set(self.input_slots)
        self.template: list = [None] * len(nodes)
        steps = []
        for k, n in enumerate(nodes):
            if check is not None and k % CHECK_EVERY == 0:
                check()
            if n.op == "constant":
                self.template[slot[id(n)]] = n.value
            elif n.op != "input":
                fn = OPS[n.op].kernel(dict(n.attrs))
                steps.append((fn, tuple(slot[id(i)] for i in n.inputs), slot[id(n)], n))
        self.outputs = [(name, slot[id(n)]) for name, n in graph.outputs]
        keep = {s for _, s in self.outputs}
        last: dict[int, int] = {}
        for k, (_, ins, _, _) in enumerate(steps):
            for s in ins:
                last[s] = k
        frees: list[list[int]] = [[] for _ in steps]
        for s, k in last.items():
            if s not in keep:
                frees[k].append(s)
        self.steps = [(fn, ins, out, tuple(fr), n)
                      for (fn, ins, out, n), fr in zip(steps, frees)]
        self._keep = keep

    @cached_property
    def cost(self) -> Cost:
        """Peak live bytes, largest allocation and estimated seconds (per step too)."""
        return self.measure()

    def measure(self, check=None) -> Cost:
        """Compute (and keep) `cost`; `check()` as in the constructor."""
        cost = plan_cost(self.graph.nodes, [(ins, out, fr, n) for _, ins, out, fr, n in
                                            self.steps], self._keep, check)
        self.__dict__["cost"] = cost
        return cost

    def run(self, feeds: Mapping[str, object],
            interrupt: Interrupt | None = None) -> dict[str, np.ndarray]:
        """Evaluate with named input values; returns {output name: array}.

        `interrupt(steps=k, upcoming=s)`, if given, may raise to stop the work (deadlines,
        cancellation). It is called every CHECK_EVERY steps, whenever about CHECK_SECONDS
        of estimated work has run since the last call, and before any step estimated to
        take that long itself (`upcoming`: its estimated seconds, so a step that cannot
        finish before the deadline is not started).
        """
        vals = list(self.template)
        for s, arr in zip(self.input_slots, check_feeds(self.inputs, feeds)):
            vals[s] = arr
        estimate = self.cost.steps if interrupt is not None else ()
        since, scale, timed = 0.0, speed(), 0.0
        with np.errstate(all="ignore"):
            for k, (fn, ins, out, frees, node) in enumerate(self.steps):
                if interrupt is not None:
                    secs = estimate[k] * scale
                    if k % CHECK_EVERY == 0 or since + secs >= CHECK_SECONDS:
                        interrupt(steps=k, upcoming=secs)
                        since = 0.0
                    since += secs
                    timed = time.perf_counter() if estimate[k] >= CHECK_SECONDS else 0.0
                try:
                    vals[out] = fn(*[vals[i] for i in ins])
                    if timed:  # an expensive step: how fast is the machine right now?
                        scale = observe(estimate[k], time.perf_counter() - timed)
                except MemoryError as e:  # the machine, not the request, ran out
                    raise LimitExceededError(
                        f"op {node.op!r} ran out of memory ({e}); lower the budget "
                        "(max_eval_bytes) or the concurrency", field=f"nodes[id={out}]"
                    ) from None
                except Exception as e:  # a kernel rejecting a value, e.g. index range
                    raise EvaluationError(
                        f"op {node.op!r} failed: {e}", field=f"nodes[id={out}]"
                    ) from None
                for s in frees:
                    vals[s] = None
        return {name: _owned(vals[s], s in self._input_slot_set) for name, s in self.outputs}


def _owned(value, is_input: bool) -> np.ndarray:
    """An output array the caller may modify: never a read-only view (broadcasts,
    constants) and never the caller's own input array."""
    a = np.asarray(value)
    return a.copy() if is_input or not a.flags.writeable else a

