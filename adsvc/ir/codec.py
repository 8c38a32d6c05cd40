"""The one module that converts between Graph protos and the in-memory IR.

Decoding goes proto -> WireGraph (plain Python) -> passes.validate.build_graph -> IR,
so every malformed graph is reported by the validator with typed errors. Encoding
numbers nodes by their position in `Graph.nodes`; evaluation errors use the same ids.
"""

from __future__ import annotations

from adsvc.interrupt import CHECK_EVERY
from adsvc.ir.graph import Graph
from adsvc.passes.validate import (
    IR_VERSION,
    OPSET_VERSION,
    WireGraph,
    WireInput,
    WireNode,
    build_graph,
    check_node_count,
)
from adsvc_protocol.errors import AttributeError_, InvalidGraphError
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.tensors import TO_ENUM, dtype_from_enum, from_tensor, to_tensor


def _attr_to_proto(v) -> ir_pb2.AttrValue:
    if isinstance(v, bool):
        return ir_pb2.AttrValue(b=v)
    if isinstance(v, int):
        return ir_pb2.AttrValue(i=v)
    if isinstance(v, float):
        return ir_pb2.AttrValue(f=v)
    if isinstance(v, tuple):
        return ir_pb2.AttrValue(ints=ir_pb2.IntList(values=list(v)))
    if isinstance(v, str) and v in TO_ENUM:
        return ir_pb2.AttrValue(dtype=TO_ENUM[v])
    return ir_pb2.AttrValue(s=str(v))


def _attr_from_proto(a: ir_pb2.AttrValue, where: str):
    kind = a.WhichOneof("value")
    if kind is None:
        raise AttributeError_("attribute value is empty", field=where)
    if kind == "ints":
        return tuple(a.ints.values)
    if kind == "dtype":
        return dtype_from_enum(a.dtype, where, AttributeError_)
    return getattr(a, kind)


def graph_to_proto(graph: Graph) -> ir_pb2.Graph:
    nodes = graph.nodes
    ids = {id(n): i for i, n in enumerate(nodes)}
    g = ir_pb2.Graph(ir_version=IR_VERSION, opset_version=OPSET_VERSION, name=graph.name)
    for n in nodes:
        t = ir_pb2.TensorType(dtype=TO_ENUM[n.dtype], dims=n.shape)
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


def proto_to_wire(g: ir_pb2.Graph, max_elements: int | None = None, check=None) -> WireGraph:
    inputs = []
    for p in g.inputs:
        where = f"inputs[id={p.id}]"
        dt = dtype_from_enum(p.type.dtype, where, InvalidGraphError) if p.type.dtype else None
        inputs.append(WireInput(p.id, p.name, dt, tuple(p.type.dims)))
    nodes = []
    for i, p in enumerate(g.nodes):
        if check is not None and i % CHECK_EVERY == 0:
            check()
        where = f"nodes[id={p.id}]"
        attrs = {k: _attr_from_proto(v, f"{where}.attrs.{k}") for k, v in p.attrs.items()}
        value = (from_tensor(p.value, f"{where}.value", InvalidGraphError, max_elements)
                 if p.HasField("value") else None)
        declared = None
        if p.HasField("type") and p.type.dtype:
            declared = (dtype_from_enum(p.type.dtype, f"{where}.type", InvalidGraphError),
                        tuple(p.type.dims))
        nodes.append(WireNode(p.id, p.op, list(p.operands), attrs, value, p.label, declared))
    outputs = [(o.name, o.id) for o in g.outputs]
    return WireGraph(g.ir_version, g.opset_version, inputs, nodes, outputs, g.name)


def graph_from_proto(g: ir_pb2.Graph, max_nodes: int | None = None,
                     max_elements: int | None = None, check=None) -> Graph:
    """Decode and validate; raises the validator's typed errors. `check` (optional) is
    called every few hundred nodes and may raise to stop the work."""
    check_node_count(len(g.nodes) + len(g.inputs), max_nodes)  # before decoding anything
    return build_graph(proto_to_wire(g, max_elements, check), max_nodes=max_nodes,
                       check=check)
