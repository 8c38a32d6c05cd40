"""Inlining: a graph's outputs with its inputs bound to nodes of another graph.

`call(graph, x=node, ...)` uses a graph — traced, received, loaded from a file or
differentiated — inside a trace: its nodes are rebuilt on the bound nodes (so they are
simplified and shared like any others) and its outputs come back by name. The function
transformations (`transforms.py`) are built on it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from adsvc.ir.codec import graph_from_proto
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, constant, make
from adsvc.passes.specialize import specialize
from adsvc_protocol.dims import bind
from adsvc_protocol.errors import DTypeError, InputError, InvalidRequestError, ShapeError
from adsvc_protocol.feeds import convert_feed
from adsvc_protocol.proto import ir_pb2


def inline(graph: Graph, bindings: Mapping[str, Node]) -> dict[str, Node]:
    """{output name: node} of `graph` with each input named in `bindings` replaced by
    its node (types must match; unbound inputs stay inputs)."""
    new: dict[int, Node] = {}
    for name, node in bindings.items():
        new[id(graph.input(name))] = node
    for n in graph.nodes:
        if id(n) in new:
            continue
        if not n.inputs:
            new[id(n)] = n
            continue
        ins = tuple(new[id(i)] for i in n.inputs)
        same = all(a is b for a, b in zip(ins, n.inputs))
        new[id(n)] = n if same else make(n.op, ins, dict(n.attrs), label=n.label)
    return {name: new[id(n)] for name, n in graph.outputs}


def _bind(graph: Graph, name: str, value) -> Node:
    """`value` (a node, number or array) as the node bound to input `name`; typed errors
    name the input when its dtype or shape is not the declared one."""
    declared = graph.input(name)
    field = f"inputs.{name}"
    if not isinstance(value, Node):
        arr = convert_feed(name, value, declared.dtype, declared.shape, field)
        return constant(np.asarray(arr), declared.dtype)
    if value.dtype != declared.dtype:
        raise DTypeError(f"input {name!r} is {declared.dtype}; the value bound to it is "
                         f"{value.dtype} (use adsvc.cast)", field=field)
    if value.shape != declared.shape:
        raise ShapeError(f"input {name!r} has shape {list(declared.shape)}; the value bound "
                         f"to it has shape {list(value.shape)}", field=field)
    return value


def call(graph, inputs: Mapping[str, object] | None = None, **kw) -> dict[str, Node]:
    """The outputs of `graph` (an adsvc graph or a Graph proto), by name, computed from
    `inputs` (nodes of the trace being built, numbers or arrays; every input bound)."""
    if isinstance(graph, ir_pb2.Graph):
        graph = graph_from_proto(graph)
    if not isinstance(graph, Graph):
        raise InvalidRequestError(f"call needs an adsvc graph or an adsvc.v1.Graph proto, "
                                  f"got {type(graph).__name__}", field="graph")
    given = {**(inputs or {}), **kw}
    names = graph.input_names
    for name in given:
        if name not in names:
            raise InputError(f"the called graph has no input {name!r} (inputs: "
                             f"{', '.join(names) or 'none'})", field=f"inputs.{name}")
    missing = [n for n in names if n not in given]
    if missing:
        raise InputError(f"missing input {missing[0]!r} of the called graph",
                         field=f"inputs.{missing[0]}")
    if graph.symbolic:  # bound by the values' shapes (numbers, or the caller's symbols)
        graph = specialize(graph, bind({n.name: (n.dtype, n.shape) for n in graph.inputs},
                                       {k: np.shape(v) if not isinstance(v, Node) else v.shape
                                        for k, v in given.items()}))
    return inline(graph, {name: _bind(graph, name, v) for name, v in given.items()})
