"""Every class of malformed graph yields its typed error naming the node (proto input)."""

import numpy as np
import pytest

import adsvc as ad
from adsvc.errors import (
    ArityError,
    AttributeError_,
    CycleError,
    DTypeError,
    DuplicateIdError,
    EvaluationError,
    ForwardReferenceError,
    InputError,
    InvalidGraphError,
    ShapeError,
    UndefinedReferenceError,
    UnknownOpError,
    VersionError,
)
from adsvc.ir.codec import graph_from_proto, graph_to_proto
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.tensors import to_tensor

F64 = ir_pb2.DTYPE_FLOAT64


def make(nodes, inputs=(("x", (3,)), ("y", (3,))), outputs=None, **kw):
    g = ir_pb2.Graph(ir_version=kw.get("ir_version", 1), opset_version=kw.get("opset", 1))
    for i, (name, dims) in enumerate(inputs):
        g.inputs.add(id=i, name=name, type=ir_pb2.TensorType(dtype=F64, dims=dims))
    for nid, op, operands, *rest in nodes:
        n = g.nodes.add(id=nid, op=op, operands=operands)
        for k, v in (rest[0] if rest else {}).items():
            n.attrs[k].CopyFrom(v)
    last = outputs if outputs is not None else [("z", nodes[-1][0] if nodes else 0)]
    for name, nid in last:
        g.outputs.add(name=name, id=nid)
    return g


def ints(*v):
    return ir_pb2.AttrValue(ints=ir_pb2.IntList(values=v))


def test_good_graph_round_trips():
    g = ad.trace(lambda x, y: ad.sum(ad.exp(x) * y, 0), x=ad.f64(3), y=ad.f64(3))
    p = graph_to_proto(g)
    back = graph_from_proto(p)
    assert back.text() == g.text()
    assert graph_to_proto(back).SerializeToString(deterministic=True) == \
        p.SerializeToString(deterministic=True)


@pytest.mark.parametrize("graph, error, field, words", [
    (make([(2, "frobnicate", [0])]), UnknownOpError, "nodes[id=2]", "unknown op 'frobnicate'"),
    (make([(2, "add", [0])]), ArityError, "nodes[id=2]", "takes 2 operand"),
    (make([(2, "sum", [0], {"axis": ints(0)})]), AttributeError_, "nodes[id=2]",
     "no attribute 'axis'"),
    (make([(2, "sum", [0], {"axes": ints(5)})]), AttributeError_, "nodes[id=2]",
     "axis 5 out of range"),
    (make([(2, "sum", [0], {"keepdims": ir_pb2.AttrValue(i=1)})]), AttributeError_,
     "nodes[id=2]", "must be bool"),
    (make([(2, "reshape", [0])]), AttributeError_, "nodes[id=2]", "requires attribute 'shape'"),
    (make([(2, "add", [0, 9])]), UndefinedReferenceError, "nodes[id=2]", "%9 is not defined"),
    (make([(2, "add", [0, 3]), (3, "neg", [1])]), ForwardReferenceError, "nodes[id=2]",
     "defined later"),
    (make([(2, "neg", [0]), (2, "neg", [1])]), DuplicateIdError, "nodes[id=2]", "used twice"),
    (make([(1, "neg", [0])]), DuplicateIdError, "nodes[id=1]", "used twice"),
    (make([(2, "add", [0, 3]), (3, "neg", [2])]), CycleError, "nodes[id=2]", "%3 -> %2 -> %3"),
    (make([(2, "matmul", [0, 1])], inputs=[("x", (2, 3)), ("y", (2, 3))]), ShapeError,
     "nodes[id=2]", "contraction sizes differ"),
    (make([(2, "add", [0, 1])], inputs=[("x", (2,)), ("y", (3,))]), ShapeError,
     "nodes[id=2]", "[2], [3] do not broadcast"),
    (make([(2, "where", [0, 0, 1])]), DTypeError, "nodes[id=2]", "condition must be bool"),
    (make([(2, "neg", [0])], ir_version=7), VersionError, "ir_version", "IR version 7"),
    (make([(2, "neg", [0])], opset=3), VersionError, "opset_version", "opset version 3"),
    (make([(2, "neg", [0])], outputs=[("z", 8)]), UndefinedReferenceError, "outputs.z",
     "undefined id 8"),
    (make([(2, "neg", [0])], outputs=[]), InvalidGraphError, "outputs", "no outputs"),
    (make([(2, "neg", [0])], inputs=[("x", (3,)), ("x", (3,))]), DuplicateIdError,
     "inputs[id=1]", "duplicate 'x'"),
])
def test_malformed_graph(graph, error, field, words):
    with pytest.raises(error) as e:
        graph_from_proto(graph)
    assert e.value.field == field
    assert words in str(e.value)


def test_error_prints_surrounding_nodes():
    g = make([(2, "neg", [0]), (3, "exp", [2]), (4, "add", [3, 0]), (5, "bogus", [4]),
              (6, "neg", [5])])
    with pytest.raises(UnknownOpError) as e:
        graph_from_proto(g)
    assert "--> %5 = bogus %4" in e.value.context and "%3 = exp %2" in e.value.context


def test_int_attribute_dtype_mismatch_and_declared_type():
    g = make([(2, "add", [0, 1])])
    g.nodes[0].type.CopyFrom(ir_pb2.TensorType(dtype=F64, dims=[4]))
    with pytest.raises(ShapeError, match=r"declared type float64\[4\]"):
        graph_from_proto(g)
    g = ir_pb2.Graph(ir_version=1, opset_version=1)
    g.inputs.add(id=0, name="x", type=ir_pb2.TensorType(dtype=F64, dims=[2]))
    g.inputs.add(id=1, name="n", type=ir_pb2.TensorType(dtype=ir_pb2.DTYPE_INT64, dims=[2]))
    g.nodes.add(id=2, op="add", operands=[0, 1])
    g.outputs.add(name="z", id=2)
    with pytest.raises(DTypeError, match="dtypes differ"):
        graph_from_proto(g)


def test_bad_constant_tensor():
    g = make([(2, "constant", [])], inputs=[])
    g.nodes[0].value.CopyFrom(ir_pb2.Tensor(dtype=F64, dims=[2], raw=b"\x00" * 8))
    with pytest.raises(InvalidGraphError, match="raw has 8 bytes") as e:
        graph_from_proto(g)
    assert e.value.field == "nodes[id=2].value"
    g.nodes[0].value.CopyFrom(ir_pb2.Tensor(dtype=F64, dims=[2], values=[1.0, 2.0]))
    assert graph_from_proto(g).output("z").value.tolist() == [1.0, 2.0]
    g.nodes[0].value.CopyFrom(to_tensor(np.array([1, 2], dtype=np.int32)))
    assert graph_from_proto(g).output("z").dtype == "int32"


def test_constant_with_attributes_is_refused():
    g = make([(2, "constant", [], {"axes": ints(0)})], inputs=[])
    g.nodes[0].value.CopyFrom(ir_pb2.Tensor(dtype=F64, values=[1.0]))
    with pytest.raises(AttributeError_, match="constant has no attributes") as e:
        graph_from_proto(g)
    assert e.value.field == "nodes[id=2]"


def test_bad_feeds_are_named():
    g = ad.trace(lambda x, n: x * ad.cast(n, "float64"), x=ad.f64(3), n=ad.i64(3))
    c = ad.local()
    with pytest.raises(InputError, match="missing input 'n'") as e:
        c.evaluate(g, x=np.ones(3))
    assert e.value.field == "inputs.n"
    with pytest.raises(InputError, match=r"shape \[2\], expected \[3\]"):
        c.evaluate(g, x=np.ones(2), n=np.ones(3, dtype=np.int64))
    with pytest.raises(InputError, match="dtype float64, expected int64"):
        c.evaluate(g, x=np.ones(3), n=np.ones(3))
    with pytest.raises(InputError, match="unknown input 'q'"):
        c.evaluate(g, x=np.ones(3), n=[1, 2, 3], q=1.0)
    with pytest.raises(InputError, match="not exact int64"):
        c.evaluate(g, x=np.ones(3), n=[1.5, 2, 3])
    assert c.evaluate(g, x=[1, 2, 3], n=[1, 2, 3])["out"].tolist() == [1, 4, 9]


def test_index_out_of_range_is_an_evaluation_error_naming_the_node():
    g = ad.trace(lambda x, i: ad.take(x, i), x=ad.f64(3), i=ad.i64(2))
    with pytest.raises(EvaluationError, match="op 'take' failed") as e:
        ad.local().evaluate(g, x=np.ones(3), i=np.array([0, 7]))
    assert e.value.field.startswith("nodes[id=")


def test_tracing_errors_are_typed():
    with pytest.raises(ShapeError, match="do not broadcast"):
        ad.trace(lambda x, y: x + y, x=ad.f64(2), y=ad.f64(3))
    with pytest.raises(TypeError, match="use adsvc.where"):
        ad.trace(lambda x: x if x > 0 else -x)
