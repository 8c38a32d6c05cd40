"""Forward mode: the JVP transformation pass.

Adds an input ``tangent{k}:<x>`` per wrt input and an output ``tangent{k}:<o>`` per
target output, k the pass number (names from `adsvc_protocol.names`).
"""

from __future__ import annotations

from adsvc.interrupt import CHECK_EVERY, Checker
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, input_node
from adsvc.ir.opdef import OPS
from adsvc.ops import api as A
from adsvc.passes.activity import (
    active_nodes,
    check_new_names,
    naming_node,
)
from adsvc_protocol import names


def jvp_graph(graph: Graph, wrt: list[Node], targets: list[str], k: int = 1,
              check: Checker = None) -> tuple[Graph, list[str]]:
    """Return (graph with tangent inputs/outputs, names of the new outputs)."""
    in_names = [names.tangent(w.name, k) for w in wrt]
    out_names = [names.tangent(t, k) for t in targets]
    check_new_names(graph, in_names, out_names)
    target_nodes = [graph.output(t) for t in targets]
    active = active_nodes(graph, wrt, target_nodes)
    tangent_inputs = [input_node(n, w.dtype, w.shape) for n, w in zip(in_names, wrt)]
    tan: dict[int, Node] = {id(w): t for w, t in zip(wrt, tangent_inputs)}
    for index, node in enumerate(graph.nodes):
        if id(node) not in active or id(node) in tan:
            continue
        if check is not None and index % CHECK_EVERY == 0:
            check()
        with naming_node(index, node):
            t = OPS[node.op].jvp(node, [tan.get(id(i)) for i in node.inputs])
        if t is not None:
            tan[id(node)] = t
    new = []
    for name, node in zip(out_names, target_nodes):
        t = tan.get(id(node))
        new.append((name, A.zeros_like(node) if t is None else t))
    out = Graph(list(graph.inputs) + tangent_inputs, list(graph.outputs) + new, graph.name)
    return out, out_names
