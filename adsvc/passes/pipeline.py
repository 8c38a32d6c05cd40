"""Composition of passes: differentiate a graph to any order in any mix of modes."""

from __future__ import annotations

from adsvc.interrupt import Checker, compiling
from adsvc.ir.codec import MAX_DEPTH
from adsvc.ir.graph import Graph
from adsvc.ir.opdef import BILINEAR, OPS
from adsvc.passes.activity import active_nodes, wrt_nodes
from adsvc.passes.forward import jvp_graph
from adsvc.passes.loop_rules import carry_budget, share_saved
from adsvc.passes.reverse import vjp_graph
from adsvc.passes.simplify import simplify
from adsvc_protocol import dtypes
from adsvc_protocol.errors import InvalidRequestError, LimitExceededError
from adsvc_protocol.modes import normalize_modes


def differentiate(graph: Graph, mode="reverse", wrt=None, order: int | None = None,
                  seed: bool = False, check: Checker = None, share: bool = True) -> Graph:
    """The differentiated graph; see protos/README.md for the names it adds.

    Pass 1 differentiates every float output; pass k > 1 differentiates the outputs
    added by pass k-1 (so reverse then forward gives Hessian-vector products). With
    `seed`, a first reverse pass seeds its single scalar output with 1 (plain gradient).
    `check` (optional) is called every few hundred nodes of every pass and may raise to
    stop the work (deadlines, cancellation). `share` (default) lets primal loops read
    their results from the loops a derivative makes (`share_saved`); without it the
    primal nodes stay as they are (explain's rows are those nodes).
    """
    modes = normalize_modes(mode, order)
    wrt_list = wrt_nodes(graph, wrt)
    if not wrt_list:
        raise InvalidRequestError("nothing to differentiate with respect to: the graph has "
                                  "no float inputs", field="wrt")
    targets = [k for k, n in graph.outputs if dtypes.is_float(n.dtype)]
    # Nodes are simplified as they are built (the default builder's rewriter), so the derivative
    # graphs need no second pass; the input graph gets one, which is also the guarantee
    # for graphs built by other means.
    g = simplify(graph, check)
    # derivatives of a graph without loops or branches have none: then neither the
    # sharing of loops nor the nesting limit needs a walk over the (larger) result
    has_subgraphs = g.depth > 0
    with compiling(check):  # the passes that derivative rules run over loop bodies check too
        for k, m in enumerate(modes, start=1):
            if m == "forward":
                g, targets = jvp_graph(g, wrt_list, targets, k, check)
            else:
                g, targets = vjp_graph(g, wrt_list, targets, seed=seed and k == 1, k=k,
                                       check=check)
    if not has_subgraphs:
        return g
    if share:
        g = share_saved(g)
    if g.depth > MAX_DEPTH:
        raise LimitExceededError(
            f"the differentiated graph nests loop bodies {g.depth} deep (a checkpointed "
            f"loop's derivative adds a level); the limit is {MAX_DEPTH}",
            field="differentiation")
    return g


# nodes a pass adds per active node (measured on random scalar graphs: 2.1; the
# differentiated graph is 3.1x the original)
GROWTH_PER_PASS = 2


def estimate_nodes(graph: Graph, modes, wrt) -> int:
    """About how many nodes differentiating `graph` for `modes` gives, before building
    anything: its nodes, plus GROWTH_PER_PASS per active nonlinear node and pass,
    compounding (their derivatives are nonlinear again), plus one per active linear node
    (`OpDef.linear`) and pass."""
    n = graph.total_nodes
    if not modes:
        return n
    targets = [node for _, node in graph.outputs if dtypes.is_float(node.dtype)]
    active = active_nodes(graph, wrt_nodes(graph, wrt), targets)
    linear = sum(1 for node in graph.nodes if id(node) in active and _linear(node, active))
    nonlinear = len(active) - linear
    k = len(modes)
    return n + nonlinear * ((1 + GROWTH_PER_PASS) ** k - 1) + linear * k


def _linear(node, active: set[int]) -> bool:
    """Is differentiating `node` linear (OpDef.linear; a product with one active operand)?"""
    if not node.inputs:
        return False
    kind = OPS[node.op].linear
    if kind == BILINEAR:
        return sum(1 for i in node.inputs if id(i) in active) <= 1
    return bool(kind)


def compile_graph(graph: Graph, modes: tuple[str, ...], wrt, seed: bool,
                  check: Checker = None, eval_bytes: int | None = None) -> Graph:
    """What every client evaluates: `graph` simplified (no modes) or differentiated.
    `check` may raise to stop the work (deadlines, cancellation). `eval_bytes`, the
    evaluation memory budget: reverse mode checkpoints a loop whose stored carries would
    take more than a quarter of it (None: the default budget, `loop_rules.carry_budget`)."""
    if not modes:
        return simplify(graph, check)
    with carry_budget(eval_bytes // 4 if eval_bytes else None):
        return differentiate(graph, list(modes), None if wrt is None else list(wrt),
                             order=len(modes), seed=seed, check=check)


def signature(graph: Graph) -> tuple[dict, dict]:
    """({input name: (dtype, shape)}, {output name: (dtype, shape)}) in graph order."""
    return ({n.name: (n.dtype, n.shape) for n in graph.inputs},
            {k: (n.dtype, n.shape) for k, n in graph.outputs})
