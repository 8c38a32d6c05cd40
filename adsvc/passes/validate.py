"""Validation: turn a decoded wire graph (plain Python, ids and all) into IR.

Every check raises a typed error whose `field` names the offending input, node or
output (``nodes[id=7]``) and whose `context` prints the few nodes around it. The
in-memory IR cannot hold an ill-formed graph, so this is the only place that has to
look for one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from adsvc.interrupt import CHECK_EVERY
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, constant, input_node, make
from adsvc.ops.registry import OPS, check_shape
from adsvc_protocol import dtypes
from adsvc_protocol.errors import (
    ArityError,
    AttributeError_,
    CycleError,
    DTypeError,
    DuplicateIdError,
    ForwardReferenceError,
    InvalidGraphError,
    ShapeError,
    UndefinedReferenceError,
    UnknownOpError,
    VersionError,
)

IR_VERSION = 1
OPSET_VERSION = 1


@dataclass
class WireInput:
    id: int
    name: str
    dtype: str | None
    shape: tuple[int, ...]


@dataclass
class WireNode:
    id: int
    op: str
    operands: list[int]
    attrs: dict[str, Any] = field(default_factory=dict)
    value: np.ndarray | None = None
    label: str = ""
    declared: tuple[str, tuple[int, ...]] | None = None  # (dtype, shape) if the writer gave it


@dataclass
class WireGraph:
    ir_version: int
    opset_version: int
    inputs: list[WireInput]
    nodes: list[WireNode]
    outputs: list[tuple[str, int]]
    name: str = ""


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




def check_node_count(n: int, max_nodes: int | None) -> None:
    from adsvc_protocol.errors import LimitExceededError

    if max_nodes is not None and n > max_nodes:
        raise LimitExceededError(f"graph has {n} nodes; the limit is {max_nodes}",
                                 field="nodes")


def build_graph(wire: WireGraph, max_nodes: int | None = None,
                check: Callable[[], None] | None = None) -> Graph:
    """Check `wire` and return the equivalent IR graph.

    `check`, if given, is called every CHECK_EVERY nodes and may raise to stop the work
    (deadlines, cancellation)."""
    if wire.ir_version != IR_VERSION:
        raise VersionError(f"IR version {wire.ir_version} is not supported (this server reads "
                           f"version {IR_VERSION})", field="ir_version")
    if wire.opset_version != OPSET_VERSION:
        raise VersionError(f"opset version {wire.opset_version} is not supported (this server "
                           f"implements opset {OPSET_VERSION})", field="opset_version")
    check_node_count(len(wire.nodes) + len(wire.inputs), max_nodes)
    env: dict[int, Node] = {}
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

    all_ids = {n.id for n in wire.nodes}
    seen_node_ids: set[int] = set()
    for i, n in enumerate(wire.nodes):
        where = f"nodes[id={n.id}]"
        if check is not None and i % CHECK_EVERY == 0:
            check()

        def fail(cls, msg, n=n, where=where, i=i, **kw):
            return cls(f"node %{n.id} ({n.op}): {msg}", field=where,
                       context=_context(wire, i), **kw)

        if n.id in env or n.id in seen_node_ids:
            raise fail(DuplicateIdError, f"id {n.id} is used twice")
        seen_node_ids.add(n.id)
        if n.op not in OPS:
            raise fail(UnknownOpError, f"unknown op {n.op!r}")
        operands = []
        for o in n.operands:
            if o in env:
                operands.append(env[o])
                continue
            if o not in all_ids:
                raise fail(UndefinedReferenceError, f"operand %{o} is not defined in the graph")
            cycle = _find_cycle(wire, o)
            if cycle:
                raise fail(CycleError, "operands form a cycle: " + " -> ".join(
                    f"%{c}" for c in cycle + cycle[:1]), cycle=cycle)
            raise fail(ForwardReferenceError, f"operand %{o} is defined later; nodes must be "
                       "listed in topological order")
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
            raise fail(type(e), e.description) from None
        if n.declared is not None:
            dt, shape = n.declared
            if dt != node.dtype or tuple(shape) != node.shape:
                cls = DTypeError if dt != node.dtype else ShapeError
                raise fail(cls, f"declared type {dt}{list(shape)} but the operands give "
                                f"{node.dtype}{list(node.shape)}")
        env[n.id] = node

    outputs = []
    out_names: set[str] = set()
    for name, oid in wire.outputs:
        where = f"outputs.{name}"
        if not name or name in out_names:
            raise DuplicateIdError("output name is empty or used twice", field=where)
        if oid not in env:
            raise UndefinedReferenceError(f"output {name!r} refers to undefined id {oid}",
                                          field=where)
        out_names.add(name)
        outputs.append((name, env[oid]))
    if not outputs:
        raise InvalidGraphError("the graph has no outputs", field="outputs")
    return Graph(inputs, outputs, wire.name)

