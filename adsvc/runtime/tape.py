"""First derivatives of scalar graphs without a derivative graph: a native tape.

A graph whose every value is a float64 (or bool) scalar — W1/W2, the shape of most
scalar models — is flattened in C straight from its IR nodes to the VM's register
program (`_vmflatten.c`). Its gradient (or VJP) is then that program run forward and
one adjoint sweep over the same instructions in reverse (`_vmsweeps.c`); its JVP, the
program and one tangent sweep. The sweeps apply the op table's VJP/JVP rules term by
term (the same local derivatives from the same values, every chain-rule product a
mul_or_zero), so the numbers are those of the derivative graph up to the order in
which several contributions to one adjoint are summed. Compiling is one C walk over
the graph and one activity pass: no derivative node is built, so it costs about what
building a CasADi `Function` costs, where the derivative graph costs ~15 µs per node.

A `TapePlan` answers like the `Plan` of the differentiated graph (same input and
output names and types, same errors for bad feeds, deadlines between chunks). The
differentiated graph itself (`graph`) is built only when something asks for it: the
Differentiate RPC, the shared store, `adsvc show`. First order only: higher orders,
and graphs the VM cannot run, take the general path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property

import numpy as np

from adsvc.ir.graph import Graph
from adsvc.passes.activity import check_new_names, wrt_nodes
from adsvc.runtime import scalar_vm
from adsvc.runtime.cost import NODE_BYTES, Cost
from adsvc_protocol import dtypes, names
from adsvc_protocol.feeds import check_feeds
from adsvc_protocol.recipes import scalar_output

CHUNK = scalar_vm.CHUNK


class TapePlan:
    """The first derivative of a scalar graph, run as a forward and a derivative sweep
    (see the module docstring)."""

    def __init__(self, primal: Graph, mode: str, wrt: list, seed: str | None, flat: tuple,
                 build: Callable[[], Graph]):
        """`seed`: the name of the output a plain gradient seeds with 1 (None: a VJP, or
        forward mode); `flat`: `scalar_vm.flatten(primal)`."""
        code, template, n_regs, roots = flat
        self.mode, self.seed, self._build = mode, seed, build
        # (no instructions: an empty program, not a placeholder — a copy r0 = r0 there
        # made `whole`'s adjoint sweep double the seed of an output that is an input)
        self.code = np.frombuffer(code, dtype=np.int32).reshape(-1, 5) if code else \
            np.zeros((0, 5), np.int32)
        self.count = len(code) // 20
        self.template = np.frombuffer(template, dtype=np.float64).copy()
        self.n_regs = n_regs
        outs = primal.outputs
        self.value_regs = roots
        self.value_bool = [n.dtype == dtypes.BOOL for _, n in outs]
        targets = [(k, r) for (k, n), r in zip(outs, roots) if dtypes.is_float(n.dtype)]
        if seed:
            targets = [t for t in targets if t[0] == seed]
        self.target_regs = [r for _, r in targets]
        slot = {id(n): i for i, n in enumerate(primal.inputs)}
        self.wrt_regs = [slot[id(w)] for w in wrt]
        self.n_primal_inputs = len(primal.inputs)
        flags, reached = scalar_vm.activity(self.code, n_regs, self.wrt_regs,
                                            self.target_regs)
        self.flags = np.frombuffer(flags, dtype=np.uint8)
        self.reached = np.frombuffer(reached, dtype=np.uint8)[:len(wrt)].astype(bool)
        self.inputs = {n.name: (n.dtype, n.shape) for n in primal.inputs}
        self.outputs_sig = {k: (n.dtype, n.shape) for k, n in outs}
        if mode == "reverse":
            new_in = [] if seed else [names.cotangent(k) for k, _ in targets]
            new_out = [names.grad(w.name) for w in wrt]
        else:
            new_in = [names.tangent(w.name) for w in wrt]
            new_out = [names.tangent(k) for k, _ in targets]
        self.inputs.update({k: (dtypes.FLOAT64, ()) for k in new_in})
        self.outputs_sig.update({k: (dtypes.FLOAT64, ()) for k in new_out})
        self.output_names = list(self.outputs_sig)
        self._all_float = all(dt == dtypes.FLOAT64 for dt, _ in self.inputs.values())
        self.active_instructions = int(np.count_nonzero(self.flags[:self.count]))
        # what `scalar_vm.whole` reads: the program, its flags, the registers it starts
        # from, the value, target and wrt registers, which wrt registers are reached
        self._small = (self.code, self.flags, self.template,
                       *(np.array(r, np.int32) for r in (roots, self.target_regs,
                                                         self.wrt_regs)),
                       self.reached.astype(np.uint8))

    @cached_property
    def graph(self) -> Graph:
        """The differentiated graph (the general path's), built on first use."""
        return self._build()

    @property
    def graph_built(self) -> bool:
        """Has `graph` been built (asked for) yet?"""
        return "graph" in self.__dict__

    @property
    def signature(self) -> tuple[dict, dict]:
        """({input: (dtype, shape)}, {output: (dtype, shape)}), as `pipeline.signature`."""
        return dict(self.inputs), dict(self.outputs_sig)

    @property
    def total_nodes(self) -> int:
        """What node limits and cache weights count: a register per primal node and an
        instruction per differentiated one."""
        return self.n_regs + self.active_instructions

    @property
    def nbytes(self) -> int:
        """What a cache holds for it: the primal graph it keeps (to build `graph` on
        demand) and the arrays."""
        return (self.n_regs * NODE_BYTES + self.code.nbytes + self.template.nbytes
                + self.flags.nbytes)

    @cached_property
    def cost(self) -> Cost:
        """Three register files (values, their derivatives, the template); one operation
        per forward and per active derivative instruction."""
        return Cost(3 * self.template.nbytes + 8, 8,
                    [(self.count + self.active_instructions, 0, 0)])

    def measure(self, check=None) -> Cost:
        """`cost` (nothing to walk: known from the program)."""
        return self.cost

    @property
    def seconds(self) -> float:
        """Estimated seconds of one run."""
        return self.cost.seconds

    def bound(self, feeds: Mapping[str, object]) -> TapePlan:
        """This plan (a scalar graph has no symbolic sizes)."""
        return self

    def only(self, names) -> TapePlan:
        """This plan (its sweeps compute the value anyway)."""
        return self

    def memory_note(self) -> str:
        """Nothing to add to a memory refusal: a tape stores no loop."""
        return ""

    def run(self, feeds: Mapping[str, object], interrupt=None) -> dict[str, np.ndarray]:
        """{output name: 0-d array} at `feeds` (checked like any plan's)."""
        return dict(zip(self.output_names, self.run_values(self._feeds(feeds), interrupt)))

    def _feeds(self, feeds: Mapping[str, object]) -> list:
        """The input values in input order: Python floats for float64 inputs as they are
        (exact float64 scalars); anything else through `check_feeds`, which converts
        it or names what is wrong."""
        if self._all_float and len(feeds) == len(self.inputs):
            values = [feeds.get(k) for k in self.inputs]
            if all(type(v) is float for v in values):
                return values
        return check_feeds(self.inputs, feeds)

    @property
    def floats_only(self) -> bool:
        """Does `run_floats` apply: a small tape (one C call) without bool outputs?"""
        return self.count <= CHUNK and not any(self.value_bool)

    def run_floats(self, inputs: list[float]) -> list[float]:
        """The output values as Python floats, in output order, at float input values
        in input order (when `floats_only`: the server's small-call path)."""
        values, derivs = self._whole(inputs)
        return [*values, *derivs]

    @cached_property
    def native(self) -> tuple:
        """The program as `scalar_vm.small_call` reads it (bytes, mode, primal inputs)."""
        code, flags, template, values, targets, wrt, reached = self._small
        return (*(bytes(memoryview(np.ascontiguousarray(a)).cast("B"))
                  for a in (code, flags, template, values, targets, wrt, reached)),
                self.mode == "reverse", bool(self.seed), self.n_primal_inputs)

    def _whole(self, inputs: list) -> tuple:
        """(values, derivatives) of a small tape: `scalar_vm.whole`, seeded."""
        n_in = self.n_primal_inputs
        seeds = inputs[n_in:] if self.mode == "forward" or not self.seed else \
            [1.0] * len(self.target_regs)
        return scalar_vm.whole(self._small, inputs[:n_in], seeds, self.mode == "reverse")

    def run_values(self, inputs: list, interrupt=None) -> list:
        """The output values, in output order, at input values in input order."""
        n_in = self.n_primal_inputs
        if self.count <= CHUNK:  # a small tape: one C call, nothing to interrupt
            values, derivs = self._whole(inputs)
            return [np.array(v != 0.0) if b else np.array(v)
                    for v, b in zip(values, self.value_bool)] + [np.array(d) for d in derivs]
        regs = self.template.copy()
        for k in range(n_in):
            regs[k] = inputs[k]
        scalar_vm.run_chunks(self.code, regs, self.count, interrupt)
        values = [np.array(regs[r] != 0.0) if b else np.array(regs[r])
                  for r, b in zip(self.value_regs, self.value_bool)]
        extra = [float(v) for v in inputs[n_in:]]
        if self.mode == "reverse":
            return values + self._reverse(regs, extra, interrupt)
        return values + self._tangent(regs, extra, interrupt)

    def _reverse(self, regs, cotangents, interrupt) -> list:
        adj = np.full(self.n_regs, -0.0)  # -0.0 + x == x: the first contribution exactly
        for r, c in zip(self.target_regs, cotangents or [1.0] * len(self.target_regs)):
            adj[r] += c
        for stop in range(self.count, 0, -CHUNK):
            if interrupt is not None:
                interrupt(steps=self.count + (self.count - stop))
            scalar_vm.reverse(self.code, regs, adj, self.flags, max(0, stop - CHUNK), stop)
        return [np.array(adj[r] if hit else 0.0) for r, hit in zip(self.wrt_regs,
                                                                   self.reached)]

    def _tangent(self, regs, tangents, interrupt) -> list:
        dot = np.zeros(self.n_regs)
        for r, t in zip(self.wrt_regs, tangents):
            dot[r] = t
        for start in range(0, self.count, CHUNK):
            if interrupt is not None:
                interrupt(steps=self.count + start)
            scalar_vm.tangent(self.code, regs, dot, self.flags, start,
                              min(start + CHUNK, self.count))
        return [np.array(dot[r]) for r in self.target_regs]


def tape_plan(graph: Graph, modes: tuple[str, ...], wrt, seed: bool,
              build: Callable[[], Graph]) -> TapePlan | None:
    """The tape of `graph`'s first derivative in `modes` (one pass) with respect to `wrt`
    (None: every float input), or None when the general path must compile it: another
    order, a graph the VM cannot run, nothing to differentiate. `build()` gives the
    differentiated graph when something asks for it. Requests the general path would
    refuse (an unknown wrt, a name clash, a seed without one scalar output) raise the same
    errors, from the same functions."""
    if len(modes) != 1 or modes[0] not in ("reverse", "forward") or not scalar_vm.available():
        return None  # (graphs with loops fall through at flatten: loops have no opcode)
    wrt_list = wrt_nodes(graph, wrt)
    if not wrt_list:
        return None  # the general path says why
    mode = modes[0]
    outs = {k: (n.dtype, n.shape) for k, n in graph.outputs}
    targets = [k for k, (dt, _) in outs.items() if dtypes.is_float(dt)]
    seeded = mode == "reverse" and seed
    if mode == "reverse":
        check_new_names(graph, [] if seeded else [names.cotangent(t) for t in targets],
                        [names.grad(w.name) for w in wrt_list])
    else:
        check_new_names(graph, [names.tangent(w.name) for w in wrt_list],
                        [names.tangent(t) for t in targets])
    seed_name = scalar_output(outs, primal_only=False) if seeded else None
    flat = scalar_vm.flatten(graph)
    if flat is None:
        return None
    return TapePlan(graph, mode, wrt_list, seed_name, flat, build)
