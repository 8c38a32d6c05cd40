"""Every RPC of the service against a real in-process server, health and reflection, and
the SDK (adsvc.connect) agreeing with the local client."""

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_fixtures import channel, running_server, seed_graph, stub

import adsvc
from adsvc.ir.codec import IR_VERSION, OPSET_VERSION
from adsvc.ir.opdef import OPS
from adsvc.runtime.plan import Plan
from adsvc.server.config import ServerConfig
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor

XY = {"x": to_tensor(3.0), "y": to_tensor(4.0)}




def values(tensors):
    return {k: from_tensor(v) for k, v in tensors.items()}


def test_differentiate_returns_graph_handle_and_stats(rpc):
    req = S.DifferentiateRequest(graph=seed_graph(), differentiation=S.Differentiation(
        modes=[S.MODE_REVERSE], seed=True))
    first = rpc.Differentiate(req)
    again = rpc.Differentiate(req)
    assert len(first.handle) == 64 and first.handle == again.handle
    assert first.stats.nodes_before == 7 and first.stats.nodes_after == len(
        first.graph.inputs) + len(first.graph.nodes)
    assert again.stats.cache_hit and again.stats.compile_seconds == 0
    assert [o.name for o in first.graph.outputs] == ["z", "grad:x", "grad:y"]
    assert [i.name for i in first.inputs] == ["x", "y"]
    assert [o.name for o in first.outputs] == ["z", "grad:x", "grad:y"]
    omitted = rpc.Differentiate(S.DifferentiateRequest(
        graph=seed_graph(), differentiation=req.differentiation, omit_graph=True))
    assert omitted.handle == first.handle and not omitted.graph.nodes
    # the returned IR evaluates to the derivatives
    out = values(rpc.Evaluate(S.EvaluateRequest(graph=first.graph, inputs=XY)).outputs)
    assert (out["z"], out["grad:x"], out["grad:y"]) == (23.0, 10.0, 3.0)


def test_differentiate_forward_adds_tangents_and_order_repeats_mode(rpc):
    fwd = rpc.Differentiate(S.DifferentiateRequest(graph=seed_graph(), differentiation=S.
                                                   Differentiation(modes=[S.MODE_FORWARD])))
    assert {i.name for i in fwd.inputs} == {"x", "y", "tangent:x", "tangent:y"}
    assert {o.name for o in fwd.outputs} == {"z", "tangent:z"}
    second = rpc.Differentiate(S.DifferentiateRequest(
        graph=seed_graph(), differentiation=S.Differentiation(modes=[S.MODE_FORWARD], order=2)))
    assert "tangent2:tangent:z" in {o.name for o in second.outputs}


def test_evaluate_by_graph_and_by_handle(rpc):
    by_graph = rpc.Evaluate(S.EvaluateRequest(graph=seed_graph(), inputs=XY))
    assert values(by_graph.outputs) == {"z": 23.0}
    by_handle = rpc.Evaluate(S.EvaluateRequest(handle=by_graph.handle, inputs=XY))
    assert values(by_handle.outputs) == {"z": 23.0}
    fwd = rpc.Evaluate(S.EvaluateRequest(
        graph=seed_graph(), differentiation=S.Differentiation(modes=[S.MODE_FORWARD]),
        inputs={**XY, "tangent:x": to_tensor(1.0), "tangent:y": to_tensor(0.0)}))
    assert values(fwd.outputs) == {"z": 23.0, "tangent:z": 10.0}


def test_evaluate_output_filter_runs_and_returns_only_those(rpc, server, monkeypatch):
    """An Evaluate with output_filter returns just the named outputs (the gradient
    without its value: the value's own steps are not run, `Plan.only`), equal to the
    unfiltered call's; the SDK's grad sends it."""
    n = 1 << 15  # a tensor graph: a plan of steps, not a tape
    rng = np.random.default_rng(2)
    x = rng.standard_normal(n)
    g = adsvc.trace(lambda x: adsvc.sum(adsvc.sin(x) * x), x=adsvc.f64(n))
    diff = S.Differentiation(modes=[S.MODE_REVERSE], seed=True)
    full = rpc.Evaluate(S.EvaluateRequest(graph=adsvc.to_proto(g), differentiation=diff,
                                          inputs={"x": to_tensor(x)}))
    only = rpc.Evaluate(S.EvaluateRequest(handle=full.handle, inputs={"x": to_tensor(x)},
                                          output_filter=["grad:x"]))
    assert set(values(full.outputs)) == {"out", "grad:x"} and list(only.outputs) == ["grad:x"]
    np.testing.assert_array_equal(from_tensor(only.outputs["grad:x"]),
                                  from_tensor(full.outputs["grad:x"]))
    seed = rpc.Evaluate(S.EvaluateRequest(  # a scalar graph's tape computes every output
        graph=seed_graph(), differentiation=diff, inputs=XY, output_filter=["grad:y"]))
    assert values(seed.outputs) == {"grad:y": 3.0}
    small = adsvc.trace(lambda x: adsvc.sum(adsvc.sin(x) * x), x=adsvc.f64(8))
    cuts = []
    only_of = Plan.only
    monkeypatch.setattr(Plan, "only", lambda self, names: cuts.append(names) or only_of(
        self, names))
    with adsvc.connect(server[1]) as c:  # the lean request (256 KiB) and a message
        assert c.grad(g, x=x)["x"].tobytes() == from_tensor(full.outputs["grad:x"]).tobytes()
        np.testing.assert_array_equal(c.grad(small, x=x[:8])["x"],
                                      adsvc.local().grad(small, x=x[:8])["x"])
    assert cuts == [("grad:x",)] * 3  # both SDK calls (and the local one) asked for less


@pytest.mark.parametrize("mode", [S.MODE_REVERSE, S.MODE_FORWARD, S.MODE_UNSPECIFIED])
def test_gradient_seed_example(rpc, mode):
    resp = rpc.Gradient(S.GradientRequest(graph=seed_graph(), mode=mode, inputs=XY))
    assert from_tensor(resp.value) == 23.0 and resp.output_name == "z"
    assert values(resp.gradients) == {"x": 10.0, "y": 3.0}
    again = rpc.Gradient(S.GradientRequest(handle=resp.handle, mode=mode, inputs=XY))
    assert values(again.gradients) == {"x": 10.0, "y": 3.0}
    only_y = rpc.Gradient(S.GradientRequest(graph=seed_graph(), mode=mode, wrt=["y"],
                                            inputs=XY))
    assert values(only_y.gradients) == {"y": 3.0}


def test_evaluate_stream_answers_every_feed_in_order(rpc):
    def requests():
        yield S.EvaluateStreamRequest(target=S.StreamTarget(graph=seed_graph()))
        for x in range(5):
            yield S.EvaluateStreamRequest(feed=S.Feed(inputs={"x": to_tensor(float(x)),
                                                               "y": to_tensor(4.0)}))
    responses = list(rpc.EvaluateStream(requests()))
    assert [r.index for r in responses] == list(range(5))
    assert [float(from_tensor(r.outputs["z"])) for r in responses] == [
        x * x + 4 * x + 2 for x in range(5)]
    handle = responses[0].handle

    def by_handle():
        yield S.EvaluateStreamRequest(target=S.StreamTarget(handle=handle))
        yield S.EvaluateStreamRequest(feed=S.Feed(inputs=XY))
    assert [from_tensor(r.outputs["z"]) for r in rpc.EvaluateStream(by_handle())] == [23.0]
    assert list(rpc.EvaluateStream(iter([]))) == []


def test_server_info_lists_ops_limits_and_counters(rpc):
    info = rpc.GetServerInfo(S.GetServerInfoRequest())
    assert info.server_version == adsvc.__version__
    assert (info.ir_version, info.opset_version) == (IR_VERSION, OPSET_VERSION)
    ops = {o.name: o for o in info.ops}
    assert set(ops) == set(OPS)
    assert ops["add"].arity == 2 and not ops["add"].variadic
    assert ops["concat"].variadic
    axes = {a.name: a for a in ops["sum"].attrs}
    assert axes["axes"].kind == S.ATTR_KIND_INTS and not axes["axes"].required
    assert axes["keepdims"].kind == S.ATTR_KIND_BOOL and axes["keepdims"].default_value.b is False
    cast = {a.name: a for a in ops["cast"].attrs}
    assert cast["dtype"].required and cast["dtype"].kind == S.ATTR_KIND_DTYPE
    default = ServerConfig()
    assert info.limits.max_nodes == default.max_nodes
    assert info.limits.max_message_bytes == default.max_message_bytes
    assert info.limits.max_tensor_elements == default.max_tensor_elements
    assert not info.limits.auth_required
    assert info.stats.calls_in_flight == 1 and info.stats.calls_total >= 1 and info.pid > 0


def test_request_id_is_echoed_or_generated(rpc):
    _, call = rpc.GetServerInfo.with_call(S.GetServerInfoRequest(),
                                          metadata=[("x-request-id", "req-123")])
    assert ("x-request-id", "req-123") in [(m.key, m.value) for m in call.trailing_metadata()]
    _, call = rpc.GetServerInfo.with_call(S.GetServerInfoRequest())
    generated = {m.key: m.value for m in call.trailing_metadata()}["x-request-id"]
    assert len(generated) == 32
    with pytest.raises(grpc.RpcError) as e:
        rpc.Evaluate(S.EvaluateRequest(handle="0" * 64), metadata=[("x-request-id", "r-9")])
    assert ("x-request-id", "r-9") in [(m.key, m.value) for m in e.value.trailing_metadata()]


def test_health_and_reflection(server):
    with channel(server[1]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "adsvc.v1.AutodiffService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(refl.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="adsvc.v1.AutodiffService")]), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"adsvc.v1.AutodiffService", "grpc.health.v1.Health"} <= names
        files = answers[1].file_descriptor_response.file_descriptor_proto
        assert files, "reflection returned no descriptor for the service"


def test_log_line_per_call(rpc, caplog):
    with caplog.at_level("INFO", logger="adsvc.server"):
        rpc.GetServerInfo(S.GetServerInfoRequest(), metadata=[("x-request-id", "log-1")])
    lines = [r.getMessage() for r in caplog.records if "request_id=log-1" in r.getMessage()]
    assert len(lines) == 1 and "rpc=GetServerInfo" in lines[0] and "status=OK" in lines[0]


# -- the SDK against the server, compared with the local client ----------------------------
def test_sdk_seed_example_both_modes(client):
    g = adsvc.trace(lambda x, y: x * x + x * y + 2)
    for mode in ("reverse", "forward"):
        value, grad = client.value_and_grad(g, mode=mode, x=3.0, y=4.0)
        assert value == 23.0 and grad == {"x": 10.0, "y": 3.0}
    assert client.grad(seed_graph(), x=3.0, y=4.0) == {"x": 10.0, "y": 3.0}
    assert client.evaluate(g, x=3.0, y=4.0) == {"out": 23.0}


def _f(x, w):
    return {"a": adsvc.sum(adsvc.tanh(adsvc.matmul(w, x))), "b": adsvc.sin(x) * x}


def test_sdk_derivatives_equal_local(client):
    rng = np.random.default_rng(0)
    g = adsvc.trace(_f, x=adsvc.f64(3), w=adsvc.f64(2, 3))
    s = adsvc.trace(lambda x, w: adsvc.sum(adsvc.tanh(adsvc.matmul(w, x)) ** 2),
                    x=adsvc.f64(3), w=adsvc.f64(2, 3))
    local = adsvc.local()
    feeds = {"x": rng.normal(size=3), "w": rng.normal(size=(2, 3))}
    tangents = {"x": rng.normal(size=3), "w": rng.normal(size=(2, 3))}
    cts = {"a": 1.5, "b": rng.normal(size=3)}

    def same(a, b):
        if isinstance(a, dict):
            assert set(a) == set(b)
            for k in a:
                same(a[k], b[k])
        elif isinstance(a, tuple):
            for u, v in zip(a, b, strict=True):
                same(u, v)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

    for mode in ("forward", "reverse"):
        same(client.jacobian(g, mode=mode, **feeds), local.jacobian(g, mode=mode, **feeds))
        same(client.value_and_grad(s, mode=mode, **feeds),
             local.value_and_grad(s, mode=mode, **feeds))
    same(client.hessian(s, **feeds), local.hessian(s, **feeds))
    same(client.jvp(g, feeds, tangents), local.jvp(g, feeds, tangents))
    same(client.vjp(g, feeds, cts), local.vjp(g, feeds, cts))
    same(client.evaluate(g, feeds), local.evaluate(g, feeds))
    remote_ir = client.differentiate(g, ("reverse", "forward"), order=2, wrt="x")
    local_ir = local.differentiate(g, ("reverse", "forward"), order=2, wrt="x")
    assert isinstance(remote_ir, adsvc.Graph)
    assert [n for n, _ in remote_ir.outputs] == [n for n, _ in local_ir.outputs]
    assert [n.name for n in remote_ir.inputs] == [n.name for n in local_ir.inputs]


def test_sdk_recovers_from_a_handle_miss(server, client):
    srv, _ = server
    g = adsvc.trace(lambda x, y: x * x + x * y + 2)
    assert client.grad(g, x=3.0, y=4.0) == {"x": 10.0, "y": 3.0}
    jac = client.jacobian(g, mode="forward", x=3.0, y=4.0)  # a streaming call
    srv.adsvc_servicer.compiler.cache.clear()  # as after a restart or on another replica
    misses = srv.adsvc_servicer.compiler.cache.misses
    assert client.grad(g, x=3.0, y=4.0) == {"x": 10.0, "y": 3.0}
    srv.adsvc_servicer.compiler.cache.clear()
    assert client.jacobian(g, mode="forward", x=3.0, y=4.0) == jac
    assert srv.adsvc_servicer.compiler.cache.misses >= misses + 2  # the graph was re-sent


def test_sdk_token_auth():
    with running_server(ServerConfig(token="s3cret")) as (_, target):
        g = adsvc.trace(lambda x, y: x * x + x * y + 2)
        with adsvc.connect(target, token="s3cret", timeout=30) as ok:
            assert ok.grad(g, x=3.0, y=4.0) == {"x": 10.0, "y": 3.0}
        for token in (None, "wrong"):
            with adsvc.connect(target, token=token, timeout=30) as bad:
                with pytest.raises(adsvc.errors.UnauthenticatedError) as e:
                    bad.grad(g, x=3.0, y=4.0)
                assert e.value.field == "authorization"
        with channel(target) as ch:  # health stays open
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                stub(ch).GetServerInfo(S.GetServerInfoRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _documented_derivatives() -> dict[str, str]:
    """op -> its "differentiable" column in the op table of protos/README.md."""
    text = (Path(__file__).resolve().parents[1] / "protos" / "README.md").read_text()
    table = text[text.index("<!-- op table"):text.index("<!-- end op table -->")]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| `")]
    return {cells[1].strip().strip("`"): cells[4].strip() for cells in rows}


def test_server_info_and_op_docs_agree_on_derivatives(rpc):
    documented = _documented_derivatives()
    ops = {o.name: o for o in rpc.GetServerInfo(S.GetServerInfoRequest()).ops}
    assert set(documented) == set(ops)
    column = {S.DERIVATIVE_RULE: "yes", S.DERIVATIVE_ZERO: "zero", S.DERIVATIVE_NONE: "no"}
    for name, info in ops.items():
        assert column[info.derivative] == documented[name], name
        assert info.differentiable == (documented[name] == "yes"), name
    assert documented["exp"] == "yes" and documented["cast"] == "yes"
    assert documented["sign"] == documented["stop_gradient"] == "zero"
    assert documented["constant"] == documented["lt"] == "no"


def test_heap_trimmed_once_big_calls_pause():
    # trimming after every big call made the next one fault its memory afresh; the
    # trimmer waits for a pause of DELAY seconds, then trims once
    from adsvc.server.service import HeapTrimmer

    trims = []
    t = HeapTrimmer(lambda: trims.append(time.monotonic()))
    t.DELAY = 0.2
    start = time.monotonic()
    for _ in range(5):  # five big calls 0.1 s apart: no trim while they keep coming
        t.note()
        time.sleep(0.1)
    assert trims == []
    deadline = time.monotonic() + 5
    while not trims and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(trims) == 1 and trims[0] - start >= 0.4 + 0.2 - 0.05
    time.sleep(0.3)
    assert len(trims) == 1 and t.trims == 1
