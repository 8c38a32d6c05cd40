"""Compressed sweeps in one graph: `count` independent first-order passes over one primal.

The compressed sweeps of a sparse derivative (one per color) all differentiate the
same graph at the same point. Evaluated one by one, each recomputes the primal values
and the local derivatives (cos(x) for sin(x) ...); built as `count` passes of the same
kind over one graph, every primal node is shared (interned nodes), so one evaluation
computes it once — vector-mode sweeps. Pass c (1-based) adds the names pass c of that
mode gives (`adsvc_protocol.names`): forward `tangent{c}:x` inputs and `tangent{c}:o`
outputs; reverse `cotangent{c}:o` inputs and `grad{c}:x` outputs; "hvp" is a seeded
reverse pass (`grad:x`) followed by forward passes c + 1 = 2 .. count + 1
(`tangent{c+1}:x` inputs, `tangent{c+1}:grad:x` outputs: Hessian-vector products).
"""

from __future__ import annotations

from adsvc.interrupt import Checker
from adsvc.ir.graph import Graph
from adsvc.passes.activity import wrt_nodes
from adsvc.passes.forward import jvp_graph
from adsvc.passes.reverse import vjp_graph
from adsvc.passes.simplify import simplify
from adsvc_protocol import dtypes
from adsvc_protocol.errors import InvalidRequestError

SWEEP_MODES = ("forward", "reverse", "hvp")


def sweeps_graph(graph: Graph, mode: str, wrt, count: int, check: Checker = None) -> Graph:
    """`graph` with `count` independent passes of `mode` (module docstring) with respect
    to `wrt` (None: every float input)."""
    if mode not in SWEEP_MODES:
        raise InvalidRequestError(f"unknown sweep mode {mode!r}", field="mode")
    g = simplify(graph, check)
    ws = wrt_nodes(g, wrt)
    targets = [k for k, n in g.outputs if dtypes.is_float(n.dtype)]
    if mode == "hvp":
        g, targets = vjp_graph(g, ws, targets, seed=True, k=1, check=check)
    first = 2 if mode == "hvp" else 1
    for c in range(first, first + count):
        if mode == "reverse":
            g, _ = vjp_graph(g, ws, targets, k=c, check=check)
        else:
            g, _ = jvp_graph(g, ws, targets, c, check)
    return g
