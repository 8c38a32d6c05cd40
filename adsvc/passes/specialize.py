"""Binding symbolic dimensions: `specialize(graph, {"n": 5})` is the graph with n = 5.

A graph traced with symbolic dimensions (`adsvc.f64("n", 3)`) is differentiated once,
symbolically; to evaluate it at some sizes, the evaluator binds the symbols from the
feeds and specializes: every node whose type or attributes mention a symbol is rebuilt
with the numbers, so the shape rules check it again, concretely (a slice past the end
at this size is an error here, naming the node and the binding). Loop bodies and
branches are specialized with it.
"""

from __future__ import annotations

from collections.abc import Mapping

from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, input_node, make
from adsvc_protocol.dims import Dim, concrete, symbols_of
from adsvc_protocol.errors import AdsvcError, InvalidRequestError


def _bind(v, binding: Mapping[str, int]):
    if isinstance(v, Dim):
        return v.evaluate(binding)
    if isinstance(v, Graph):
        return specialize(v, binding)
    if isinstance(v, tuple):
        return tuple(_bind(x, binding) for x in v)
    return v


def _mentions(v) -> bool:
    if isinstance(v, Dim):
        return True
    if isinstance(v, Graph):
        return v.symbolic
    return isinstance(v, tuple) and any(_mentions(x) for x in v)


def specialize(graph: Graph, binding: Mapping[str, int]) -> Graph:
    """`graph` with every symbolic dimension bound by `binding` ({symbol: size})."""
    if not graph.symbolic:
        return graph
    where = ", ".join(f"{k} = {v}" for k, v in sorted(binding.items()))
    new: dict[int, Node] = {}
    for index, n in enumerate(graph.nodes):
        if n.op == "input":
            new[id(n)] = input_node(n.name, n.dtype, concrete(n.shape, binding))
            continue
        ins = tuple(new[id(i)] for i in n.inputs)
        if all(a is b for a, b in zip(ins, n.inputs)) and not any(
                _mentions(v) for _, v in n.attrs):
            new[id(n)] = n
            continue
        try:
            new[id(n)] = make(n.op, ins, {k: _bind(v, binding) for k, v in n.attrs},
                              label=n.label)
        except AdsvcError as e:
            raise type(e)(f"with {where}: node %{index} ({n.op}): {e.description}",
                          field=e.field or f"nodes[id={index}]") from None
    return Graph([new[id(n)] for n in graph.inputs],
                 [(k, new[id(n)]) for k, n in graph.outputs], graph.name)


def specialize_at(graph: Graph, sizes: Mapping[str, int] | None = None, **kw) -> Graph:
    """`adsvc.specialize(g, n=100)`: the graph with its symbolic dimensions bound (every
    symbol of its inputs must be given; the graph without symbols is returned as is)."""
    binding = {**(sizes or {}), **kw}
    known = symbols_of({n.name: (n.dtype, n.shape) for n in graph.inputs})
    missing = sorted(known - set(binding))
    if missing:
        raise InvalidRequestError(f"give a size for every symbol: {', '.join(missing)} "
                                  "missing", field=f"sizes.{missing[0]}")
    for k, v in binding.items():
        if k not in known:
            raise InvalidRequestError(f"the graph has no dimension {k!r} (it has: "
                                      f"{', '.join(sorted(known)) or 'none'})", field=f"sizes.{k}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidRequestError(f"size {k} must be an int >= 0, got {v!r}",
                                      field=f"sizes.{k}")
    return specialize(graph, binding)
