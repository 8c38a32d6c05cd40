"""Reverse mode: the VJP transformation pass (backpropagation).

Adds an input ``cotangent{k}:<o>`` per target output (none when `seed` is set: the
single scalar target is seeded with 1) and an output ``grad{k}:<x>`` per wrt input.
Walks the nodes in reverse topological order, asks each op's VJP rule for its operands'
cotangents and sums the contributions of nodes with several users. The rules reuse the
primal nodes, so evaluation computes every forward value once and shares it.
"""

from __future__ import annotations

from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, input_node
from adsvc.ops import api as A
from adsvc.ops.registry import OPS
from adsvc.passes.activity import active_nodes
from adsvc_client.errors import InvalidRequestError


def vjp_graph(graph: Graph, wrt: list[Node], targets: list[str], seed: bool = False,
              tag: str = "") -> tuple[Graph, list[str]]:
    """Return (graph with cotangent inputs and gradient outputs, new output names)."""
    ct_tag, grad_tag = f"cotangent{tag}", f"grad{tag}"
    target_nodes = [graph.output(t) for t in targets]
    active = active_nodes(graph, wrt, target_nodes)
    ct: dict[int, Node] = {}
    new_inputs = []
    if seed:
        if len(target_nodes) != 1 or target_nodes[0].shape != ():
            shapes = ", ".join(f"{t}{list(n.shape)}" for t, n in zip(targets, target_nodes))
            raise InvalidRequestError(
                "a plain gradient needs exactly one scalar float output; got " + (shapes or
                "none") + " (pass cotangents instead)", field="outputs")
        t = target_nodes[0]
        ct[id(t)] = A.full((), 1.0, t.dtype)
    else:
        for name, t in zip(targets, target_nodes):
            c = input_node(f"{ct_tag}:{name}", t.dtype, t.shape)
            new_inputs.append(c)
            ct[id(t)] = A.add_any(ct.get(id(t)), c)
    for node in reversed(graph.nodes):
        c = ct.get(id(node))
        if c is None or id(node) not in active or not node.inputs:
            continue
        for inp, ci in zip(node.inputs, OPS[node.op].vjp(node, c)):
            if ci is not None and id(inp) in active:
                ct[id(inp)] = A.add_any(ct.get(id(inp)), ci)
    new = []
    for w in wrt:
        g = ct.get(id(w))
        new.append((f"{grad_tag}:{w.name}", A.zeros_like(w) if g is None else g))
    out = Graph(list(graph.inputs) + new_inputs, list(graph.outputs) + new, graph.name)
    return out, [n for n, _ in new]
