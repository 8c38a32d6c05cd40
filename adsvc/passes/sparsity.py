"""Sparsity detection: the structural pattern of a Jacobian or Hessian, element by element.

Every node gets a boolean CSR matrix (node.size × the total size of the wrt inputs)
saying which input elements each of its elements may depend on; a node's matrix is
the union over its operands of the op's local pattern (`OpDef.sparsity`, a rule of
`adsvc.ops.patterns`; the "dense" rule where an op declares none) times the operand's
matrix. Only active nodes get one (activity analysis: ops with a zero or no derivative,
and integer/bool values, cut the path), and a matrix is dropped after its last use.

The Hessian pattern is the Jacobian pattern of the gradient graph (`grad:x` of the
reverse pass, seeded) with respect to the same inputs — exact-structural, through the
very derivative rules that the Hessian-vector products evaluate — made symmetric.
`sparsity` adds the colorings (`adsvc.passes.coloring`) and gives an
`adsvc_protocol.sparse.Sparsity`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import scipy.sparse as sp

from adsvc.interrupt import CHECK_EVERY, Checker
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node
from adsvc.ir.opdef import OPS
from adsvc.ops import patterns
from adsvc.passes.activity import active_nodes, naming_node, wrt_nodes
from adsvc.passes.coloring import distance1_coloring, jacobian_colorings, star_coloring
from adsvc.passes.pipeline import compile_graph
from adsvc_protocol import dtypes, names
from adsvc_protocol.dims import symbols_of
from adsvc_protocol.errors import InvalidRequestError, LimitExceededError
from adsvc_protocol.sparse import (
    DIAGONAL,
    FORWARD,
    HESSIAN,
    JACOBIAN,
    REVERSE,
    STAR,
    Sparsity,
)


def _limit(nnz: int, limit: int | None, what: str) -> None:
    if limit and nnz > limit:
        raise LimitExceededError(
            f"the sparsity pattern of {what} has more than {limit} entries (the limit of "
            "pattern entries); the derivative is too dense for a sparse computation",
            field="graph")


def _times(m, p: sp.csr_matrix, limit: int | None, what: str) -> sp.csr_matrix:
    """m @ p for a local pattern m, refused beyond `limit` entries before it is built
    (row chunks bound what is computed when the cheap upper bound is over it)."""
    if m is patterns.IDENTITY:
        return p
    bound = m.astype(np.int64) @ np.diff(p.indptr)
    if not limit or int(bound.sum()) <= limit:
        return (m @ p).tocsr()
    cum = np.cumsum(bound)
    parts, total, start = [], 0, 0
    while start < m.shape[0]:
        base = int(cum[start - 1]) if start else 0
        stop = max(int(np.searchsorted(cum, base + limit, side="right")), start + 1)
        part = (m[start:stop] @ p).tocsr()
        total += part.nnz
        _limit(total, limit, what)
        parts.append(part)
        start = stop
    return sp.vstack(parts, format="csr")


def _node_pattern(node: Node, pats: dict, limit, what: str):
    rule = OPS[node.op].sparsity or patterns.dense
    if rule is patterns.dense:
        for x in node.inputs:
            if id(x) in pats:
                _limit(node.size * x.size, limit, what)
    acc = None
    for x, m in zip(node.inputs, rule(node)):
        px = pats.get(id(x))
        if m is None or px is None:
            continue
        term = _times(m, px, limit, what)
        acc = term if acc is None else (acc + term).tocsr()
        _limit(acc.nnz, limit, what)
    return acc


def jacobian_pattern(graph: Graph, wrt: list[Node], targets: list[Node],
                     check: Checker = None, max_nnz: int | None = None) -> sp.csr_matrix:
    """The boolean pattern of d(targets)/d(wrt): rows are the targets' elements, columns
    the wrt inputs' elements (each flattened, concatenated in order). LimitExceededError
    when a node's pattern has more than `max_nnz` entries; `check` may raise to stop."""
    total = sum(w.size for w in wrt)
    pats: dict[int, sp.csr_matrix] = {}
    start = 0
    for w in wrt:
        pats[id(w)] = patterns.boolean(np.arange(w.size), start + np.arange(w.size),
                                       (w.size, total))
        start += w.size
    active = active_nodes(graph, wrt, targets)
    nodes = [(i, n) for i, n in enumerate(graph.nodes) if id(n) in active and id(n) not in pats]
    uses = Counter(id(i) for _, n in nodes for i in n.inputs)
    uses.update(id(t) for t in targets)
    for k, (index, node) in enumerate(nodes):
        if check is not None and k % CHECK_EVERY == 0:
            check()
        with naming_node(index, node):
            p = _node_pattern(node, pats, max_nnz, f"node %{index} ({node.op})")
        if p is not None:
            pats[id(node)] = p
        for i in node.inputs:
            uses[id(i)] -= 1
            if uses[id(i)] <= 0:
                pats.pop(id(i), None)
    rows = [pats.get(id(t)) if pats.get(id(t)) is not None
            else sp.csr_matrix((t.size, total), dtype=bool) for t in targets]
    if not rows:
        return sp.csr_matrix((0, total), dtype=bool)
    out = sp.vstack(rows, format="csr").astype(bool)
    out.sort_indices()
    return out


def float_outputs(graph: Graph) -> list[str]:
    """The outputs a Jacobian has rows for: the float ones, in order."""
    return [k for k, n in graph.outputs if dtypes.is_float(n.dtype)]


def hessian_pattern(graph: Graph, wrt, check: Checker = None,
                    max_nnz: int | None = None) -> sp.csr_matrix:
    """The symmetric boolean pattern of the Hessian of the one scalar float output
    (module docstring)."""
    grad = compile_graph(graph, ("reverse",), None if wrt is None else tuple(wrt), True,
                         check)
    ws = wrt_nodes(grad, wrt)
    targets = [grad.output(names.grad(w.name)) for w in ws]
    p = jacobian_pattern(grad, ws, targets, check, max_nnz)
    h = (p + p.T).tocsr().astype(bool)
    h.sort_indices()
    return h


def _compact(colors: np.ndarray, used: np.ndarray) -> np.ndarray:
    """`colors` with -1 where nothing is to be seeded (no entries) and the other colors
    renumbered 0, 1, ... (no sweep is spent on a color only empty vertices have)."""
    out = np.full(colors.shape, -1, dtype=np.int32)
    if used.any():
        out[used] = np.unique(colors[used], return_inverse=True)[1]
    return out


def _sig(nodes) -> dict:
    return {n.name: (n.dtype, n.shape) for n in nodes}


def sparsity(graph: Graph, kind: str, wrt=None, check: Checker = None,
             max_nnz: int | None = None) -> Sparsity:
    """The pattern of the Jacobian (of the float outputs) or the Hessian (of the one
    scalar float output) of `graph` with respect to `wrt` (None: every float input),
    with its colorings: forward and reverse for a Jacobian, star and diagonal for a
    Hessian."""
    if graph.symbolic:
        syms = sorted(symbols_of({n.name: (n.dtype, n.shape) for n in graph.inputs}))
        raise InvalidRequestError(
            f"sparse derivatives need concrete sizes; this graph has symbolic dimensions "
            f"({', '.join(syms) or 'inside'}): specialize it first, e.g. "
            f"adsvc.specialize(g, {(syms or ['n'])[0]}=100)", field="graph")
    ws = wrt_nodes(graph, wrt)
    if not ws:
        raise InvalidRequestError("nothing to differentiate with respect to: the graph has "
                                  "no float inputs", field="wrt")
    if kind == JACOBIAN:
        outs = float_outputs(graph)
        if not outs:
            raise InvalidRequestError("the graph has no float output to differentiate",
                                      field="outputs")
        targets = [graph.output(k) for k in outs]
        p = jacobian_pattern(graph, ws, targets, check, max_nnz)
        rows, cols = np.diff(p.indptr) > 0, np.bincount(p.indices, minlength=p.shape[1]) > 0
        forward, reverse = jacobian_colorings(p)
        return Sparsity(JACOBIAN, {k: (n.dtype, n.shape) for k, n in zip(outs, targets)},
                        _sig(ws), p, {FORWARD: _compact(forward, cols),
                                      REVERSE: _compact(reverse, rows)})
    if kind == HESSIAN:
        h = hessian_pattern(graph, [w.name for w in ws], check, max_nnz)
        used = np.diff(h.indptr) > 0
        return Sparsity(HESSIAN, _sig(ws), _sig(ws), h,
                        {STAR: _compact(star_coloring(h, check), used),
                         DIAGONAL: _compact(distance1_coloring(h), used)})
    raise InvalidRequestError(f"unknown sparsity kind {kind!r} (use 'jacobian' or "
                              "'hessian')", field="kind")
