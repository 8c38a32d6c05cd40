"""A graph: declared inputs and named outputs over interned nodes."""

from __future__ import annotations

import hashlib
from functools import cached_property

from adsvc.ir.node import Node
from adsvc.ir.text import to_text
from adsvc_protocol.dims import Dim


def subgraphs(node: Node) -> list[tuple[str, tuple[Graph, ...]]]:
    """[(attribute, its graphs)] of the sub-graphs a node holds: a loop's `body` (one),
    a cond's `branches` (several)."""
    out = []
    for k, v in node.attrs:
        graphs = v if isinstance(v, tuple) else (v,)
        if graphs and all(isinstance(g, Graph) for g in graphs):
            out.append((k, graphs))
    return out


class Graph:
    """Immutable: inputs (op "input" nodes) and (name, node) outputs.

    The nodes of the graph are those reachable from the outputs; `nodes` lists them in a
    deterministic topological order (operands before users), inputs first.
    """

    def __init__(self, inputs, outputs, name: str = ""):
        self.inputs: tuple[Node, ...] = tuple(inputs)
        self.outputs: tuple[tuple[str, Node], ...] = tuple(outputs)
        self.name = name

    @cached_property
    def nodes(self) -> list[Node]:
        """The nodes in topological order: every input first (used or not), then the nodes
        the outputs reach, operands before users."""
        order: list[Node] = list(self.inputs)
        seen = {id(n) for n in order}
        for _, root in self.outputs:
            if id(root) in seen:
                continue
            stack = [(root, 0)]
            while stack:
                node, i = stack.pop()
                if i < len(node.inputs):
                    stack.append((node, i + 1))
                    child = node.inputs[i]
                    if id(child) not in seen:
                        stack.append((child, 0))
                elif id(node) not in seen:
                    seen.add(id(node))
                    order.append(node)
        return order

    @cached_property
    def total_nodes(self) -> int:
        """How many nodes the graph holds with its sub-graphs (loop bodies, branches):
        what node limits count."""
        return len(self.nodes) + sum(g.total_nodes for n in self.nodes
                                     for _, gs in subgraphs(n) for g in gs)

    @cached_property
    def depth(self) -> int:
        """How deep sub-graphs nest in it (0: none; a loop body: 1; a loop in it: 2 ...)."""
        return max((1 + g.depth for n in self.nodes for _, gs in subgraphs(n) for g in gs),
                   default=0)

    @cached_property
    def symbolic(self) -> bool:
        """Does a type or attribute in it (or in its sub-graphs) have a symbolic dimension
        (`adsvc_protocol.dims.Dim`)? Then it is evaluated through `passes.specialize`."""
        for n in self.nodes:
            shapes = [n.shape] + [sh for _, sh in n.types or ()]
            if any(isinstance(d, Dim) for sh in shapes for d in sh):
                return True
            if any(isinstance(x, Dim) for _, v in n.attrs
                   for x in (v if isinstance(v, tuple) else (v,))):
                return True
            if any(g.symbolic for _, gs in subgraphs(n) for g in gs):
                return True
        return False

    def input(self, name: str) -> Node:
        """The input node called `name`; KeyError if there is none."""
        for n in self.inputs:
            if n.name == name:
                return n
        raise KeyError(name)

    def output(self, name: str) -> Node:
        """The node of the output called `name`; KeyError if there is none."""
        for k, n in self.outputs:
            if k == name:
                return n
        raise KeyError(name)

    @property
    def input_names(self) -> list[str]:
        """The names of the inputs, in order."""
        return [n.name for n in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """The names of the outputs, in order."""
        return [k for k, _ in self.outputs]

    @cached_property
    def key(self) -> bytes:
        """Structural identity from the nodes' digests (no encoding): equal keys mean the
        same inputs, outputs, nodes and name, in any process. Cache keys start here."""
        h = hashlib.blake2b(self.name.encode("utf-8", "surrogatepass"), digest_size=20)
        for n in self.inputs:
            h.update(b"i" + n.digest)
        for name, n in self.outputs:
            h.update(b"o" + name.encode("utf-8", "surrogatepass") + b"\0" + n.digest)
        return h.digest()

    def __eq__(self, other) -> bool:
        return isinstance(other, Graph) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def text(self) -> str:
        """The readable text form (see `adsvc.ir.text`)."""
        return to_text(self)

    def to_dot(self, values=None, **options) -> str:
        """A picture as Graphviz DOT text (see `adsvc.ir.dot`): inputs, constants, ops and
        outputs, primal/tangent/cotangent nodes styled apart, a legend; `values`
        ({node: value}, e.g. `adsvc.explain(g, mode, **inputs).values`) annotate nodes.
        `options`: limit, nearest, title, legend, notes, rankdir."""
        from adsvc.ir import dot

        return dot.to_dot(self, values, **options)

    def render(self, path, values=None, **options):
        """Write the picture to `path` (.svg, .png, .pdf drawn by Graphviz's `dot`, or
        .dot text) and return `path`; arguments as `to_dot`."""
        from adsvc.ir import dot

        dot.write_picture(dot.to_dot(self, values, **options), path)
        return path

    def _repr_svg_(self):
        """Jupyter's rich display: the picture as SVG (None without Graphviz)."""
        from adsvc.ir import dot

        return dot.svg_or_none(dot.to_dot(self))

    def __repr__(self) -> str:
        return (f"<Graph {self.name} {len(self.nodes)} nodes, inputs={self.input_names}, "
                f"outputs={self.output_names}>")
