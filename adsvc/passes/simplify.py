"""The simplification pass: every node of a graph rebuilt through a builder with the
exact rewrites of `adsvc.ir.rewrites` (dead code vanishes by construction: a graph
holds only the nodes reachable from its outputs).

Nodes made by the default builder are rewritten as they are made, so for graphs built
in this process the pass changes nothing; it is the guarantee for graphs built by other
means (a builder without a rewriter, say).
"""

from __future__ import annotations

from adsvc.interrupt import CHECK_EVERY, Checker
from adsvc.ir.graph import Graph
from adsvc.ir.node import BUILDER, Builder, Node


def simplify(graph: Graph, check: Checker = None, builder: Builder = BUILDER) -> Graph:
    """`graph` with every node rebuilt by `builder` (which applies its rewriter)."""
    rewrite = builder.rewriter
    new: dict[int, Node] = {}
    for k, node in enumerate(graph.nodes):
        if check is not None and k % CHECK_EVERY == 0:
            check()
        if not node.inputs:
            new[id(node)] = node
            continue
        ins = tuple(new[id(i)] for i in node.inputs)
        if all(a is b for a, b in zip(ins, node.inputs)):
            new[id(node)] = node if rewrite is None else rewrite(node, builder)
        else:
            new[id(node)] = builder.make(node.op, ins, dict(node.attrs), label=node.label)
    return Graph(graph.inputs, [(k, new[id(v)]) for k, v in graph.outputs], graph.name)
