"""Algebraic simplification and constant folding (dead code vanishes by construction:
a graph holds only the nodes reachable from its outputs).

Rules are exact in IEEE arithmetic, signed zeros included: x*1, x/1, x + (-0.0),
x - (+0.0), (-0.0) - x = neg(x) (only when the shape does not change), neg(neg(x)),
identity reshape/transpose/cast/broadcast, where on a constant condition, and folding
of small all-constant subexpressions. (x + 0.0 is not x when x is -0.0.)
"""

from __future__ import annotations

import numpy as np

from adsvc.interrupt import CHECK_EVERY, Checker
from adsvc.ir import node as node_module
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, constant, make
from adsvc.ops import api as A
from adsvc.ops.registry import OPS

FOLD_LIMIT = 64  # fold constant subexpressions with at most this many elements


def _scalar_const(node: Node):
    """The value if `node` is a constant (or a broadcast constant) with all-equal elements."""
    while node.op == "broadcast_to":
        node = node.inputs[0]
    if node.op != "constant" or node.value.size == 0:
        return None
    v = node.value.flat[0]
    return v if node.value.size == 1 or np.all(node.value == v) else None


def _is(node, v) -> bool:
    c = _scalar_const(node)
    return c is not None and c == v and not isinstance(c, np.bool_)


def _is_zero(node, negative: bool) -> bool:
    """Every element is a zero of the given sign (-0.0 is the identity of +, +0.0 of -)."""
    while node.op == "broadcast_to":
        node = node.inputs[0]
    v = node.value
    return (node.op == "constant" and v.dtype.kind == "f" and v.size > 0
            and not v.any() and bool((np.signbit(v) == negative).all()))


def _rewrite(n: Node) -> Node:
    op, ins = n.op, n.inputs
    if op in ("mul", "mul_or_zero"):
        a, b = ins
        if _is(b, 1) and a.shape == n.shape:
            return a
        if _is(a, 1) and b.shape == n.shape:
            return b
    elif op in ("add", "sub"):
        a, b = ins
        integer = n.dtype not in ("float64", "float32")  # no signed zeros: any 0 will do
        if a.shape == n.shape and (_is(b, 0) if integer else _is_zero(b, op == "add")):
            return a
        if op == "add" and b.shape == n.shape and (_is(a, 0) if integer else
                                                    _is_zero(a, True)):
            return b
        if op == "sub" and b.shape == n.shape and (_is(a, 0) if integer else
                                                    _is_zero(a, True)):
            return A.neg(b)
    elif op == "div":
        if _is(ins[1], 1) and ins[0].shape == n.shape:
            return ins[0]
    elif op == "neg" and ins[0].op == "neg":
        return ins[0].inputs[0]
    elif op in ("reshape", "broadcast_to", "cast") and \
            ins[0].shape == n.shape and ins[0].dtype == n.dtype:
        return ins[0]
    elif op == "reshape" and ins[0].op == "reshape":
        return A.reshape(ins[0].inputs[0], n.shape)
    elif op == "transpose" and list(n.attr("perm")) == list(range(n.ndim)):
        return ins[0]
    elif op == "where":
        c = _scalar_const(ins[0])
        if c is not None:
            pick = ins[1] if c else ins[2]
            return A.broadcast_to(pick, n.shape)
    if (ins and n.size <= FOLD_LIMIT and all(i.op == "constant" for i in ins)
            and OPS[op].kernel is not None):
        try:
            with np.errstate(all="ignore"):
                v = OPS[op].kernel(dict(n.attrs))(*[i.value for i in ins])
            return constant(np.asarray(v), n.dtype)
        except Exception:  # leave it for evaluation to report, with the node named
            return n
    return n


def rewrite(n: Node) -> Node:
    """`n` rewritten to a fixed point."""
    prev = None
    while prev is not n:
        prev, n = n, _rewrite(n)
    return n


node_module.REWRITE = rewrite  # nodes are simplified as they are built


def simplify(graph: Graph, check: Checker = None) -> Graph:
    """Rewrite every node (a no-op for graphs built after this module was imported, whose
    nodes were rewritten as they were built; kept as the pass that guarantees it)."""
    new: dict[int, Node] = {}
    for k, node in enumerate(graph.nodes):
        if check is not None and k % CHECK_EVERY == 0:
            check()
        if not node.inputs:
            new[id(node)] = node
            continue
        ins = tuple(new[id(i)] for i in node.inputs)
        n = node if all(a is b for a, b in zip(ins, node.inputs)) else \
            make(node.op, ins, dict(node.attrs), label=node.label)
        new[id(node)] = rewrite(n)
    return Graph(graph.inputs, [(k, new[id(v)]) for k, v in graph.outputs], graph.name)
