"""Reverse mode: the VJP transformation pass (backpropagation).

Adds an input ``cotangent{k}:<o>`` per target output (none when `seed` is set: the
single scalar target is seeded with 1) and an output ``grad{k}:<x>`` per wrt input.
Walks the nodes in reverse topological order, asks each op's VJP rule for its operands'
cotangents and sums the contributions of nodes with several users. The rules reuse the
primal nodes, so evaluation computes every forward value once and shares it.
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
from adsvc_protocol.recipes import scalar_output


def vjp_graph(graph: Graph, wrt: list[Node], targets: list[str], seed: bool = False,
              k: int = 1, check: Checker = None) -> tuple[Graph, list[str]]:
    """Return (graph with cotangent inputs and gradient outputs, new output names)."""
    in_names = [] if seed else [names.cotangent(t, k) for t in targets]
    out_names = [names.grad(w.name, k) for w in wrt]
    check_new_names(graph, in_names, out_names)
    target_nodes = [graph.output(t) for t in targets]
    active = active_nodes(graph, wrt, target_nodes)
    ct: dict[int, Node] = {}
    new_inputs = []
    if seed:  # a plain gradient: the one scalar float output is seeded with 1
        t = graph.output(scalar_output(
            {name: (n.dtype, n.shape) for name, n in zip(targets, target_nodes)},
            primal_only=False))
        ct[id(t)] = A.full((), 1.0, t.dtype)
    else:
        for name, t in zip(in_names, target_nodes):
            c = input_node(name, t.dtype, t.shape)
            new_inputs.append(c)
            ct[id(t)] = A.add_any(ct.get(id(t)), c)
    nodes = graph.nodes
    for index in range(len(nodes) - 1, -1, -1):
        node = nodes[index]
        c = ct.get(id(node))
        if c is None or id(node) not in active or not node.inputs:
            continue
        if check is not None and index % CHECK_EVERY == 0:
            check()
        with naming_node(index, node):
            in_cts = OPS[node.op].vjp(node, c)
            for inp, ci in zip(node.inputs, in_cts):
                if ci is not None and id(inp) in active:
                    ct[id(inp)] = A.add_any(ct.get(id(inp)), ci)
    new = []
    for name, w in zip(out_names, wrt):
        g = ct.get(id(w))
        new.append((name, A.zeros_like(w) if g is None else g))
    out = Graph(list(graph.inputs) + new_inputs, list(graph.outputs) + new, graph.name)
    return out, out_names
