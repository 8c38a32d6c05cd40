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

from adsvc.interrupt import CHECK_EVERY, CHECK_SECONDS, Interrupt, interrupting
from adsvc.ir.graph import Graph
from adsvc.ir.opdef import OPS
from adsvc.passes.loop_memory import loop_memory
from adsvc.passes.pipeline import compile_graph, signature
from adsvc.passes.specialize import specialize
from adsvc.runtime import scalar_vm
from adsvc.runtime.buffers import BufferPool, out_key
from adsvc.runtime.cost import Cost, held_bytes, observe, plan_cost, speed
from adsvc.runtime.fusion import fuse, fuse_pad_sums
from adsvc.runtime.scalar_vm import Program
from adsvc.runtime.tape import TapePlan, tape_plan
from adsvc_protocol.dims import bind, symbols_of
from adsvc_protocol.errors import AdsvcError, EvaluationError, InputError, LimitExceededError
from adsvc_protocol.feeds import check_feeds
from adsvc_protocol.lru import LRUCache


class Plan:
    """A graph ready to evaluate many times: slot-indexed steps that free each value after
    its last use (see the module docstring)."""

    CUTS = 4  # plans of output selections kept (`only`): a client choosing ever new ones
    # must not grow a cached plan without bound

    def __init__(self, graph: Graph, check=None, _plans: dict | None = None):
        """Plan `graph`; `check()` (optional) is called every CHECK_EVERY nodes and may
        raise to stop (a deadline while compiling). Sub-graphs (loop bodies, branches) get
        plans of their own, one per distinct graph, which their ops' kernels run."""
        self.graph = graph
        self._plans = {} if _plans is None else _plans  # sub-graph -> its plan
        self._cut = LRUCache(self.CUTS)  # outputs -> plan of the graph cut to them
        nodes = graph.nodes
        self.input_types = [(n.dtype, n.shape) for n in graph.inputs]
        self.output_types = [(n.dtype, n.shape) for _, n in graph.outputs]
        slot = {id(n): i for i, n in enumerate(nodes)}
        self.input_slots = [slot[id(n)] for n in graph.inputs]
        self.inputs = {n.name: (n.dtype, n.shape) for n in graph.inputs}
        self._input_slot_set = set(self.input_slots)
        self.outputs = [(name, slot[id(n)]) for name, n in graph.outputs]
        self._keep = {s for _, s in self.outputs}
        self._slot, self._check = slot, check
        # a graph of scalars only: one native register program instead of numpy per node
        # (its numpy steps are then built only if something asks for them)
        self.program = (Program(nodes, self.input_slots, [s for _, s in self.outputs])
                        if scalar_vm.eligible(nodes) else None)
        if self.program is None:
            self.steps  # noqa: B018  (built now, under `check`)
        else:  # steps built later, if ever, are not under this compile's deadline
            self._check = None

    @cached_property
    def template(self) -> list:
        """The slot values every run starts from: the constants (None elsewhere)."""
        out: list = [None] * len(self.graph.nodes)
        for n in self.graph.nodes:
            if n.op == "constant":
                out[self._slot[id(n)]] = n.value
        return out

    @cached_property
    def steps(self) -> list:
        """(kernel, operand slots, result slot, slots freed after it, node) per step."""
        slot, check, steps = self._slot, self._check, []
        for k, n in enumerate(self.graph.nodes):
            if check is not None and k % CHECK_EVERY == 0:
                check()
            if n.op not in ("constant", "input"):
                fn = OPS[n.op].kernel(self._kernel_attrs(n, check))
                steps.append((fn, tuple(slot[id(i)] for i in n.inputs), slot[id(n)], n))
        steps = fuse_pad_sums(fuse(steps, self.graph.nodes, self._keep), self.graph.nodes,
                              self._keep)  # elementwise chains: one pass each
        last: dict[int, int] = {}
        for k, (_, ins, _, _) in enumerate(steps):
            for s in ins:
                last[s] = k
        frees: list[list[int]] = [[] for _ in steps]
        for s, k in last.items():
            if s not in self._keep:
                frees[k].append(s)
        self._check = None  # a checker belongs to the compile that made the plan
        self._reuse(steps)
        return [(fn, ins, out, tuple(fr), n) for (fn, ins, out, n), fr in zip(steps, frees)]

    def _reuse(self, steps) -> None:
        """Which steps may write into a freed buffer (`buffers.out_key`) and which freed
        slots hold buffers such a step can take."""
        keys = [out_key(fn, n) for fn, _, _, n in steps]
        wanted = set(keys) - {None}
        self._out_keys = keys if wanted else None
        self._pool_keys = {out: k for (_, _, out, _), k in zip(steps, keys) if k in wanted}

    def _kernel_attrs(self, node, check) -> dict:
        """The node's attributes for its kernel: each sub-graph as its plan."""
        attrs = dict(node.attrs)
        for k, v in node.attrs:
            if isinstance(v, Graph):
                attrs[k] = self.subplan(v, check)
            elif isinstance(v, tuple) and v and isinstance(v[0], Graph):
                attrs[k] = tuple(self.subplan(g, check) for g in v)
        return attrs

    def subplan(self, graph: Graph, check=None) -> Plan:
        """The plan of sub-graph `graph` (shared by every node that has it)."""
        plan = self._plans.get(graph)
        if plan is None:
            plan = self._plans[graph] = Plan(graph, check, self._plans)
        return plan

    @property
    def seconds(self) -> float:
        """Estimated seconds of one run."""
        return self.cost.seconds

    @property
    def signature(self) -> tuple[dict, dict]:
        """({input: (dtype, shape)}, {output: (dtype, shape)}) of its graph."""
        return signature(self.graph)

    def run_values(self, inputs: list) -> list:
        """Evaluate on input values in input order (already checked) and return the output
        values in output order: what loop kernels call once per iteration."""
        if self.program is not None:
            return self.program.run(inputs)
        vals = list(self.template)
        for s, v in zip(self.input_slots, inputs):
            vals[s] = v
        for fn, ins, out, frees, node in self.steps:
            try:
                vals[out] = fn(*[vals[i] for i in ins])
            except (AdsvcError, MemoryError):  # a deadline, an inner loop's own error
                raise
            except Exception as e:
                raise EvaluationError(f"in a sub-graph ({self.graph.name}): op {node.op!r} "
                                      f"(node %{out}) failed: {e}") from None
            for s in frees:
                vals[s] = None
        return [vals[s] for _, s in self.outputs]

    def bound(self, feeds: Mapping[str, object]) -> Plan:
        """This plan (its sizes are fixed; see `SymbolicPlan.bound`)."""
        return self

    def only(self, names: tuple[str, ...]) -> Plan:
        """The plan of this graph cut to the outputs `names` (nodes only the others need
        are not run: `grad` skips the value), built once per selection; this plan
        when `names` covers every output. The last CUTS selections are kept (any order or
        repetition of the same names is one selection)."""
        wanted = set(names)
        key = tuple(n for n, _ in self.outputs if n in wanted)
        if len(key) == len(self.outputs):
            return self
        cut = self._cut.get(key)
        if cut is None:
            graph = Graph(self.graph.inputs, [(n, node) for n, node in self.graph.outputs
                                              if n in wanted], self.graph.name)
            cut = Plan(graph, None, self._plans)
            self._cut.put(key, cut)
        return cut

    def memory_note(self) -> str:
        """What a refusal by the memory budget should add: the loop that stores the
        most for a backward sweep, and how to store less ("" if no loop stores much)."""
        loops = sorted(loop_memory(self.graph), key=lambda m: -m.stored_bytes)
        if not loops or loops[0].stored_bytes < self.cost.peak_bytes // 4:
            return ""
        m = loops[0]
        size = f"{m.stored_bytes / 2**20:.1f} MiB"
        if m.op == "while_loop":
            return (f"; a while_loop's reverse mode keeps up to max_iters={m.steps} carries "
                    f"({size}) for the backward sweep: lower max_iters")
        how = "a larger checkpoint interval" if m.interval > 1 else "checkpoint=True"
        return (f"; a scan keeps {m.stored} of its {m.steps} carries ({size}) for the "
                f"backward sweep: {how} stores fewer")

    @cached_property
    def cost(self) -> Cost:
        """Peak live bytes, largest allocation and estimated seconds (per step too)."""
        return self.measure()

    def measure(self, check=None) -> Cost:
        """Compute (and keep) `cost`; `check()` as in the constructor."""
        if self.program is not None:  # registers, one instruction per node
            cost = self.program.cost()
            self.__dict__["cost"] = cost
            return cost
        cost = plan_cost(self.graph.nodes, [(ins, out, fr, n) for _, ins, out, fr, n in
                                            self.steps], self._keep, check,
                         sub_cost=lambda g: self.subplan(g).cost)
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
        arrays = check_feeds(self.inputs, feeds)
        if self.program is not None:  # no numpy steps: no errstate, no loop kernels
            out = self.program.run(arrays, interrupt)
            return {name: v for (name, _), v in zip(self.outputs, out)}
        vals = list(self.template)
        for s, arr in zip(self.input_slots, arrays):
            vals[s] = arr
        estimate = self.cost.steps if interrupt is not None else ()
        since, scale, timed = 0.0, speed(), 0.0
        keys, pooled, pool = self._out_keys, self._pool_keys, BufferPool()
        with np.errstate(all="ignore"), interrupting(interrupt):
            for k, (fn, ins, out, frees, node) in enumerate(self.steps):
                if interrupt is not None:
                    secs = estimate[k] * scale
                    if k % CHECK_EVERY == 0 or since + secs >= CHECK_SECONDS:
                        interrupt(steps=k, upcoming=secs)
                        since = 0.0
                    since += secs
                    timed = time.perf_counter() if estimate[k] >= CHECK_SECONDS else 0.0
                try:
                    buf = pool.take(keys[k]) if keys is not None and keys[k] else None
                    vals[out] = fn(*[vals[i] for i in ins]) if buf is None else \
                        fn(*[vals[i] for i in ins], out=buf)
                    if timed:  # an expensive step: how fast is the machine right now?
                        scale = observe(estimate[k], time.perf_counter() - timed)
                except AdsvcError as e:  # a deadline inside a loop, a loop's own error
                    if isinstance(e, EvaluationError) and not e.field:
                        raise EvaluationError(f"op {node.op!r} failed: {e.description}",
                                              field=f"nodes[id={out}]") from None
                    raise
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
                    if s in pooled:
                        pool.give(pooled[s], vals, s)  # (frees it)
                    else:
                        vals[s] = None
        pool.close()
        return {name: _owned(vals[s], s in self._input_slot_set) for name, s in self.outputs}


def _owned(value, is_input: bool) -> np.ndarray:
    """An output array the caller may modify: never a read-only view (broadcasts,
    constants) and never the caller's own input array."""
    if isinstance(value, tuple):  # a loop's results (only explain asks for them whole)
        return tuple(_owned(v, is_input) for v in value)
    a = np.asarray(value)
    return a.copy() if is_input or not a.flags.writeable else a



class SymbolicPlan:
    """A graph with symbolic dimensions, compiled (differentiated) once and evaluated at
    any sizes: each run binds the symbols from the feeds' shapes (`dims.bind`, errors
    name the symbol two feeds disagree on), specializes the graph to them
    (`passes.specialize`) and runs its plan; the plans of the last `keep` bindings are
    kept. Limits (memory, deadlines) are those of the bound plan."""

    KEEP = 4  # plans of recent sizes; each about as large as the graph (see `held_bytes`)

    def __init__(self, graph: Graph, keep: int = KEEP):
        self.graph = graph
        self.inputs = {n.name: (n.dtype, n.shape) for n in graph.inputs}
        self.symbols = sorted(symbols_of(self.inputs))
        self._plans: LRUCache = LRUCache(keep)
        self.keep = keep

    def binding(self, feeds: Mapping[str, object]) -> dict[str, int]:
        """The size of every symbol, from the shapes of `feeds`."""
        shapes = {k: np.shape(v) for k, v in feeds.items() if k in self.inputs}
        got = bind(self.inputs, shapes)
        missing = [s for s in self.symbols if s not in got]
        if missing:
            raise InputError(f"the dimension {missing[0]!r} is not bound: feed an input whose "
                             "shape has it", field="inputs")
        return got

    def bound(self, feeds: Mapping[str, object]) -> Plan:
        """The plan of the graph at the sizes of `feeds`."""
        binding = self.binding(feeds)
        key = tuple(binding[s] for s in self.symbols)
        plan = self._plans.get(key)
        if plan is None:
            plan = Plan(specialize(self.graph, binding))
            self._plans.put(key, plan)
        return plan

    def run(self, feeds: Mapping[str, object],
            interrupt: Interrupt | None = None) -> dict[str, np.ndarray]:
        """`Plan.run` of the plan at the sizes of `feeds`."""
        return self.bound(feeds).run(feeds, interrupt)

    @property
    def signature(self) -> tuple[dict, dict]:
        """({input: (dtype, shape)}, {output: (dtype, shape)}), sizes symbolic."""
        return signature(self.graph)


AnyPlan = Plan | SymbolicPlan | TapePlan


def plan_bytes(plan: AnyPlan) -> int:
    """What a compiled plan may hold, for caches bounded by bytes: its graph's nodes,
    plan steps and constants, and for a symbolic one the plans of the sizes it keeps
    (each rebuilds the graph: counted as one more graph each); a tape, its arrays and the
    primal graph it keeps."""
    if isinstance(plan, TapePlan):
        return plan.nbytes
    one = held_bytes(plan.graph)
    return one * (1 + plan.keep) if isinstance(plan, SymbolicPlan) else one


def plan_nodes(plan: AnyPlan) -> int:
    """The compiled nodes a plan counts as (node limits, cache weights): its graph's, with
    sub-graphs; a tape's registers and derivative instructions."""
    return plan.total_nodes if isinstance(plan, TapePlan) else plan.graph.total_nodes


def plan_for(graph: Graph, check=None) -> Plan | SymbolicPlan:
    """A `Plan` of `graph`, or a `SymbolicPlan` when its dimensions are symbolic."""
    return SymbolicPlan(graph) if graph.symbolic else Plan(graph, check)


def compile_plan(graph: Graph, modes: tuple[str, ...], wrt, seed: bool, check=None,
                 eval_bytes: int | None = None) -> AnyPlan:
    """What clients evaluate for `graph` and `modes` (`pipeline.compile_graph`), planned:
    a first derivative of a scalar graph as a native tape (`runtime.tape`: no derivative
    graph is built unless something asks for it), anything else as the plan of the
    differentiated graph. Errors are those of `compile_graph`."""
    tape = tape_plan(graph, modes, wrt, seed,
                     lambda: compile_graph(graph, modes, wrt, seed, None, eval_bytes))
    if tape is not None:
        return tape
    return plan_for(compile_graph(graph, modes, wrt, seed, check, eval_bytes), check)
