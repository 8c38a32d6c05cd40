"""Every error class through the server: its status code, its BadRequest field violation
and ErrorInfo reason, the same typed exception from the SDK as from the local client,
and a server that keeps answering afterwards."""

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from service_fixtures import hand_graph, seed_graph

import adsvc
from adsvc.errors import (
    ArityError,
    AttributeError_,
    CycleError,
    DTypeError,
    DuplicateIdError,
    EvaluationError,
    ForwardReferenceError,
    HandleNotFoundError,
    InputError,
    LimitExceededError,
    NotDifferentiableError,
    ShapeError,
    UndefinedReferenceError,
    UnknownOpError,
    VersionError,
)
from adsvc.server.config import ServerConfig
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
# the module's server and client (the `server`/`client` fixtures of tests/conftest.py)
CLIENT_OPTIONS = {"max_message_bytes": 1024 * 1024}
LIMITS = SERVER_CONFIG = ServerConfig(max_nodes=50, max_tensor_elements=1000,
                                      max_message_bytes=256 * 1024, max_order=2)
XY = {"x": 3.0, "y": 4.0}


def ints(*v):
    return ir_pb2.AttrValue(ints=ir_pb2.IntList(values=v))


def two_inputs(nodes, outputs=None, dims=((), ())):
    return hand_graph([(0, "x", list(dims[0])), (1, "y", list(dims[1]))], nodes,
                      outputs or [("z", nodes[-1][0])])


def int_input_graph():
    g = two_inputs([(2, "cast", [1], {"dtype": ir_pb2.AttrValue(dtype=ir_pb2.DTYPE_FLOAT64)}),
                    (3, "add", [0, 2])])
    g.inputs[1].type.dtype = ir_pb2.DTYPE_INT64
    return g


def dtype_mismatch_graph():
    g = two_inputs([(2, "add", [0, 1])])
    g.inputs[1].type.dtype = ir_pb2.DTYPE_INT64
    return g


def take_graph():
    g = hand_graph([(0, "x", [3]), (1, "i", [])], [(2, "take", [0, 1])], [("z", 2)])
    g.inputs[1].type.dtype = ir_pb2.DTYPE_INT64
    return g


# (id, graph, feeds, error class, field)
GRAPH_CASES = [
    ("unknown-op", two_inputs([(2, "frobnicate", [0, 1])]), XY, UnknownOpError,
     "nodes[id=2]"),
    ("arity", two_inputs([(2, "add", [0])]), XY, ArityError, "nodes[id=2]"),
    ("bad-attribute", hand_graph([(0, "x", [3])], [(2, "sum", [0], {"axes": ir_pb2.AttrValue(
        s="all")})], [("z", 2)]), {"x": [1.0, 2.0, 3.0]}, AttributeError_, "nodes[id=2]"),
    ("undefined-ref", two_inputs([(2, "add", [0, 99])]), XY, UndefinedReferenceError,
     "nodes[id=2]"),
    ("forward-ref", two_inputs([(2, "add", [0, 3]), (3, "mul", [0, 1])]), XY,
     ForwardReferenceError, "nodes[id=2]"),
    ("duplicate-id", two_inputs([(2, "add", [0, 1]), (2, "mul", [0, 1])]), XY,
     DuplicateIdError, "nodes[id=2]"),
    ("cycle", two_inputs([(2, "add", [0, 3]), (3, "mul", [2, 1])]), XY, CycleError,
     "nodes[id=2]"),
    ("shape", two_inputs([(2, "add", [0, 1])], dims=((2,), (3,))),
     {"x": [1.0, 2.0], "y": [1.0, 2.0, 3.0]}, ShapeError, "nodes[id=2]"),
    ("dtype", dtype_mismatch_graph(), {"x": 1.0, "y": 2}, DTypeError, "nodes[id=2]"),
    ("version", hand_graph([(0, "x", [])], [(1, "neg", [0])], [("z", 1)], ir_version=9),
     {"x": 1.0}, VersionError, "ir_version"),
    ("missing-feed", seed_graph(), {"x": 3.0}, InputError, "inputs.y"),
    ("unknown-feed", seed_graph(), {**XY, "w": 1.0}, InputError, "inputs.w"),
    ("wrong-shape-feed", seed_graph(), {"x": [3.0, 1.0], "y": 4.0}, InputError, "inputs.x"),
    ("float-for-int-feed", take_graph(), {"x": [1.0, 2.0, 3.0], "i": 1.5}, InputError,
     "inputs.i"),
    ("evaluation", take_graph(), {"x": [1.0, 2.0, 3.0], "i": 7}, EvaluationError,
     "nodes[id=2]"),
    ("too-many-nodes", hand_graph([(0, "x", [])], [(i, "neg", [i - 1]) for i in range(1, 60)],
                                  [("z", 59)]), {"x": 1.0}, LimitExceededError, "nodes"),
    ("too-many-elements-declared", hand_graph([(0, "x", [10, 1000])], [(1, "neg", [0])],
                                              [("z", 1)]), {}, LimitExceededError, "inputs.x"),
    ("too-many-elements-fed", hand_graph([(0, "x", [2000])], [(1, "neg", [0])], [("z", 1)]),
     {"x": np.ones(2000)}, LimitExceededError, None),
]


def details(err: grpc.RpcError):
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    br, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    kinds = set()
    for d in status.details:
        if d.Unpack(br):
            kinds.add("BadRequest")
        elif d.Unpack(info):
            kinds.add("ErrorInfo")
    assert kinds == {"BadRequest", "ErrorInfo"}
    return br.field_violations[0], info


def expect(call, code, reason, field):
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    violation, info = details(e.value)
    assert info.reason == reason and info.domain == "adsvc"
    if field is not None:
        assert violation.field == field
    assert violation.description and "Traceback" not in e.value.details()
    return violation, info


def assert_alive(rpc):
    resp = rpc.Gradient(S.GradientRequest(graph=seed_graph(), inputs={
        "x": to_tensor(3.0), "y": to_tensor(4.0)}), timeout=30)
    assert from_tensor(resp.value) == 23.0


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_graph_and_feed_errors(rpc, client, case):
    _, graph, feeds, cls, field = case
    code = EXHAUSTED if cls is LimitExceededError else INVALID
    tensors = {k: to_tensor(v) for k, v in feeds.items()}
    _, info = expect(lambda: rpc.Evaluate(S.EvaluateRequest(graph=graph,
                                                                    inputs=tensors)),
                             code, cls.__name__, field)
    if cls is CycleError:
        assert sorted(int(c) for c in info.metadata["cycle"].split(",")) == [2, 3]
    if field and field.startswith("nodes[id=") and cls is not EvaluationError:
        assert "-->" in info.metadata["context"]  # the nearby nodes are printed
    # the SDK raises the same class, with the same field, as the local client
    with pytest.raises(cls) as remote:
        client.evaluate(graph, feeds)
    if field is not None:
        assert remote.value.field == field
    if cls is not LimitExceededError:
        with pytest.raises(cls) as local:
            adsvc.local().evaluate(graph, feeds)
        assert local.value.field == remote.value.field
    assert_alive(rpc)


def test_not_differentiable(rpc, client):
    expect(lambda: rpc.Gradient(S.GradientRequest(graph=int_input_graph(), wrt=["y"], inputs={
        "x": to_tensor(1.0), "y": to_tensor(2)})), INVALID, "NotDifferentiableError",
        "inputs.y")
    with pytest.raises(NotDifferentiableError):
        client.grad(int_input_graph(), wrt="y", x=1.0, y=2)


def test_unknown_handle_is_not_found(rpc):
    for call in (
        lambda: rpc.Evaluate(S.EvaluateRequest(handle="f" * 64)),
        lambda: rpc.Gradient(S.GradientRequest(handle="f" * 64)),
        lambda: list(rpc.EvaluateStream(iter([S.EvaluateStreamRequest(
            target=S.StreamTarget(handle="f" * 64))]))),
    ):
        expect(call, grpc.StatusCode.NOT_FOUND, HandleNotFoundError.__name__, None)
    assert_alive(rpc)


def test_bad_requests(rpc):
    g = seed_graph()
    expect(lambda: rpc.Differentiate(S.DifferentiateRequest(graph=g, differentiation=S.
           Differentiation(modes=[S.MODE_UNSPECIFIED]))), INVALID, "InvalidRequestError",
           "differentiation.modes[0]")
    expect(lambda: rpc.Differentiate(S.DifferentiateRequest(graph=g, differentiation=S.
           Differentiation(modes=[S.MODE_FORWARD, S.MODE_REVERSE], order=3))), INVALID,
           "InvalidRequestError", "differentiation.order")
    expect(lambda: rpc.Differentiate(S.DifferentiateRequest(graph=g, differentiation=S.
           Differentiation(modes=[S.MODE_FORWARD], wrt=["nope"]))), INVALID,
           "InvalidRequestError", None)
    expect(lambda: rpc.Differentiate(S.DifferentiateRequest()), INVALID,
           "InvalidRequestError", "graph")
    expect(lambda: rpc.Evaluate(S.EvaluateRequest()), INVALID, "InvalidRequestError",
           "source")
    violation, _ = expect(lambda: rpc.Evaluate(S.EvaluateRequest(
        graph=g, inputs={"x": to_tensor(3.0), "y": to_tensor(4.0)},
        output_filter=["z", "grad:x"])), INVALID, "InvalidRequestError", "output_filter")
    assert "'grad:x'" in violation.description and "'z'" in violation.description
    expect(lambda: rpc.Gradient(S.GradientRequest(graph=g, mode=7)), INVALID,
           "InvalidRequestError", "mode")
    # a handle compiled for another kind of derivative
    h = rpc.Differentiate(S.DifferentiateRequest(graph=g, differentiation=S.Differentiation(
        modes=[S.MODE_FORWARD]))).handle
    expect(lambda: rpc.Gradient(S.GradientRequest(handle=h, mode=S.MODE_REVERSE, inputs={
        "x": to_tensor(3.0), "y": to_tensor(4.0)})), INVALID, "InvalidRequestError", "handle")
    # a gradient needs a scalar output
    vec = hand_graph([(0, "x", [2])], [(1, "sin", [0])], [("z", 1)])
    expect(lambda: rpc.Gradient(S.GradientRequest(graph=vec, inputs={
        "x": to_tensor([1.0, 2.0])})), INVALID, "InvalidRequestError", "outputs")
    # a raw payload whose length disagrees with its shape
    bad = ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, dims=[2], raw=b"\0" * 8)
    expect(lambda: rpc.Evaluate(S.EvaluateRequest(graph=g, inputs={"x": bad, "y": bad})),
           INVALID, "InputError", None)
    assert_alive(rpc)


def test_stream_errors_name_the_feed(rpc):
    def requests():
        yield S.EvaluateStreamRequest(target=S.StreamTarget(graph=seed_graph()))
        yield S.EvaluateStreamRequest(feed=S.Feed(inputs={"x": to_tensor(1.0),
                                                          "y": to_tensor(1.0)}))
        yield S.EvaluateStreamRequest(feed=S.Feed(inputs={"x": to_tensor(1.0)}))
    expect(lambda: list(rpc.EvaluateStream(requests())), INVALID, "InputError",
           "feeds[1].inputs.y")
    expect(lambda: list(rpc.EvaluateStream(iter([S.EvaluateStreamRequest(feed=S.Feed())]))),
           INVALID, "InvalidRequestError", "target")


def test_limits_are_resource_exhausted(rpc, client):
    g = seed_graph()
    expect(lambda: rpc.Differentiate(S.DifferentiateRequest(graph=g, differentiation=S.
           Differentiation(modes=[S.MODE_FORWARD], order=3))), EXHAUSTED,
           "LimitExceededError", "differentiation.order")
    with pytest.raises(LimitExceededError):
        client.differentiate(g, "forward", order=3)
    # a request larger than the server's max message size (256 KiB here)
    big = hand_graph([(0, "x", [])], [(1, "neg", [0])], [("z", 1)])
    big.name = "n" * (300 * 1024)
    with pytest.raises(grpc.RpcError) as e:
        rpc.Evaluate(S.EvaluateRequest(graph=big, inputs={"x": to_tensor(1.0)}))
    assert e.value.code() == EXHAUSTED
    with pytest.raises(LimitExceededError):
        client.evaluate(big, {"x": 1.0})
    # a compiled graph whose elements exceed the limit (broadcast 10 x 1000)
    grown = hand_graph([(0, "x", [10])], [(1, "broadcast_to", [0], {"shape": ints(1000, 10)}),
                                          (2, "sum", [1])], [("z", 2)])
    expect(lambda: rpc.Evaluate(S.EvaluateRequest(graph=grown, inputs={
        "x": to_tensor(np.ones(10))})), EXHAUSTED, "LimitExceededError", "nodes")
    assert_alive(rpc)
