"""Control flow (scan, fori_loop, while_loop, cond, switch) end to end through the gRPC
server and the SDK (`adsvc.connect`): values and derivatives equal `adsvc.local()` and
central finite differences; protos of IR/opset 2 and the typed errors of malformed
loop protos over the wire; limits that count sub-graphs (nodes, nesting, elements,
compiled sizes); max_iters, deadlines and cancellation inside long loops; and compile
once / evaluate many (same handle for two traces, sizes independent of the step
count)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from derivcheck import check_first_order, check_second_order, fd_grad, fd_hessian
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from service_fixtures import (
    F64,
    channel,
    hand_graph,
    running_server,
    seed_graph,
    stats,
    stopped_steps,
    stub,
    wait_until,
)

import adsvc
from adsvc.errors import (
    AttributeError_,
    DeadlineExceededError,
    DTypeError,
    EvaluationError,
    InvalidGraphError,
    LimitExceededError,
    ShapeError,
    UndefinedReferenceError,
    UnknownOpError,
    VersionError,
)
from adsvc.interrupt import CHECK_EVERY
from adsvc.ir.codec import MAX_DEPTH
from adsvc.ir.graph import Graph
from adsvc.passes.pipeline import compile_graph
from adsvc.server.config import ServerConfig
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
f64, i64 = adsvc.f64, adsvc.i64
H = 1e-6
LOCAL = adsvc.local()


# -- helpers ----------------------------------------------------------------------------------
def close(actual, expected, what, rtol=1e-6, atol=1e-7):
    """assert_allclose with an absolute tolerance scaled by the expected magnitude."""
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def sub_graphs(g: Graph):
    """The bodies and branches held in attributes of `g`'s nodes."""
    for n in g.nodes:
        for _, v in n.attrs:
            if isinstance(v, Graph):
                yield v
            elif isinstance(v, tuple) and v and isinstance(v[0], Graph):
                yield from v


def total_nodes(g: Graph) -> int:
    """Nodes of `g` and of all its sub-graphs, recursively."""
    return len(g.nodes) + sum(total_nodes(s) for s in sub_graphs(g))


def proto_sub_graphs(p: ir_pb2.Graph):
    """The sub-graph protos held in attributes of `p`'s nodes."""
    for n in p.nodes:
        for a in n.attrs.values():
            if a.WhichOneof("value") == "graph":
                yield a.graph
            elif a.WhichOneof("value") == "graphs":
                yield from a.graphs.graphs


def proto_nodes(p: ir_pb2.Graph) -> int:
    """Inputs and nodes of a Graph proto and its sub-graphs (what max_nodes counts)."""
    return len(p.nodes) + len(p.inputs) + sum(proto_nodes(s) for s in proto_sub_graphs(p))


def details(err: grpc.RpcError):
    """(BadRequest field violation, ErrorInfo) of a rich error status."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    br, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    for d in status.details:
        if not d.Unpack(br):
            d.Unpack(info)
    assert br.field_violations, err.details()
    return br.field_violations[0], info


def expect(call, code, reason, field=None, words=()):
    """The call fails with `code`, ErrorInfo `reason`, the field violation `field` (a
    prefix is enough when it ends in '*') and a description containing `words`."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    violation, info = details(e.value)
    assert info.reason == reason and info.domain == "adsvc", (info.reason, e.value.details())
    if field is not None:
        if field.endswith("*"):
            assert violation.field.startswith(field[:-1]), violation.field
        else:
            assert violation.field == field, violation.field
    for w in words:
        assert w in violation.description, violation.description
    assert "Traceback" not in e.value.details()
    return violation


def assert_alive(rpc):
    """The server still evaluates (the seed graph) and reports SERVING."""
    resp = rpc.Gradient(S.GradientRequest(graph=seed_graph(), inputs={
        "x": to_tensor(3.0), "y": to_tensor(4.0)}), timeout=30)
    assert from_tensor(resp.value) == 23.0


def int_attr(v: int) -> ir_pb2.AttrValue:
    """An int attribute."""
    return ir_pb2.AttrValue(i=v)


def graph_attr(g: ir_pb2.Graph) -> ir_pb2.AttrValue:
    """A sub-graph attribute."""
    return ir_pb2.AttrValue(graph=g)


def graphs_attr(*gs: ir_pb2.Graph) -> ir_pb2.AttrValue:
    """A list-of-sub-graphs attribute."""
    return ir_pb2.AttrValue(graphs=ir_pb2.GraphList(graphs=list(gs)))


def shape_attr(*dims: int) -> ir_pb2.AttrValue:
    """An ints attribute (a shape)."""
    return ir_pb2.AttrValue(ints=ir_pb2.IntList(values=dims))


# -- programs ---------------------------------------------------------------------------------
def p_scan_pytree(x, w, xs):
    """scan with a dict carry, a tuple of ys, and the closure w."""
    def body(c, xt):
        h = adsvc.tanh(c["h"] * w + xt)
        return {"h": h, "s": c["s"] + adsvc.sin(h)}, (h * h, c["s"])
    c, (ys, zs) = adsvc.scan(body, {"h": x, "s": x * 0.0}, xs)
    return adsvc.sum(c["h"] * c["s"]) + adsvc.sum(ys) + adsvc.sum(zs * zs)


def p_scan_in_scan(x, a):
    """A scan whose body runs a scan that closes over the outer row and over a."""
    def outer(c, xt):
        def inner(d, _):
            return adsvc.sin(d * a + xt), d * d
        d, ys = adsvc.scan(inner, c, length=3)
        return d + 0.1 * adsvc.sum(ys), adsvc.sum(d)
    c, ys = adsvc.scan(outer, x, adsvc.full((4,), 0.2) + a)
    return adsvc.sum(c) + adsvc.sum(ys)


def p_grad_in_body(x, w):
    """Gradient descent steps: adsvc.grad inside the scan body."""
    def body(c, _):
        g = adsvc.grad(lambda z: adsvc.sum(adsvc.sin(z * w) * z))(c)
        return c - 0.1 * g, adsvc.sum(c * c)
    c, ys = adsvc.scan(body, x, length=4)
    return adsvc.sum(c * c) + adsvc.sum(ys)


def p_while(x, r):
    """while_loop over an (int counter, vector) carry with the closure r."""
    def body(s):
        i, v = s
        return i + 1, v * r + adsvc.sin(v)
    zero = adsvc.cast(adsvc.zeros(()), "int64")
    _, v = adsvc.while_loop(lambda s: s[0] < 5, body, (zero, x), max_iters=20)
    return adsvc.sum(v * v)


def p_cond(x, y):
    """cond on a traced predicate; branches return a (scalar, vector) pair."""
    a, b = adsvc.cond(adsvc.sum(x) > y,
                      lambda u, v: (adsvc.sum(u * u) * v, u * v),
                      lambda u, v: (adsvc.sum(adsvc.exp(u)) - v, u - v), x, y)
    return a + adsvc.sum(adsvc.sin(b))


def p_switch_fori(x, y):
    """switch on a computed index, then a fori_loop reading its counter."""
    k = adsvc.cast(adsvc.sum(x) > 0.0, "int64") + adsvc.cast(y > 1.0, "int64")
    z = adsvc.switch(k, [lambda u: u * 2.0, adsvc.sin, lambda u: u * u * y], x)
    return adsvc.sum(adsvc.fori_loop(0, 3, lambda i, c: c * y + adsvc.cast(i, "float64"), z))


def p_mixed(x, w, xs):
    """A scan whose body runs a while_loop (Newton for sqrt) and a cond."""
    def body(c, t):
        def newton(s):
            return s[0] + 1, 0.5 * (s[1] + (c * c + t * t + w) / s[1])
        zero = adsvc.cast(adsvc.zeros(()), "int64")
        _, r = adsvc.while_loop(lambda s: s[0] < 6, newton, (zero, c + 1.0), max_iters=10)
        nxt = adsvc.cond(t > 0.0, lambda u: u * w, lambda u: adsvc.sin(u), r)
        return nxt, r
    c, ys = adsvc.scan(body, x, xs)
    return c + adsvc.sum(ys * ys)


def p_checkpointed(x, w):
    """A 9-step scan checkpointed every 3rd carry (the segment VJP)."""
    c, _ = adsvc.scan(lambda c, _: (adsvc.sin(c * w) + 0.3 * c, None), x, length=9,
                      checkpoint=3)
    return adsvc.sum(c * c)


XS = np.linspace(-1.0, 1.0, 10).reshape(5, 2)
PROGRAMS = [
    ("scan-pytree", p_scan_pytree, dict(x=f64(2), w=f64(), xs=f64(5, 2)),
     dict(x=np.array([0.3, -0.2]), w=np.array(0.8), xs=XS)),
    ("scan-in-scan", p_scan_in_scan, dict(x=f64(2), a=f64()),
     dict(x=np.array([0.3, -0.4]), a=np.array(0.7))),
    ("grad-in-body", p_grad_in_body, dict(x=f64(3), w=f64()),
     dict(x=np.array([0.3, -0.4, 1.0]), w=np.array(0.7))),
    ("while", p_while, dict(x=f64(2), r=f64()), dict(x=np.array([0.3, -0.4]), r=np.array(0.7))),
    ("cond-true", p_cond, dict(x=f64(2), y=f64()),
     dict(x=np.array([0.9, -0.1]), y=np.array(0.2))),
    ("cond-false", p_cond, dict(x=f64(2), y=f64()),
     dict(x=np.array([0.3, -0.4]), y=np.array(0.7))),
    ("switch-fori", p_switch_fori, dict(x=f64(2), y=f64()),
     dict(x=np.array([0.3, -0.4]), y=np.array(1.7))),
    ("while-cond-in-scan", p_mixed, dict(x=f64(), w=f64(), xs=f64(4)),
     dict(x=np.array(0.4), w=np.array(0.6), xs=np.array([0.5, -0.3, 0.2, -0.7]))),
    ("checkpointed", p_checkpointed, dict(x=f64(2), w=f64()),
     dict(x=np.array([0.3, -0.6]), w=np.array(1.3))),
]
IDS = [p[0] for p in PROGRAMS]


# -- values and derivatives -------------------------------------------------------------------
@pytest.mark.parametrize("case", PROGRAMS, ids=IDS)
def test_value_and_grad_match_local_and_finite_differences(client, case):
    """value_and_grad over the server (reverse and forward) equals the local client and
    central differences; the forward value is the plain evaluation."""
    _, fn, types, feeds = case
    g = adsvc.trace(fn, **types)
    assert adsvc.to_proto(g).opset_version == 2
    value, grads = client.value_and_grad(g, inputs=feeds)
    lvalue, lgrads = LOCAL.value_and_grad(g, inputs=feeds)
    close(value, lvalue, "value", rtol=1e-12)
    close(value, LOCAL.evaluate(g, feeds)["out"], "value vs evaluate", rtol=1e-12)
    assert set(grads) == set(lgrads) == set(feeds)
    fd = fd_grad(LOCAL, g, feeds, list(feeds))
    fwd = client.grad(g, mode="forward", inputs=feeds)
    for k in feeds:
        close(grads[k], lgrads[k], f"remote vs local grad {k}", rtol=1e-10)
        close(grads[k], fd[k], f"grad {k} vs finite differences")
        close(fwd[k], grads[k], f"forward vs reverse grad {k}", rtol=1e-10)


@pytest.mark.parametrize("case", PROGRAMS, ids=IDS)
def test_jvp_and_hessian_match_local_and_finite_differences(client, case):
    """jvp and hessian over the server equal the local client; the JVP equals a central
    difference along the tangent, the Hessian central differences of the gradient."""
    _, fn, types, feeds = case
    g = adsvc.trace(fn, **types)
    rng = np.random.default_rng(7)
    tangents = {k: rng.standard_normal(np.shape(v)) for k, v in feeds.items()}
    out, tan = client.jvp(g, feeds, tangents)
    lout, ltan = LOCAL.jvp(g, feeds, tangents)
    close(out["out"], lout["out"], "jvp value", rtol=1e-12)
    close(tan["out"], ltan["out"], "remote vs local jvp", rtol=1e-10)
    plus = {k: feeds[k] + H * tangents[k] for k in feeds}
    minus = {k: feeds[k] - H * tangents[k] for k in feeds}
    fd = (LOCAL.evaluate(g, plus)["out"] - LOCAL.evaluate(g, minus)["out"]) / (2 * H)
    close(tan["out"], fd, "jvp vs finite differences")
    hess, lhess = client.hessian(g, inputs=feeds), LOCAL.hessian(g, inputs=feeds)
    fdh = fd_hessian(LOCAL, g, feeds, list(feeds))
    for a in feeds:
        for b in feeds:
            assert hess[a][b].shape == np.shape(feeds[a]) + np.shape(feeds[b])
            close(hess[a][b], lhess[a][b], f"remote vs local hessian {a},{b}", rtol=1e-10)
            close(hess[a][b], fdh[a][b], f"hessian {a},{b} vs finite differences", rtol=1e-5,
                  atol=1e-6)


@pytest.mark.parametrize("case", PROGRAMS, ids=IDS)
def test_derivcheck_over_the_server(client, case):
    """tests/derivcheck.py with the SDK: JVP vs finite differences, <u,Jv> = <J^T u,v>,
    Hessian-vector products vs finite differences of the gradient and three second-order
    compositions — the differentiated loop graphs go back to the server as protos."""
    _, fn, types, feeds = case
    g = adsvc.trace(fn, **types)
    rng = np.random.default_rng(3)
    check_first_order(client, g, feeds, rng)
    check_second_order(client, g, feeds, rng)


def test_differentiated_loop_graph_round_trips(client, rpc):
    """The server's reverse graph of a loop program is an IR-2 graph that evaluates, on
    the server and locally, to the local client's value and gradient."""
    _, fn, types, feeds = PROGRAMS[0]
    g = adsvc.trace(fn, **types)
    dg = client.differentiate(g, "reverse", seed=True)
    proto = adsvc.to_proto(dg)
    assert (proto.ir_version, proto.opset_version) == (2, 2)
    assert adsvc.from_proto(proto).key == dg.key
    value, grads = LOCAL.value_and_grad(g, inputs=feeds)
    for out in (client.evaluate(dg, feeds), LOCAL.evaluate(proto, feeds)):
        close(out["out"], value, "value", rtol=1e-12)
        for k in feeds:
            close(out[f"grad:{k}"], grads[k], f"grad:{k}", rtol=1e-10)


def test_jacobian_of_scan_outputs_over_a_stream(client):
    """A scan with several outputs (stacked ys, an int ys dropped from the Jacobian):
    the forward Jacobian (EvaluateStream) equals the reverse one and the closed form."""
    def fn(x):
        c, (ys, signs) = adsvc.scan(lambda s, t: (s + t, (s * t, adsvc.cast(t > 0.0, "int64"))),
                                    x, adsvc.full((3,), 0.5) * x)
        return c, ys, signs
    g = adsvc.trace(fn, x=f64())
    out = client.evaluate(g, x=2.0)
    np.testing.assert_allclose(out["out1"], [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(out["out2"], [1, 1, 1])
    fwd, rev = client.jacobian(g, mode="forward", x=2.0), client.jacobian(g, x=2.0)
    assert set(fwd) == set(rev) == {"out0", "out1"}
    # c = x + 1.5 x, ys_k = 0.5 x^2 (1 + 0.5 k)
    for j in (fwd, rev):
        close(j["out0"]["x"], 2.5, "dc/dx", rtol=1e-12)
        close(j["out1"]["x"], [2.0, 3.0, 4.0], "dys/dx", rtol=1e-12)


# -- protos -----------------------------------------------------------------------------------
def test_proto_versions_two_for_control_flow_one_for_plain(rpc):
    """to_proto writes IR/opset 2 exactly when the graph uses control flow (bodies
    without loops are written as 1); both evaluate on the server."""
    plain = adsvc.trace(lambda x: adsvc.sin(x) * 2.0, x=f64())
    p = adsvc.to_proto(plain)
    assert (p.ir_version, p.opset_version) == (1, 1)
    for _, fn, types, feeds in PROGRAMS[:5]:
        g = adsvc.trace(fn, **types)
        p = adsvc.to_proto(g)
        assert (p.ir_version, p.opset_version) == (2, 2)
        assert adsvc.from_proto(p).key == g.key
        resp = rpc.Evaluate(S.EvaluateRequest(graph=p, inputs={
            k: to_tensor(v) for k, v in feeds.items()}), timeout=30)
        close(from_tensor(resp.outputs["out"]), LOCAL.evaluate(g, feeds)["out"], "value",
              rtol=1e-12)
    scan = adsvc.to_proto(adsvc.trace(
        lambda x: adsvc.scan(lambda c, _: (c * 2.0, None), x, length=3)[0], x=f64()))
    body, = proto_sub_graphs(scan)
    assert (body.ir_version, body.opset_version) == (1, 1)
    resp = rpc.Evaluate(S.EvaluateRequest(graph=scan, inputs={"x": to_tensor(1.5)}))
    assert from_tensor(resp.outputs["out"]) == 12.0


def tanh_body() -> ir_pb2.Graph:
    """(c, x) -> (tanh(c * x), c): a well-formed scan body."""
    return hand_graph([(0, "c", []), (1, "x", [])], [(2, "mul", [0, 1]), (3, "tanh", [2])],
                      [("c0", 3), ("y0", 0)])


def scan_graph(body, ir=2, opset=2, outputs=None, carries=1, index=0, length=3):
    """z = element(scan(x, v; body), index) over inputs x: f64[], v: f64[3]."""
    return hand_graph(
        [(0, "x", []), (1, "v", [3])],
        [(2, "scan", [0, 1], {"body": graph_attr(body), "carries": int_attr(carries),
                              "xs": int_attr(1), "length": int_attr(length)}),
         (3, "element", [2], {"index": int_attr(index)})],
        outputs or [("z", 3)], ir_version=ir, opset=opset)


def while_graph(cond, body):
    """z = element(while_loop(x; cond, body), 0)."""
    return hand_graph(
        [(0, "x", []), (1, "v", [3])],
        [(2, "while_loop", [0], {"cond": graph_attr(cond), "body": graph_attr(body),
                                 "carries": int_attr(1), "max_iters": int_attr(3)}),
         (3, "element", [2], {"index": int_attr(0)})], [("z", 3)], 2, 2)


def cond_graph(false_branch, true_branch):
    """z = element(cond(x > x, x; branches), 0)."""
    return hand_graph(
        [(0, "x", []), (1, "v", [3])],
        [(2, "gt", [0, 0]),
         (4, "cond", [2, 0], {"branches": graphs_attr(false_branch, true_branch)}),
         (5, "element", [4], {"index": int_attr(0)})], [("z", 5)], 2, 2)


def unary(op, *attrs_shape):
    """A one-input branch/body graph a -> op(a) (or broadcast_to a shape)."""
    attrs = {"shape": shape_attr(*attrs_shape)} if attrs_shape else {}
    operands = [0, 0] if op == "gt" else [0]
    return hand_graph([(0, "a", [])], [(1, op, operands, attrs)], [("r0", 1)])


def test_hand_built_loop_protos_evaluate(rpc, client):
    """Well-formed hand-built scan, while_loop and cond protos evaluate to their values."""
    feeds = {"x": 0.5, "v": np.array([1.0, 2.0, 3.0])}
    tensors = {k: to_tensor(v) for k, v in feeds.items()}
    c, entering = 0.5, []
    for x in (1.0, 2.0, 3.0):
        entering.append(c)
        c = np.tanh(c * x)
    resp = rpc.Evaluate(S.EvaluateRequest(graph=scan_graph(tanh_body()), inputs=tensors))
    close(from_tensor(resp.outputs["z"]), c, "final carry", rtol=1e-14)
    ys = client.evaluate(scan_graph(tanh_body(), index=1), feeds)["z"]
    close(ys, entering, "ys", rtol=1e-14)
    below4 = hand_graph([(0, "c", [])], [(1, "constant", [], {}, to_tensor(4.0)),
                                         (2, "lt", [0, 1])], [("pred", 2)])
    twice = hand_graph([(0, "a", [])], [(1, "add", [0, 0])], [("r0", 1)])
    resp = rpc.Evaluate(S.EvaluateRequest(graph=while_graph(below4, twice), inputs=tensors))
    assert from_tensor(resp.outputs["z"]) == 4.0  # 0.5 -> 1 -> 2 -> 4: 3 = max_iters
    branch = rpc.Evaluate(S.EvaluateRequest(graph=cond_graph(unary("neg"), unary("sin")),
                                            inputs=tensors))
    assert from_tensor(branch.outputs["z"]) == -0.5  # x > x is false: branch 0


def version_cases():
    """(ir, opset, words): a scan graph declaring too old a version."""
    return [(1, 1, ("opset 2", "scan")), (2, 1, ("opset 2", "scan")),
            (1, 2, ("IR version 2",))]


@pytest.mark.parametrize("ir,opset,words", version_cases())
def test_old_version_with_a_scan_is_refused_naming_the_node(rpc, client, ir, opset, words):
    """A scan in a graph that declares IR or opset 1: VersionError naming the scan node,
    over the wire and from the SDK; the server keeps serving."""
    g = scan_graph(tanh_body(), ir=ir, opset=opset)
    expect(lambda: rpc.Evaluate(S.EvaluateRequest(graph=g, inputs={
        "x": to_tensor(0.5), "v": to_tensor(np.ones(3))})), INVALID, "VersionError",
        "nodes[id=2]", words)
    with pytest.raises(VersionError) as e:
        client.evaluate(g, {"x": 0.5, "v": np.ones(3)})
    assert e.value.field == "nodes[id=2]"
    assert_alive(rpc)


def bad_protos():
    """(id, graph, error class, field, words in the description)."""
    free = hand_graph([(10, "c", []), (11, "x", [])], [(12, "mul", [10, 0]), (13, "tanh", [12])],
                      [("c0", 13), ("y0", 11)])  # reads %0, the outer x
    unbound = hand_graph([(0, "c", []), (1, "x", []), (2, "k", [])],
                         [(3, "mul", [0, 2])], [("c0", 3), ("y0", 1)])
    input_op = hand_graph([(0, "c", []), (1, "x", [])], [(2, "mul", [0, 1]), (4, "input", [])],
                          [("c0", 2), ("y0", 4)])
    reshaped = hand_graph([(0, "c", []), (1, "x", [])],
                          [(2, "mul", [0, 1]), (3, "broadcast_to", [2], {"shape": shape_attr(2)})],
                          [("c0", 3), ("y0", 0)])
    to_bool = hand_graph([(0, "c", []), (1, "x", [])], [(2, "gt", [0, 1])],
                         [("c0", 2), ("y0", 0)])
    bool_pred = hand_graph([(0, "c", [])], [(1, "gt", [0, 0])], [("pred", 1)])
    return [
        ("free-variable", scan_graph(free), UndefinedReferenceError,
         "nodes[id=2].attrs.body.nodes[id=12]", ("%0", "not defined")),
        ("unbound-body-input", scan_graph(unbound), InvalidGraphError, "nodes[id=2]",
         ("body has 3 inputs",)),
        ("input-op-in-body", scan_graph(input_op), UnknownOpError,
         "nodes[id=2].attrs.body.nodes[id=4]", ("input",)),
        ("carry-shape", scan_graph(reshaped), ShapeError, "nodes[id=2]",
         ("carry 0 (c)", "float64[]", "float64[2]")),
        ("carry-dtype", scan_graph(to_bool), DTypeError, "nodes[id=2]",
         ("carry 0 (c)", "bool[]")),
        ("while-carry-dtype", while_graph(bool_pred, unary("gt")), DTypeError, "nodes[id=2]",
         ("carry 0", "bool[]")),
        ("while-float-condition", while_graph(unary("neg"), unary("neg")), DTypeError,
         "nodes[id=2]", ("condition", "bool scalar")),
        ("output-is-the-scan", scan_graph(tanh_body(), outputs=[("z", 2)]), InvalidGraphError,
         "outputs.z", ("several results", "element")),
        ("element-out-of-range", scan_graph(tanh_body(), index=5), AttributeError_,
         "nodes[id=3]", ("index 5", "2 results")),
        ("element-negative", scan_graph(tanh_body(), index=-1), AttributeError_,
         "nodes[id=3]", ("index -1",)),
        ("length-vs-xs", scan_graph(tanh_body(), length=4), ShapeError, "nodes[id=2]",
         ("length 4",)),
        ("too-many-carries", scan_graph(tanh_body(), carries=5), AttributeError_,
         "nodes[id=2]", ("carries=5",)),
        ("cond-branch-shapes", cond_graph(unary("neg"), unary("broadcast_to", 2)),
         ShapeError, "nodes[id=4]", ("branch 1", "float64[2]", "same types")),
        ("cond-branch-dtypes", cond_graph(unary("neg"), unary("gt")), DTypeError,
         "nodes[id=4]", ("branch 1", "bool[]", "same types")),
    ]


BAD = bad_protos()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_malformed_loop_protos_are_invalid_argument(rpc, client, case):
    """Each malformed loop proto: INVALID_ARGUMENT whose field and description name what
    is wrong; the SDK and the local client raise the same class with the same field; the
    server keeps serving."""
    _, graph, cls, field, words = case
    feeds = {"x": 0.5, "v": np.ones(3)}
    expect(lambda: rpc.Evaluate(S.EvaluateRequest(graph=graph, inputs={
        k: to_tensor(v) for k, v in feeds.items()})), INVALID, cls.__name__, field, words)
    with pytest.raises(cls) as remote:
        client.value_and_grad(graph, wrt=["x"], inputs=feeds)
    with pytest.raises(cls) as local:
        LOCAL.evaluate(graph, feeds)
    assert remote.value.field == local.value.field == field
    assert_alive(rpc)


# -- limits -----------------------------------------------------------------------------------
def chain_body(n: int) -> ir_pb2.Graph:
    """c -> sin(sin(...(c))) with n sins."""
    return hand_graph([(0, "c", [])], [(i, "sin", [i - 1]) for i in range(1, n + 1)],
                      [("c0", n)])


def loop_around(body: ir_pb2.Graph, length: int = 2) -> ir_pb2.Graph:
    """z = element(scan(x; body, length), 0): three top-level nodes."""
    return hand_graph([(0, "x", [])], [
        (1, "scan", [0], {"body": graph_attr(body), "carries": int_attr(1), "xs": int_attr(0),
                          "length": int_attr(length)}),
        (2, "element", [1], {"index": int_attr(0)})], [("z", 2)], 2, 2)


def test_node_limit_counts_sub_graph_nodes():
    """max_nodes=50: a scan whose body has 60 nodes (3 at the top level) and a cond whose
    branches have 30 each are refused naming the sub-graph; a 30-node body evaluates."""
    small = loop_around(chain_body(30))
    big = loop_around(chain_body(60))
    branches = hand_graph([(0, "x", [])], [
        (1, "gt", [0, 0]),
        (2, "cond", [1, 0], {"branches": graphs_attr(chain_body(28), chain_body(28))}),
        (3, "element", [2], {"index": int_attr(0)})], [("z", 3)], 2, 2)
    assert len(big.nodes) + len(big.inputs) == 3 and proto_nodes(big) > 50
    with running_server(ServerConfig(max_nodes=50)) as (_, target), channel(target) as ch, \
            adsvc.connect(target, timeout=30) as c:
        rpc = stub(ch)
        x = {"x": to_tensor(0.5)}
        v = 0.5
        for _ in range(60):
            v = np.sin(v)
        out = rpc.Evaluate(S.EvaluateRequest(graph=small, inputs=x)).outputs["z"]
        close(from_tensor(out), v, "30 sins twice", rtol=1e-14)
        expect(lambda: rpc.Evaluate(S.EvaluateRequest(graph=big, inputs=x)), EXHAUSTED,
               "LimitExceededError", "nodes[id=1].attrs.body", ("50",))
        expect(lambda: rpc.Evaluate(S.EvaluateRequest(graph=branches, inputs=x)), EXHAUSTED,
               "LimitExceededError", "nodes[id=2].attrs.branches[1]", ("50",))
        with pytest.raises(LimitExceededError):
            c.evaluate(big, {"x": 0.5})
        assert_alive(rpc)


def nested_scans(depth: int) -> ir_pb2.Graph:
    """`depth` scans of length 1 nested in each other's bodies; the innermost body
    negates: z = -x."""
    body = hand_graph([(0, "c", [])], [(1, "neg", [0])], [("c0", 1)])
    for _ in range(depth - 1):
        body = loop_around(body, 1)
        body.inputs[0].name, body.outputs[0].name = "c", "c0"
    return loop_around(body, 1)


def deep_request(depth: int) -> S.EvaluateRequest:
    """An EvaluateRequest whose graph nests `depth` scans, built in place (deeper than the
    protobuf parser's own recursion limit, which copying would hit)."""
    req = S.EvaluateRequest(inputs={"x": to_tensor(0.5)})
    g = req.graph
    for d in range(depth, -1, -1):
        g.ir_version = g.opset_version = 2
        g.inputs.add(id=0, name="c", type=ir_pb2.TensorType(dtype=F64))
        if d == 0:
            g.nodes.add(id=1, op="neg", operands=[0])
            g.outputs.add(name="c0", id=1)
            break
        n = g.nodes.add(id=1, op="scan", operands=[0])
        for k, v in (("carries", 1), ("xs", 0), ("length", 1)):
            n.attrs[k].i = v
        g.nodes.add(id=2, op="element", operands=[1]).attrs["index"].i = 0
        g.outputs.add(name="c0", id=2)
        g = n.attrs["body"].graph
    req.graph.inputs[0].name, req.graph.outputs[0].name = "x", "z"
    return req


def test_nesting_deeper_than_max_depth_is_a_limit_error(rpc, client):
    """MAX_DEPTH nested bodies evaluate; one more is RESOURCE_EXHAUSTED (server), a
    LimitExceededError (SDK and local decoder), not a RecursionError; a request nested
    beyond what protobuf parses is INVALID_ARGUMENT; the server keeps serving."""
    ok = nested_scans(MAX_DEPTH)
    resp = rpc.Evaluate(S.EvaluateRequest(graph=ok, inputs={"x": to_tensor(0.5)}))
    assert from_tensor(resp.outputs["z"]) == -0.5
    deep = nested_scans(MAX_DEPTH + 1)
    expect(lambda: rpc.Evaluate(S.EvaluateRequest(graph=deep, inputs={"x": to_tensor(0.5)})),
           EXHAUSTED, "LimitExceededError", "nodes[id=1].attrs.body*",
           (f"nested more than {MAX_DEPTH} deep",))
    with pytest.raises(LimitExceededError):
        client.evaluate(deep, {"x": 0.5})
    with pytest.raises(LimitExceededError):
        LOCAL.evaluate(deep, {"x": 0.5})
    with pytest.raises(LimitExceededError):
        adsvc.from_proto(deep)
    for depth in (40, 1000):
        expect(lambda d=depth: rpc.Evaluate(deep_request(d), timeout=30), INVALID,
               "InvalidRequestError", None)
    assert_alive(rpc)


def test_tensor_element_limit_applies_inside_bodies():
    """max_tensor_elements=1000: a 10 x 1000 intermediate is refused at the top level,
    and equally inside a scan body (the limit is on any intermediate result)."""
    def big(c):
        return adsvc.sum(adsvc.sin(adsvc.broadcast_to(c, (10, 1000)))) * 1e-9
    plain = adsvc.trace(lambda x: x + big(x), x=f64())
    in_body = adsvc.trace(lambda x: adsvc.scan(lambda c, _: (c + big(c), None), x,
                                               length=2)[0], x=f64())
    with running_server(ServerConfig(max_tensor_elements=1000)) as (_, target), \
            adsvc.connect(target, timeout=30) as c:
        with pytest.raises(LimitExceededError):
            c.evaluate(plain, x=1.0)
        with pytest.raises(LimitExceededError):
            c.evaluate(in_body, x=1.0)


def sin_chain_fn(n: int):
    """c -> 1.01 * sin(...) applied n times (2n nodes)."""
    def f(c):
        for _ in range(n):
            c = adsvc.sin(c) * 1.01
        return c
    return f


def test_compiled_node_limit_counts_body_nodes():
    """max_compiled_nodes=400: the reverse graph of a 300-node chain is refused; the same
    chain as a scan body must be refused too, or compile to at most 400 nodes with its
    bodies."""
    chain = sin_chain_fn(150)
    plain = adsvc.trace(lambda x: chain(x), x=f64())
    in_body = adsvc.trace(lambda x: adsvc.scan(lambda c, _: (chain(c), None), x,
                                               length=2)[0], x=f64())
    diff = S.Differentiation(modes=[S.MODE_REVERSE], seed=True)
    with running_server(ServerConfig(max_compiled_nodes=400)) as (_, target), \
            channel(target) as ch:
        rpc = stub(ch)
        expect(lambda: rpc.Differentiate(S.DifferentiateRequest(
            graph=adsvc.to_proto(plain), differentiation=diff)), EXHAUSTED,
            "LimitExceededError", "differentiation")
        try:
            resp = rpc.Differentiate(S.DifferentiateRequest(graph=adsvc.to_proto(in_body),
                                                            differentiation=diff))
        except grpc.RpcError as e:
            assert e.code() == EXHAUSTED, e.details()
        else:
            assert proto_nodes(resp.graph) <= 400, (
                f"compiled graph has {proto_nodes(resp.graph)} nodes with its bodies "
                f"({len(resp.graph.nodes) + len(resp.graph.inputs)} at the top level)")


def test_compile_checks_reach_loop_bodies():
    """Deadlines and cancellation stop a compile through `check`, which every pass calls
    every CHECK_EVERY nodes: differentiating a scan whose body has 3000 nodes must call
    it as often as for the same nodes at the top level (else a deadline waits for all
    the body's passes)."""
    chain = sin_chain_fn(1500)
    plain = adsvc.trace(lambda x: chain(x), x=f64())
    in_body = adsvc.trace(lambda x: adsvc.scan(lambda c, _: (chain(c), None), x,
                                               length=2)[0], x=f64())
    counts = []
    for g in (plain, in_body):
        calls = []
        compile_graph(g, ("reverse",), None, True, check=lambda c=calls: c.append(1))
        counts.append(len(calls))
    assert counts[0] >= 3000 // CHECK_EVERY
    assert counts[1] >= 3000 // CHECK_EVERY, f"check called {counts[1]} times in the body " \
        f"compile vs {counts[0]} for the unrolled chain"


def checkpointed_nest(depth: int):
    """`depth` nested scans; the outermost (4 steps) is checkpointed every 2nd carry, the
    inner ones run once: the reverse graph nests one level deeper (segment bodies)."""
    def level(d, top):
        def f(c):
            if d == 0:
                return adsvc.sin(c)
            n, ck = (4, 2) if top else (1, None)
            return adsvc.scan(lambda c_, _: (level(d - 1, False)(c_), None), c, length=n,
                              checkpoint=ck)[0]
        return f
    return adsvc.trace(lambda x: level(depth, True)(x), x=f64())


def test_differentiated_graphs_stay_within_the_nesting_limit(rpc):
    """A graph at MAX_DEPTH the server accepts: its reverse graph (the checkpointed scan
    adds a level) must either be refused with a limit error or come back as a graph the
    codec reads, evaluating to the local gradient. (It is refused, by both clients; one
    level less goes through.)"""
    with pytest.raises(LimitExceededError, match="nests loop bodies 17 deep"):
        LOCAL.value_and_grad(checkpointed_nest(MAX_DEPTH), x=0.3)
    with pytest.raises(grpc.RpcError) as e:
        rpc.Differentiate(S.DifferentiateRequest(
            graph=adsvc.to_proto(checkpointed_nest(MAX_DEPTH)), differentiation=S.Differentiation(
                modes=[S.MODE_REVERSE], seed=True)), timeout=60)
    assert e.value.code() == EXHAUSTED and "nests loop bodies 17 deep" in e.value.details()
    g = checkpointed_nest(MAX_DEPTH - 1)
    value, grads = LOCAL.value_and_grad(g, x=0.3)
    try:
        resp = rpc.Differentiate(S.DifferentiateRequest(
            graph=adsvc.to_proto(g), differentiation=S.Differentiation(
                modes=[S.MODE_REVERSE], seed=True)), timeout=60)
    except grpc.RpcError as e:
        assert e.code() == EXHAUSTED, e.details()
        return
    back = adsvc.from_proto(resp.graph)  # LimitExceededError: the server's own output
    out = LOCAL.evaluate(back, x=0.3)
    close(out["out"], value, "value", rtol=1e-12)
    close(out["grad:x"], grads["x"], "grad", rtol=1e-10)
    assert_alive(rpc)


# -- max_iters, deadlines, cancellation ---------------------------------------------------------
def doubling(max_iters: int):
    """while x < 100: x *= 2, at most max_iters times."""
    return adsvc.trace(lambda x: adsvc.while_loop(lambda s: s < 100.0, lambda s: s * 2.0, x,
                                                  max_iters=max_iters), x=f64())


def test_while_loop_over_max_iters_is_an_evaluation_error(rpc, client):
    """More than max_iters iterations: INVALID_ARGUMENT EvaluationError naming the loop
    node and max_iters, by Evaluate and Gradient, from the SDK in both modes and as a
    nested loop; within max_iters the value and gradient are right."""
    g = adsvc.to_proto(doubling(3))
    x = {"x": to_tensor(1.0)}
    for call in (lambda: rpc.Evaluate(S.EvaluateRequest(graph=g, inputs=x)),
                 lambda: rpc.Gradient(S.GradientRequest(graph=g, inputs=x))):
        expect(call, INVALID, "EvaluationError", "nodes[id=1]", ("max_iters=3", "while_loop"))
    for mode in ("reverse", "forward"):
        with pytest.raises(EvaluationError) as e:
            client.value_and_grad(g, mode=mode, x=1.0)
        assert "max_iters=3" in e.value.description
    assert client.value_and_grad(g, x=30.0) == (120.0, {"x": 4.0})
    nested = adsvc.trace(lambda x: adsvc.scan(lambda c, _: (adsvc.while_loop(
        lambda s: s < 10.0, lambda s: s + 1.0, c, max_iters=2), None), x, length=3)[0],
        x=f64())
    assert client.evaluate(nested, x=9.5)["out"] == 10.5
    with pytest.raises(EvaluationError) as e:
        client.evaluate(nested, x=0.0)
    assert "max_iters=2" in e.value.description and e.value.field == "nodes[id=1]"
    assert_alive(rpc)


LONG = 3_000_000  # cheap iterations: seconds of work, far beyond the deadlines below


def long_loops():
    """(id, graph): a while_loop, a scan, and a while_loop around 1000-step scans, each
    of LONG cheap iterations. The plain scan's cost is known before it runs (the server
    may refuse it up front); the while_loops' is not (they are stopped inside)."""
    wl = adsvc.trace(lambda x: adsvc.while_loop(
        lambda s: s[0] < float(LONG), lambda s: (s[0] + 1.0, s[1] * 0.999 + 0.001),
        (adsvc.zeros(()), x), max_iters=LONG + 1)[1], x=f64())

    def steps(c, n):
        return adsvc.scan(lambda s, _: (s * 0.999 + 0.001, None), c, length=n)[0]
    sc = adsvc.trace(lambda x: steps(x, LONG), x=f64())
    nested = adsvc.trace(lambda x: adsvc.while_loop(
        lambda s: s[0] < float(LONG // 1000), lambda s: (s[0] + 1.0, steps(s[1], 1000)),
        (adsvc.zeros(()), x), max_iters=LONG)[1], x=f64())
    return [("while_loop", wl), ("scan", sc), ("scan-in-while", nested)]


LONG_IDS = ["while_loop", "scan", "scan-in-while"]


@pytest.fixture(scope="module")
def long_server():
    with running_server() as (_srv, target), channel(target) as ch:
        yield stub(ch), target





def assert_stopped_and_serving(rpc, target, before):
    """The interrupted call left (one call in flight: ours), was counted as interrupted,
    and the server answers health and a loop evaluation."""
    assert wait_until(lambda: (s := stats(rpc)).calls_in_flight == 1
                      and s.evaluations_interrupted == before + 1)
    with channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    short = adsvc.to_proto(doubling(10))
    resp = rpc.Evaluate(S.EvaluateRequest(graph=short, inputs={"x": to_tensor(3.0)}),
                        timeout=10)
    assert from_tensor(resp.outputs["out"]) == 192.0


@pytest.mark.parametrize("name,graph", long_loops(), ids=LONG_IDS)
def test_deadline_stops_a_long_loop(long_server, caplog, name, graph):
    """A 0.5 s deadline on 3M loop iterations: DEADLINE_EXCEEDED, the server's worker
    stops (its log counts fewer iterations than the loop has: none for a loop refused by
    its estimate) and the server keeps serving."""
    rpc, target = long_server
    before = stats(rpc).evaluations_interrupted
    rid = f"cf-deadline-{name}"
    with caplog.at_level("INFO", logger="adsvc.server"):
        with pytest.raises(grpc.RpcError) as e:
            rpc.Evaluate(S.EvaluateRequest(graph=adsvc.to_proto(graph), inputs={
                "x": to_tensor(0.5)}), timeout=0.5, metadata=[("x-request-id", rid)])
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert_stopped_and_serving(rpc, target, before)
    assert stopped_steps(caplog, rid, "DEADLINE_EXCEEDED") < LONG


@pytest.mark.parametrize("name,graph", long_loops(), ids=LONG_IDS)
def test_cancellation_stops_a_long_loop(long_server, caplog, name, graph):
    """Cancelling the call while the loop runs stops the server's loop too."""
    rpc, target = long_server
    before = stats(rpc).evaluations_interrupted
    rid = f"cf-cancel-{name}"
    with caplog.at_level("INFO", logger="adsvc.server"):
        future = rpc.Evaluate.future(S.EvaluateRequest(graph=adsvc.to_proto(graph), inputs={
            "x": to_tensor(0.5)}), timeout=120, metadata=[("x-request-id", rid)])
        assert wait_until(lambda: stats(rpc).calls_in_flight == 2)
        future.cancel()
        assert_stopped_and_serving(rpc, target, before)
    assert stopped_steps(caplog, rid, "CANCELLED") < LONG


def test_sdk_timeout_in_a_gradient_of_a_long_loop(long_server):
    """The SDK's timeout on the gradient of a long while_loop raises
    DeadlineExceededError and the server's loop stops."""
    rpc, target = long_server
    _, wl = long_loops()[0]
    before = stats(rpc).evaluations_interrupted
    with adsvc.connect(target) as c, pytest.raises(DeadlineExceededError):
        c.value_and_grad(wl, x=0.5, mode="forward", timeout=1.0)
    assert_stopped_and_serving(rpc, target, before)


# -- compile once, evaluate many ---------------------------------------------------------------
def loop_program(n: int):
    """A scan, a while_loop, a cond and a fori_loop, each running ~n steps."""
    def prog(x, w):
        # (xs and summed ys would be constants whose form, a literal or a broadcast,
        # depends on their size; the loops themselves do not)
        c, _ = adsvc.scan(lambda c, _: (adsvc.tanh(c * w + 0.1), None), x, length=n)
        zero = adsvc.cast(adsvc.zeros(()), "int64")
        d = adsvc.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] * w + 0.01),
                             (zero, c), max_iters=n + 1)[1]
        e = adsvc.cond(d > 0.0, lambda u: u * w, lambda u: -u, d)
        return adsvc.fori_loop(0, n, lambda i, q: q * 0.9 + w * 0.1, e)
    return adsvc.trace(prog, x=f64(), w=f64())


def test_two_traces_of_a_loop_share_the_server_handle(rpc, server):
    """Two separate traces of the same loop program have the same key, the same proto
    bytes and the same server handle (the second Differentiate is a cache hit); a fresh
    SDK client with a third trace compiles nothing new."""
    g1, g2 = loop_program(5), loop_program(5)
    assert g1.key == g2.key
    p1, p2 = adsvc.to_proto(g1), adsvc.to_proto(g2)
    assert p1.SerializeToString() == p2.SerializeToString()
    diff = S.Differentiation(modes=[S.MODE_REVERSE], seed=True)
    first = rpc.Differentiate(S.DifferentiateRequest(graph=p1, differentiation=diff))
    again = rpc.Differentiate(S.DifferentiateRequest(graph=p2, differentiation=diff))
    assert first.handle == again.handle and again.stats.cache_hit
    other = rpc.Differentiate(S.DifferentiateRequest(graph=adsvc.to_proto(loop_program(6)),
                                                     differentiation=diff))
    assert other.handle != first.handle
    feeds = {"x": 0.3, "w": 0.8}
    with adsvc.connect(server[1], timeout=30) as c1:
        v1 = c1.value_and_grad(g1, inputs=feeds)
    before = stats(rpc)
    with adsvc.connect(server[1], timeout=30) as c2:
        v2 = c2.value_and_grad(loop_program(5), inputs=feeds)
    after = stats(rpc)
    assert (after.cache_size, after.cache_misses) == (before.cache_size, before.cache_misses)
    assert v1[0] == v2[0] and all(np.array_equal(v1[1][k], v2[1][k]) for k in feeds)
    lv, lg = LOCAL.value_and_grad(g1, inputs=feeds)
    close(v1[0], lv, "value", rtol=1e-12)
    for k in feeds:
        close(v1[1][k], lg[k], k, rtol=1e-10)


def test_graph_sizes_do_not_depend_on_the_step_count(rpc):
    """Traces with 5 and 500 steps have the same number of nodes (with their bodies), the
    same proto node count, and the server's compiled reverse graphs the same sizes; both
    gradients are right (finite differences)."""
    small, large = loop_program(5), loop_program(500)
    assert len(small.nodes) == len(large.nodes)
    assert total_nodes(small) == total_nodes(large)
    assert proto_nodes(adsvc.to_proto(small)) == proto_nodes(adsvc.to_proto(large))
    diff = S.Differentiation(modes=[S.MODE_REVERSE], seed=True)
    sizes = []
    for g in (small, large):
        resp = rpc.Differentiate(S.DifferentiateRequest(graph=adsvc.to_proto(g),
                                                        differentiation=diff))
        sizes.append((resp.stats.nodes_before, resp.stats.nodes_after, proto_nodes(resp.graph)))
        feeds = {"x": np.array(0.3), "w": np.array(0.8)}
        grads = from_tensor(rpc.Gradient(S.GradientRequest(handle=resp.handle, inputs={
            k: to_tensor(v) for k, v in feeds.items()})).gradients["w"])
        close(grads, fd_grad(LOCAL, g, feeds, ["w"])["w"], "grad w")
    assert sizes[0] == sizes[1]


def test_evaluate_many_by_handle_over_a_stream(rpc):
    """One compiled loop graph, five feeds over EvaluateStream by handle: each answer
    equals the local evaluation."""
    g = loop_program(7)
    handle = rpc.Differentiate(S.DifferentiateRequest(graph=adsvc.to_proto(g),
                                                      omit_graph=True)).handle
    xs = [-0.5, -0.1, 0.2, 0.6, 1.1]

    def requests():
        yield S.EvaluateStreamRequest(target=S.StreamTarget(handle=handle))
        for x in xs:
            yield S.EvaluateStreamRequest(feed=S.Feed(inputs={"x": to_tensor(x),
                                                              "w": to_tensor(0.7)}))
    responses = list(rpc.EvaluateStream(requests(), timeout=30))
    assert [r.index for r in responses] == list(range(len(xs)))
    for x, r in zip(xs, responses):
        close(from_tensor(r.outputs["out"]), LOCAL.evaluate(g, x=x, w=0.7)["out"], f"x={x}",
              rtol=1e-12)
