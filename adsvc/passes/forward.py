"""Forward mode: the JVP transformation pass.

Adds an input ``tangent{k}:<x>`` per wrt input and an output ``tangent{k}:<o>`` per
target output (k is empty for the first derivative pass, else the pass number).
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


def jvp_graph(graph: Graph, wrt: list[Node], targets: list[str], tag: str = "",
              check: Checker = None) -> tuple[Graph, list[str]]:
    """Return (graph with tangent inputs/outputs, names of the new outputs)."""
    in_names = [f"tangent{tag}:{w.name}" for w in wrt]
    out_names = [f"tangent{tag}:{t}" for t in targets]
    check_new_names(graph, in_names, out_names)
    target_nodes = [graph.output(t) for t in targets]
    active = active_nodes(graph, wrt, target_nodes)
    tangent_inputs = [input_node(n, w.dtype, w.shape) for n, w in zip(in_names, wrt)]
    tan: dict[int, Node] = {id(w): t for w, t in zip(wrt, tangent_inputs)}
    for k, node in enumerate(graph.nodes):
        if id(node) not in active or id(node) in tan:
            continue
        if check is not None and k % CHECK_EVERY == 0:
            check()
        with naming_node(k, node):
            t = OPS[node.op].jvp(node, [tan.get(id(i)) for i in node.inputs])
        if t is not None:
            tan[id(node)] = t
    new = []
    for name, node in zip(out_names, target_nodes):
        t = tan.get(id(node))
        new.append((name, A.zeros_like(node) if t is None else t))
    out = Graph(list(graph.inputs) + tangent_inputs, list(graph.outputs) + new, graph.name)
    return out, out_names
