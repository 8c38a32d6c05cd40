"""Activity analysis: which nodes carry derivatives.

A node is active when it depends on a wrt input through differentiable float ops
(ops whose derivative is zero or none, such as stop_gradient and sign, and
integer/bool values cut the path) *and* some target output depends
on it. Only active nodes get tangents or cotangents.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from adsvc.ir.graph import Graph
from adsvc.ir.node import Node
from adsvc.ir.opdef import OPS, RULE
from adsvc_protocol import dtypes
from adsvc_protocol.errors import AdsvcError, InvalidRequestError, NotDifferentiableError


def check_new_names(graph: Graph, inputs: list[str], outputs: list[str]) -> None:
    """The names a pass adds must not exist yet (a user input called "tangent:x" would
    otherwise be taken for the tangent of x)."""
    for name in inputs:
        if name in graph.input_names:
            raise InvalidRequestError(
                f"the graph already has an input named {name!r}, the name differentiation "
                "gives a new input; rename it", field=f"inputs.{name}")
    for name in outputs:
        if name in graph.output_names:
            raise InvalidRequestError(
                f"the graph already has an output named {name!r}, the name differentiation "
                "gives a new output; rename it", field=f"outputs.{name}")


@contextmanager
def naming_node(index: int, node: Node) -> Iterator[None]:
    """Errors raised by a node's derivative rule name that node (index in Graph.nodes)."""
    try:
        yield
    except AdsvcError as e:
        if e.field:
            raise
        raise type(e)(f"differentiating node %{index} ({node.op} "
                      f"{node.dtype}{list(node.shape)}): {e.description}",
                      field=f"nodes[id={index}]", context=e.context) from None


def wrt_nodes(graph: Graph, wrt) -> list[Node]:
    """The input nodes named by `wrt` (None = every float input); errors name the input."""
    if wrt is None:
        return [n for n in graph.inputs if dtypes.is_float(n.dtype)]
    names = [wrt] if isinstance(wrt, str) else list(wrt)
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"wrt lists an input twice: {names}", field="wrt")
    out = []
    for name in names:
        try:
            node = graph.input(name)
        except KeyError:
            raise InvalidRequestError(
                f"no input named {name!r} (inputs: {', '.join(graph.input_names)})",
                field=f"wrt.{name}") from None
        if not dtypes.is_float(node.dtype):
            raise NotDifferentiableError(
                f"cannot differentiate with respect to input {name!r} of dtype {node.dtype}: "
                "only float64/float32 inputs are differentiable", field=f"inputs.{name}")
        out.append(node)
    return out


def differentiable_type(node: Node) -> bool:
    """A float value, or a node with several results (a loop) of which one is float."""
    if node.types is not None:
        return any(dtypes.is_float(dt) for dt, _ in node.types)
    return dtypes.is_float(node.dtype)


def active_nodes(graph: Graph, wrt: list[Node], targets: list[Node]) -> set[int]:
    """ids of the nodes on a differentiable path from `wrt` to `targets`."""
    forward: set[int] = {id(n) for n in wrt}
    for node in graph.nodes:
        if id(node) in forward or not node.inputs or not differentiable_type(node):
            continue
        if OPS[node.op].derivative != RULE:  # zero or no derivative: the path is cut
            continue
        if any(id(i) in forward for i in node.inputs):
            forward.add(id(node))
    active: set[int] = set()
    stack = [t for t in targets if id(t) in forward]
    while stack:
        node = stack.pop()
        if id(node) in active:
            continue
        active.add(id(node))
        stack.extend(i for i in node.inputs if id(i) in forward and id(i) not in active)
    return active
