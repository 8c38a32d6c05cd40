"""adsvc: a graph-IR compiler and automatic-differentiation service.

    import adsvc
    g = adsvc.trace(lambda x, y: x * x + x * y + 2, x=adsvc.f64(), y=adsvc.f64())
    c = adsvc.local()                     # or adsvc.connect("host:port")
    c.value_and_grad(g, x=3.0, y=4.0)     # (23.0, {"x": 10.0, "y": 3.0})
"""

from adsvc import errors
from adsvc import ops as _ops  # noqa: F401  (registers the op table)
from adsvc.explain import explain
from adsvc.ir.codec import GRAPHS, graph_from_proto, graph_to_proto
from adsvc.ir.graph import Graph
from adsvc.ir.node import Node, constant
from adsvc.local import LocalClient, local
from adsvc.ops.api import (
    abs,
    add,
    broadcast_to,
    cast,
    concat,
    cos,
    div,
    dot,
    element,
    eq,
    exp,
    expm1,
    full,
    ge,
    gt,
    le,
    log,
    log1p,
    log_softmax,
    logsumexp,
    lt,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    mul,
    mul_or_zero,
    ne,
    neg,
    norm,
    ones,
    ones_like,
    pad,
    pow,
    reciprocal,
    relu,
    reshape,
    scatter_add,
    sigmoid,
    sign,
    sin,
    slice,
    softmax,
    softplus,
    sqrt,
    square,
    squared_norm,
    stop_gradient,
    sub,
    sum,
    take,
    tan,
    tanh,
    transpose,
    where,
    zeros,
    zeros_like,
)
from adsvc.passes.control import cond, fori_loop, scan, switch, while_loop
from adsvc.passes.inline import call
from adsvc.passes.loop_memory import LoopMemory, loop_memory
from adsvc.passes.pipeline import differentiate
from adsvc.passes.specialize import specialize_at as specialize
from adsvc.passes.transforms import grad, hessian, jacobian, jvp, value_and_grad, vjp
from adsvc.tracer import Spec, boolean, f32, f64, i32, i64, trace
from adsvc.version import __version__
from adsvc_protocol.errors import AdsvcError


def connect(target: str, **kw):
    """A client for an adsvc server at `target` ("host:port") with the interface of
    `adsvc.local()`: traced graphs in, adsvc graphs out (see adsvc_client.remote)."""
    from adsvc_client.remote import RemoteClient

    return RemoteClient(target, **{"graphs": GRAPHS, **kw})


__all__ = [
    "AdsvcError", "Graph", "LocalClient", "Node", "Spec", "__version__", "boolean",
    "connect", "constant", "differentiate", "errors", "explain", "f32", "f64", "from_proto",
    "i32", "i64", "local", "specialize", "to_proto", "trace",
    # function transformations that work inside traces, and calling graphs
    "call", "grad", "hessian", "jacobian", "jvp", "value_and_grad", "vjp",
    # control flow inside traces, and what differentiated loops store
    "LoopMemory", "cond", "fori_loop", "loop_memory", "scan", "switch", "while_loop",
    # array constructors
    "full", "ones", "ones_like", "zeros", "zeros_like",
    # the op builders and composites of adsvc.ops.api
    "abs", "add", "broadcast_to", "cast", "concat", "cos", "div", "dot", "element", "eq", "exp",
    "expm1", "ge", "gt", "le", "log", "log1p", "log_softmax", "logsumexp", "lt", "matmul",
    "max", "maximum", "mean", "min", "minimum", "mul", "mul_or_zero", "ne", "neg", "norm",
    "pad", "pow", "reciprocal", "relu", "reshape", "scatter_add", "sigmoid", "sign", "sin",
    "slice", "softmax", "softplus", "sqrt", "square", "squared_norm", "stop_gradient", "sub",
    "sum", "take", "tan", "tanh", "transpose", "where",
]


def to_proto(graph: Graph):
    """The `adsvc.v1.Graph` proto of a graph (to send it with generated stubs or save it)."""
    return graph_to_proto(graph)


def from_proto(proto, **limits) -> Graph:
    """The graph of an `adsvc.v1.Graph` proto, validated (typed errors name the node);
    `limits`: max_nodes, max_elements."""
    return graph_from_proto(proto, **limits)
