"""Forward mode: the JVP transformation pass.

Adds an input ``tangent{k}:<x>`` per wrt input and an output ``tangent{k}:<o>`` per
target output (k is empty for the first derivative pass, else the pass number).
"""

from __future__ import annotations

from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, input_node
from adsvc.ops import api as A
from adsvc.ops.registry import OPS
from adsvc.passes.activity import active_nodes


def jvp_graph(graph: Graph, wrt: list[Node], targets: list[str], tag: str = ""
              ) -> tuple[Graph, list[str]]:
    """Return (graph with tangent inputs/outputs, names of the new outputs)."""
    target_nodes = [graph.output(t) for t in targets]
    active = active_nodes(graph, wrt, target_nodes)
    tangent_inputs = [input_node(f"tangent{tag}:{w.name}", w.dtype, w.shape) for w in wrt]
    tan: dict[int, Node] = {id(w): t for w, t in zip(wrt, tangent_inputs)}
    for node in graph.nodes:
        if id(node) not in active or id(node) in tan:
            continue
        ts = [tan.get(id(i)) for i in node.inputs]
        t = OPS[node.op].jvp(node, ts)
        if t is not None:
            tan[id(node)] = t
    new = []
    for name, node in zip(targets, target_nodes):
        t = tan.get(id(node))
        new.append((f"tangent{tag}:{name}", A.zeros_like(node) if t is None else t))
    out = Graph(list(graph.inputs) + tangent_inputs, list(graph.outputs) + new, graph.name)
    return out, [n for n, _ in new]
