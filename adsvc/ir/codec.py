"""The one module between Graph protos and the in-memory IR, both ways.

Decoding goes proto -> wire form (`WireGraph`: plain Python, ids and all) -> IR, and
validates on the way: every malformed graph raises a typed error whose `field` names
the offending input, node or output (``nodes[id=7]``) and whose `context` prints the
few nodes around it. The in-memory IR cannot hold an ill-formed graph, so this is the
only place that has to look for one. Encoding numbers nodes by their position in
`Graph.nodes`; evaluation errors use the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from adsvc.interrupt import CHECK_EVERY, Checker
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, constant, input_node, make
from adsvc.ir.opdef import OPS, check_shape
from adsvc_protocol import dtypes
from adsvc_protocol.dims import Dim, is_symbolic
from adsvc_protocol.errors import (
    ArityError,
    AttributeError_,
    CycleError,
    DTypeError,
    DuplicateIdError,
    ForwardReferenceError,
    InvalidGraphError,
    InvalidRequestError,
    LimitExceededError,
    ShapeError,
    UndefinedReferenceError,
    UnknownOpError,
    VersionError,
)
from adsvc_protocol.graphs import GraphCodec, proto_key
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.tensors import (
    TO_ENUM,
    dtype_from_enum,
    from_tensor,
    ints_from_proto,
    ints_to_proto,
    shape_from_proto,
    to_tensor,
    type_to_proto,
)

IR_VERSION = 2  # the newest Graph message layout this reader and writer know
OPSET_VERSION = 2  # the newest op set (names, attributes, semantics) of the op table
# Version 1 graphs keep loading; a graph is written as version 1 unless it needs 2:
# sub-graph attributes (IR 2) and the control-flow ops (opset 2).
OPSET2_OPS = frozenset({"scan", "while_loop", "cond", "element"})
MAX_DEPTH = 16  # sub-graphs nested deeper than this are refused


# -- the wire form ---------------------------------------------------------------------
@dataclass
class WireInput:
    """A graph input as sent: id, name and declared type (dtype None if unset)."""

    id: int
    name: str
    dtype: str | None
    shape: tuple[int, ...]


@dataclass
class WireNode:
    """A node as sent: operand ids, decoded attributes and value, and the type the writer
    declared, if any."""

    id: int
    op: str
    operands: list[int]
    attrs: dict[str, Any] = field(default_factory=dict)
    value: np.ndarray | None = None
    label: str = ""
    declared: tuple[str, tuple[int, ...]] | None = None  # (dtype, shape) if the writer gave it


@dataclass
class WireGraph:
    """A Graph proto as plain Python, not validated yet: what `build_graph` checks."""

    ir_version: int
    opset_version: int
    inputs: list[WireInput]
    nodes: list[WireNode]
    outputs: list[tuple[str, int]]
    name: str = ""


# -- encoding ----------------------------------------------------------------------------
def _is_graph(v) -> bool:
    return isinstance(v, Graph)


def _attr_to_proto(v) -> ir_pb2.AttrValue:
    if isinstance(v, Graph):
        return ir_pb2.AttrValue(graph=_encode(v))
    if isinstance(v, tuple) and v and all(map(_is_graph, v)):
        return ir_pb2.AttrValue(graphs=ir_pb2.GraphList(graphs=[_encode(g) for g in v]))
    if isinstance(v, Dim):
        return ir_pb2.AttrValue(dim=str(v))
    if isinstance(v, bool):
        return ir_pb2.AttrValue(b=v)
    if isinstance(v, int):
        return ir_pb2.AttrValue(i=v)
    if isinstance(v, float):
        return ir_pb2.AttrValue(f=v)
    if isinstance(v, tuple):
        values, symbols = ints_to_proto(v)
        return ir_pb2.AttrValue(ints=ir_pb2.IntList(values=values, symbols=symbols))
    if isinstance(v, str) and v in TO_ENUM:
        return ir_pb2.AttrValue(dtype=TO_ENUM[v])
    return ir_pb2.AttrValue(s=str(v))


def graph_to_proto(graph: Graph) -> ir_pb2.Graph:
    """The Graph proto of `graph` (ids = positions in `graph.nodes`); InvalidGraphError
    if a value does not fit the wire format."""
    try:
        return _encode(graph)
    except (ValueError, OverflowError, TypeError) as e:
        raise InvalidGraphError(f"the graph cannot be encoded: {e}", field="graph") from None


def _encode(graph: Graph) -> ir_pb2.Graph:
    nodes = graph.nodes
    ids = {id(n): i for i, n in enumerate(nodes)}
    ops2 = any(n.op in OPSET2_OPS for n in nodes)
    ir2 = ops2 or graph.symbolic
    g = ir_pb2.Graph(ir_version=2 if ir2 else 1, opset_version=2 if ops2 else 1,
                     name=graph.name)
    for n in nodes:
        t = None if n.types is not None else type_to_proto(n.dtype, n.shape)
        if n.op == "input":
            g.inputs.add(id=ids[id(n)], name=n.name, type=t)
            continue
        pn = g.nodes.add(id=ids[id(n)], op=n.op, operands=[ids[id(i)] for i in n.inputs],
                         label=n.label, type=t)
        for k, v in n.attrs:
            pn.attrs[k].CopyFrom(_attr_to_proto(v))
        if n.op == "constant":
            pn.value.CopyFrom(to_tensor(n.value, n.dtype))
    for name, n in graph.outputs:
        g.outputs.add(name=name, id=ids[id(n)])
    return g


# -- decoding: proto -> wire form ---------------------------------------------------------
@dataclass
class Limits:
    """What one decode may take, shared by a graph and its sub-graphs: nodes in all (a
    running count), elements per constant, nesting depth, name bytes; `check` as ever."""

    max_nodes: int | None = None
    max_elements: int | None = None
    check: Checker = None
    max_name_bytes: int | None = None
    max_depth: int = MAX_DEPTH
    depth: int = 0
    used: int = 0

    def count(self, g: ir_pb2.Graph, where: str) -> None:
        """Add `g`'s inputs and nodes to the running count (LimitExceededError past it)."""
        self.used += len(g.nodes) + len(g.inputs)
        if self.max_nodes is not None and self.used > self.max_nodes:
            raise LimitExceededError(f"the graph has more than {self.max_nodes} nodes with its "
                                     f"sub-graphs; the limit is {self.max_nodes}", field=where)


def _sub_graph(g: ir_pb2.Graph, where: str, limits: Limits) -> Graph:
    """A sub-graph decoded and validated under the shared `limits`; errors inside it name
    the path to it (``nodes[id=4].attrs.body.nodes[id=2]``)."""
    if limits.depth >= limits.max_depth:
        raise LimitExceededError(f"sub-graphs are nested more than {limits.max_depth} deep",
                                 field=where)
    limits.count(g, where)
    limits.depth += 1
    try:
        check_names(g, limits.max_name_bytes)
        return build_graph(proto_to_wire(g, limits), check=limits.check)
    except (InvalidGraphError, LimitExceededError) as e:
        raise type(e)(e.description, field=f"{where}.{e.field}" if e.field else where,
                      context=e.context) from None
    finally:
        limits.depth -= 1


def _attr_from_proto(a: ir_pb2.AttrValue, where: str, limits: Limits):
    kind = a.WhichOneof("value")
    if kind is None:
        raise AttributeError_("attribute value is empty", field=where)
    if kind == "ints":
        return ints_from_proto(a.ints.values, a.ints.symbols, where)
    if kind == "dim":
        return ints_from_proto([-1], [a.dim], where)[0]
    if kind == "dtype":
        return dtype_from_enum(a.dtype, where, AttributeError_)
    if kind == "graph":
        return _sub_graph(a.graph, where, limits)
    if kind == "graphs":
        return tuple(_sub_graph(g, f"{where}[{i}]", limits) for i, g in enumerate(a.graphs.graphs))
    return getattr(a, kind)


def _wire_node(p: ir_pb2.Node, limits: Limits) -> WireNode:
    where = f"nodes[id={p.id}]"
    max_elements = limits.max_elements
    attrs = {k: _attr_from_proto(v, f"{where}.attrs.{k}", limits) for k, v in p.attrs.items()}
    value = (from_tensor(p.value, f"{where}.value", InvalidGraphError, max_elements)
             if p.HasField("value") else None)
    declared = None
    if p.HasField("type") and p.type.dtype:
        declared = (dtype_from_enum(p.type.dtype, f"{where}.type", InvalidGraphError),
                    shape_from_proto(p.type, f"{where}.type"))
    return WireNode(p.id, p.op, list(p.operands), attrs, value, p.label, declared)


def proto_to_wire(g: ir_pb2.Graph, limits: Limits | None = None) -> WireGraph:
    """The wire form of `g` (tensors decoded and bounded, sub-graphs decoded and
    validated; nothing else checked yet)."""
    limits = limits or Limits()
    check = limits.check
    inputs = []
    for p in g.inputs:
        where = f"inputs[id={p.id}]"
        dt = dtype_from_enum(p.type.dtype, where, InvalidGraphError) if p.type.dtype else None
        inputs.append(WireInput(p.id, p.name, dt, shape_from_proto(p.type, where)))
    nodes = []
    for i, p in enumerate(g.nodes):
        if check is not None and i % CHECK_EVERY == 0:
            check()
        nodes.append(_wire_node(p, limits))
    outputs = [(o.name, o.id) for o in g.outputs]
    return WireGraph(g.ir_version, g.opset_version, inputs, nodes, outputs, g.name)


# -- decoding: wire form -> IR, validating --------------------------------------------------
def check_node_count(n: int, max_nodes: int | None) -> None:
    """LimitExceededError if `n` (inputs plus nodes) exceeds `max_nodes` (None: no limit)."""
    if max_nodes is not None and n > max_nodes:
        raise LimitExceededError(f"graph has {n} nodes; the limit is {max_nodes}",
                                 field="nodes")


def _check_versions(wire: WireGraph) -> None:
    if not 1 <= wire.ir_version <= IR_VERSION:
        raise VersionError(f"IR version {wire.ir_version} is not supported (this server reads "
                           f"versions 1 to {IR_VERSION})", field="ir_version")
    if not 1 <= wire.opset_version <= OPSET_VERSION:
        raise VersionError(f"opset version {wire.opset_version} is not supported (this server "
                           f"implements opsets 1 to {OPSET_VERSION})", field="opset_version")
    if wire.opset_version < 2:
        for n in wire.nodes:
            if n.op in OPSET2_OPS:
                raise VersionError(f"op {n.op!r} is in opset 2; the graph declares opset "
                                   f"{wire.opset_version}", field=f"nodes[id={n.id}]")
    if wire.ir_version < 2:
        if any(is_symbolic(w.shape) for w in wire.inputs):
            raise VersionError("symbolic dimensions need IR version 2; the graph declares "
                               f"{wire.ir_version}", field="inputs")
        for n in wire.nodes:
            if any(isinstance(v, Dim) or (isinstance(v, tuple) and is_symbolic(v))
                   for v in n.attrs.values()) or (n.declared and is_symbolic(n.declared[1])):
                raise VersionError("symbolic dimensions need IR version 2; the graph "
                                   f"declares {wire.ir_version}", field=f"nodes[id={n.id}]")
            if any(isinstance(v, Graph) or (isinstance(v, tuple) and v and _is_graph(v[0]))
                   for v in n.attrs.values()):
                raise VersionError("sub-graph attributes need IR version 2; the graph "
                                   f"declares {wire.ir_version}", field=f"nodes[id={n.id}]")


def _build_inputs(wire: WireGraph, env: dict[int, Node]) -> list[Node]:
    names: set[str] = set()
    inputs = []
    for w in wire.inputs:
        where = f"inputs[id={w.id}]"
        if w.id in env:
            raise DuplicateIdError(f"id {w.id} is used twice", field=where)
        if not w.name or w.name in names:
            what = "empty" if not w.name else f"duplicate {w.name!r}"
            raise DuplicateIdError(f"input name is {what}", field=where)
        if w.dtype not in dtypes.DTYPES:
            raise DTypeError(f"input {w.name!r} has no valid dtype", field=where)
        try:
            check_shape(f"input {w.name!r}", w.shape)
        except ShapeError as e:
            raise ShapeError(e.description, field=where) from None
        names.add(w.name)
        env[w.id] = input_node(w.name, w.dtype, w.shape)
        inputs.append(env[w.id])
    return inputs


def _describe(n: WireNode) -> str:
    return f"%{n.id} = {n.op} " + ", ".join(f"%{o}" for o in n.operands)


def _context(wire: WireGraph, index: int) -> str:
    lo, hi = max(0, index - 2), min(len(wire.nodes), index + 3)
    lines = [("--> " if i == index else "    ") + _describe(wire.nodes[i]) for i in range(lo, hi)]
    return "nearby nodes:\n" + "\n".join(lines)


def _find_cycle(wire: WireGraph, start: int) -> list[int] | None:
    g = nx.DiGraph()
    for n in wire.nodes:
        g.add_node(n.id)
        g.add_edges_from((o, n.id) for o in n.operands)
    try:
        edges = nx.find_cycle(g, source=start)
    except nx.NetworkXNoCycle:
        return None
    return [u for u, _ in edges]


class _NodeError(Exception):
    """Raised inside `_build_node`: the error class, message and extra keywords."""

    def __init__(self, cls, msg, **kw):
        super().__init__(msg)
        self.cls, self.msg, self.kw = cls, msg, kw


def _operands(wire: WireGraph, n: WireNode, env: dict[int, Node],
              all_ids: set[int]) -> list[Node]:
    out = []
    for o in n.operands:
        if o in env:
            out.append(env[o])
            continue
        if o not in all_ids:
            raise _NodeError(UndefinedReferenceError, f"operand %{o} is not defined in the graph")
        cycle = _find_cycle(wire, o)
        if cycle:
            raise _NodeError(CycleError, "operands form a cycle: " + " -> ".join(
                f"%{c}" for c in cycle + cycle[:1]), cycle=cycle)
        raise _NodeError(ForwardReferenceError, f"operand %{o} is defined later; nodes must "
                         "be listed in topological order")
    return out


def _make_node(n: WireNode, operands: list[Node]) -> Node:
    try:
        if n.op == "constant":
            if operands or n.value is None:
                raise ArityError("a constant takes no operands and needs a value")
            if n.attrs:
                raise AttributeError_("a constant has no attributes (got "
                                      f"{', '.join(sorted(n.attrs))})")
            node = constant(n.value)
        else:
            if n.value is not None:
                raise ArityError("only constant nodes carry a value")
            node = make(n.op, operands, n.attrs, label=n.label)
    except InvalidGraphError as e:
        raise _NodeError(type(e), e.description) from None
    if n.declared is not None:
        dt, shape = n.declared
        if dt != node.dtype or tuple(shape) != node.shape:
            cls = DTypeError if dt != node.dtype else ShapeError
            raise _NodeError(cls, f"declared type {dt}{list(shape)} but the operands give "
                                  f"{node.dtype}{list(node.shape)}")
    return node


def _build_nodes(wire: WireGraph, env: dict[int, Node], check: Checker) -> None:
    all_ids = {n.id for n in wire.nodes}
    seen: set[int] = set()
    for i, n in enumerate(wire.nodes):
        if check is not None and i % CHECK_EVERY == 0:
            check()
        try:
            if n.id in env or n.id in seen:
                raise _NodeError(DuplicateIdError, f"id {n.id} is used twice")
            seen.add(n.id)
            if n.op not in OPS:
                raise _NodeError(UnknownOpError, f"unknown op {n.op!r}")
            env[n.id] = _make_node(n, _operands(wire, n, env, all_ids))
        except _NodeError as e:
            raise e.cls(f"node %{n.id} ({n.op}): {e.msg}", field=f"nodes[id={n.id}]",
                        context=_context(wire, i), **e.kw) from None


def _build_outputs(wire: WireGraph, env: dict[int, Node]) -> list[tuple[str, Node]]:
    outputs = []
    out_names: set[str] = set()
    for name, oid in wire.outputs:
        where = f"outputs.{name}"
        if not name or name in out_names:
            raise DuplicateIdError("output name is empty or used twice", field=where)
        if oid not in env:
            raise UndefinedReferenceError(f"output {name!r} refers to undefined id {oid}",
                                          field=where)
        if env[oid].types is not None:
            raise InvalidGraphError(f"output {name!r} refers to %{oid}, a {env[oid].op} node "
                                    "with several results: output one of them (element)",
                                    field=where)
        out_names.add(name)
        outputs.append((name, env[oid]))
    if not outputs:
        raise InvalidGraphError("the graph has no outputs", field="outputs")
    return outputs


def build_graph(wire: WireGraph, max_nodes: int | None = None,
                check: Checker = None) -> Graph:
    """Check `wire` and return the equivalent IR graph. `check`, if given, is called
    every CHECK_EVERY nodes and may raise to stop the work (deadlines, cancellation)."""
    _check_versions(wire)
    check_node_count(len(wire.nodes) + len(wire.inputs), max_nodes)
    env: dict[int, Node] = {}
    inputs = _build_inputs(wire, env)
    _build_nodes(wire, env, check)
    return Graph(inputs, _build_outputs(wire, env), wire.name)


def check_names(g: ir_pb2.Graph, max_bytes: int | None) -> None:
    """InvalidGraphError for a graph, input or output name or node label longer than
    `max_bytes` (UTF-8): names are echoed in errors and kept in caches."""
    if not max_bytes:
        return
    named = [("name", g.name)]
    named += [(f"inputs[{i}].name", p.name) for i, p in enumerate(g.inputs)]
    named += [(f"outputs[{i}].name", o.name) for i, o in enumerate(g.outputs)]
    named += [(f"nodes[{i}].label", p.label) for i, p in enumerate(g.nodes) if p.label]
    for where, text in named:
        n = len(text.encode("utf-8", "surrogatepass"))
        if n > max_bytes:
            raise InvalidGraphError(f"{where} is {n} bytes long; the limit is {max_bytes}",
                                    field=where)


def graph_from_proto(g: ir_pb2.Graph, max_nodes: int | None = None,
                     max_elements: int | None = None, check: Checker = None,
                     max_name_bytes: int | None = None) -> Graph:
    """Decode and validate; raises typed errors (InvalidGraphError and its subclasses,
    LimitExceededError). `check` (optional) is called every few hundred nodes and may
    raise to stop the work."""
    check_node_count(len(g.nodes) + len(g.inputs), max_nodes)  # before decoding anything
    check_names(g, max_name_bytes)
    limits = Limits(max_nodes, max_elements, check, max_name_bytes)
    limits.used = len(g.nodes) + len(g.inputs)
    try:
        wire = proto_to_wire(g, limits)
        return build_graph(wire, max_nodes=max_nodes, check=check)
    except (ValueError, OverflowError) as e:  # numpy/protobuf range errors: a bad graph
        raise InvalidGraphError(f"the graph cannot be decoded: {e}", field="graph") from None


# -- adsvc graphs for the SDK ------------------------------------------------------------
def as_proto(g) -> ir_pb2.Graph:
    """A Graph proto of an adsvc graph or a proto (passed through)."""
    if isinstance(g, Graph):
        return graph_to_proto(g)
    if isinstance(g, ir_pb2.Graph):
        return g
    raise InvalidRequestError(f"expected an adsvc graph or an adsvc.v1.Graph proto, got "
                              f"{type(g).__name__}", field="graph")


def as_graph(g) -> Graph:
    """An adsvc graph of an adsvc graph (passed through) or a Graph proto (decoded)."""
    if isinstance(g, Graph):
        return g
    if isinstance(g, ir_pb2.Graph):
        return graph_from_proto(g)
    raise InvalidRequestError(f"expected an adsvc graph or Graph proto, got {type(g).__name__}",
                              field="graph")


def _key(g):
    return g.key if isinstance(g, Graph) else proto_key(as_proto(g))


# What `adsvc.connect` gives the SDK: traced graphs in (keyed by their node digests, so a
# cached call encodes nothing), adsvc graphs out.
GRAPHS = GraphCodec(encode=as_proto, decode=graph_from_proto, key=_key)
