"""Service robustness: idle streams cannot starve the server, limits are checked before
the work, garbage requests and overflowing shapes get typed errors, the cache is bounded
by compiled nodes, the SDK splits long streams, and bearer auth follows RFC 6750."""

from __future__ import annotations

import argparse
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import channel, hand_graph, running_server, seed_graph, stub

import adsvc
from adsvc.server.app import add_serve_arguments, config_from_args
from adsvc.server.config import ServerConfig
from adsvc_protocol.lru import LRUCache
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.proto import service_pb2 as S

F64 = ir_pb2.DTYPE_FLOAT64
FEEDS = {"x": ir_pb2.Tensor(dtype=F64, values=[3.0]), "y": ir_pb2.Tensor(dtype=F64, values=[4.0])}


def wait_until(predicate, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def stats(rpc) -> S.ServerStats:
    return rpc.GetServerInfo(S.GetServerInfoRequest(), timeout=10).stats


def reason(err: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    for d in status.details if status else ():
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return f"{info.reason} {info.metadata.get('field', '')}"
    return ""


def chain(n: int) -> ir_pb2.Graph:
    return hand_graph([(0, "x", [])], [(i + 1, "sin", [i]) for i in range(n)], [("z", n)])


# -- 1. idle streams ---------------------------------------------------------------------
def test_idle_streams_cannot_starve_the_server():
    config = ServerConfig(threads=2, max_concurrent_rpcs=2, stream_idle_seconds=1.0)
    release = threading.Event()

    def idle_requests():
        yield S.EvaluateStreamRequest(target=S.StreamTarget(graph=seed_graph()))
        release.wait(30)  # the client never sends a feed

    with running_server(config) as (_, target), channel(target) as ch:
        rpc = stub(ch)
        streams = [rpc.EvaluateStream(idle_requests(), timeout=30) for _ in range(2)]
        try:
            assert wait_until(lambda: stats(rpc).calls_in_flight == 3)  # 2 streams + info
            # every slot is taken: health and server info still answer ...
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            # ... and one more adsvc call is refused at once instead of queuing
            with pytest.raises(grpc.RpcError) as e:
                rpc.Evaluate(S.EvaluateRequest(graph=seed_graph(), inputs=FEEDS), timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # the idle streams are cancelled by the server, which frees their threads
            for s in streams:
                with pytest.raises(grpc.RpcError):
                    list(s)
            assert wait_until(lambda: stats(rpc).calls_in_flight == 1)
            r = rpc.Evaluate(S.EvaluateRequest(graph=seed_graph(), inputs=FEEDS), timeout=10)
            assert np.frombuffer(r.outputs["z"].raw)[0] == 23.0
        finally:
            release.set()
            for s in streams:
                s.cancel()


def test_serve_flags_for_the_new_limits():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(
        ["--max-concurrent-rpcs", "3", "--stream-idle-seconds", "2.5",
         "--max-cache-nodes", "1000"]))
    assert (config.max_concurrent_rpcs, config.stream_idle_seconds,
            config.max_cache_nodes) == (3, 2.5, 1000)
    assert config.pool_threads > max(config.threads, config.max_concurrent_rpcs)


# -- 2. compilation stops at the deadline and is not cached ------------------------------
def test_deadline_stops_the_compilation_and_nothing_is_cached(caplog):
    with running_server() as (_, target), channel(target) as ch:
        rpc = stub(ch)
        before = stats(rpc)
        g = chain(40_000)
        with caplog.at_level("INFO", logger="adsvc.server"):
            with pytest.raises(grpc.RpcError) as e:
                rpc.Differentiate(S.DifferentiateRequest(
                    graph=g, differentiation=S.Differentiation(modes=[S.MODE_REVERSE,
                                                                      S.MODE_FORWARD]),
                    omit_graph=True), timeout=0.2, metadata=[("x-request-id", "compile-1")])
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert wait_until(lambda: (s := stats(rpc)).calls_in_flight == 1
                              and s.evaluations_interrupted == before.evaluations_interrupted
                              + 1, 120)
        assert stats(rpc).cache_size == before.cache_size
        line = [r.getMessage() for r in caplog.records
                if "request_id=compile-1" in r.getMessage()]
        assert len(line) == 1 and "status=DEADLINE_EXCEEDED" in line[0]
        assert "interrupted while compiling" in line[0]


# -- 3. order checked before the modes list is built -------------------------------------
def test_huge_order_is_refused_before_any_work(rpc_server):
    rpc = rpc_server
    with pytest.raises(grpc.RpcError) as e:
        rpc.Differentiate(S.DifferentiateRequest(
            graph=seed_graph(), differentiation=S.Differentiation(
                modes=[S.MODE_REVERSE], order=2**32 - 1), omit_graph=True), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(e.value) == "LimitExceededError differentiation.order"


# -- 4. overflowing shapes: typed errors, never INTERNAL ---------------------------------
@pytest.mark.parametrize("limit", [16_000_000, 0])
@pytest.mark.parametrize("dims", [[2**62 + 1, 4], [2**32, 2**32], [2**63 - 1, 2],
                                  [0, 2**62]])
def test_overflowing_element_counts_are_typed_errors(limit, dims):
    with running_server(ServerConfig(max_tensor_elements=limit)) as (_, target), \
            channel(target) as ch:
        rpc = stub(ch)
        x = ir_pb2.Tensor(dtype=F64, dims=dims)
        graphs = [
            hand_graph([(0, "x", dims)], [(1, "sum", [0])], [("z", 1)]),
            hand_graph([(0, "x", [])], [(1, "constant", [], {}, x), (2, "add", [0, 1])],
                       [("z", 2)]),
        ]
        requests = [S.EvaluateRequest(graph=g, inputs={"x": x}) for g in graphs]
        requests.append(S.EvaluateRequest(graph=seed_graph(),
                                          inputs={"x": x, "y": FEEDS["y"]}))
        for req in requests:
            with pytest.raises(grpc.RpcError) as e:
                rpc.Evaluate(req, timeout=10)
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED), e.value.details()


def test_element_counts_are_exact():
    from adsvc.ir.codec import graph_from_proto
    from adsvc.server.compiler import check_elements
    from adsvc_protocol.errors import AdsvcError, LimitExceededError

    g = hand_graph([(0, "x", [2**62 + 1, 4])], [(1, "sum", [0])], [("z", 1)])
    try:
        graph = graph_from_proto(g)
    except AdsvcError:
        return  # the decoder already refuses it
    with pytest.raises(LimitExceededError):  # np.prod in int64 would wrap to 4
        check_elements(graph, ServerConfig(max_tensor_elements=100), "graph")


# -- 5. garbage request bytes ------------------------------------------------------------
def raw_call(ch, method):
    return ch.unary_unary(f"/adsvc.v1.AutodiffService/{method}", request_serializer=None,
                          response_deserializer=None)


@pytest.mark.parametrize("method", ["Differentiate", "Evaluate", "Gradient", "GetServerInfo"])
def test_garbage_request_bytes_are_invalid_argument(rpc_target, method):
    with channel(rpc_target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            raw_call(ch, method)(b"\xff\xff\xff", timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(e.value).startswith("InvalidRequestError")


def test_garbage_stream_message_names_the_feed(rpc_target):
    with channel(rpc_target) as ch:
        call = ch.stream_stream("/adsvc.v1.AutodiffService/EvaluateStream",
                                request_serializer=None, response_deserializer=None)
        target = S.EvaluateStreamRequest(target=S.StreamTarget(graph=seed_graph()))
        feed = S.EvaluateStreamRequest(feed=S.Feed(inputs=FEEDS))
        msgs = [target.SerializeToString(), feed.SerializeToString(), b"\xff\xff\xff"]
        got = []
        with pytest.raises(grpc.RpcError) as e:
            for r in call(iter(msgs), timeout=10):
                got.append(r)
        assert len(got) == 1
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason(e.value) == "InvalidRequestError feeds[1]"


def test_garbage_without_token_is_unauthenticated_first():
    with running_server(ServerConfig(token="s3cret")) as (_, target), channel(target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            raw_call(ch, "Evaluate")(b"\xff\xff", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            raw_call(ch, "Evaluate")(b"\xff\xff", timeout=10,
                                     metadata=[("authorization", "Bearer s3cret")])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- 6. response size known before evaluating -------------------------------------------
def test_oversized_response_refused_before_evaluating():
    A = ir_pb2.AttrValue
    size = 200_000  # 1.6 MB of float64 > the 1 MiB limit
    nodes = [(1, "broadcast_to", [0], {"shape": A(ints=ir_pb2.IntList(values=[size]))})]
    nodes += [(i + 2, "sin", [i + 1]) for i in range(2000)]
    g = hand_graph([(0, "x", [])], nodes, [("z", len(nodes))])
    config = ServerConfig(max_message_bytes=1024 * 1024)
    with running_server(config) as (srv, target), channel(target) as ch:
        rpc = stub(ch)
        with pytest.raises(grpc.RpcError) as e:
            rpc.Evaluate(S.EvaluateRequest(graph=g, inputs={"x": FEEDS["x"]}), timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "outputs of this graph take 1600000 bytes" in e.value.details()

        def requests():
            yield S.EvaluateStreamRequest(target=S.StreamTarget(graph=g))
            yield S.EvaluateStreamRequest(feed=S.Feed(inputs={"x": FEEDS["x"]}))
        with pytest.raises(grpc.RpcError) as e:
            list(rpc.EvaluateStream(requests(), timeout=60))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "outputs of this graph" in e.value.details()


# -- 7. cache bounded by compiled nodes --------------------------------------------------
def test_lru_cache_bounded_by_weight():
    c = LRUCache(capacity=10, max_weight=100)
    c.put("a", 1, weight=60)
    c.put("b", 2, weight=30)
    c.put("c", 3, weight=30)  # 120 > 100: "a" goes
    assert (c.get("a"), c.get("b"), c.get("c"), c.weight) == (None, 2, 3, 60)
    c.put("huge", 4, weight=101)  # bigger than the whole budget: not cached
    assert c.get("huge") is None and len(c) == 2
    c.put("b", 5, weight=10)  # replacing an entry replaces its weight
    assert c.weight == 40 and c.get("b") == 5


def test_cache_bounded_by_compiled_nodes():
    with running_server(ServerConfig(max_cache_nodes=150)) as (_, target), \
            channel(target) as ch:
        rpc = stub(ch)
        diff = S.Differentiation(modes=[S.MODE_REVERSE])
        small = [rpc.Differentiate(S.DifferentiateRequest(graph=chain(20 + k), differentiation=diff,
                                                          omit_graph=True), timeout=30)
                 for k in range(4)]
        assert all(r.stats.nodes_after <= 150 for r in small)
        assert stats(rpc).cache_size < 4  # nodes, not entries, bound the cache
        big = rpc.Differentiate(S.DifferentiateRequest(graph=chain(200), differentiation=diff,
                                                       omit_graph=True), timeout=30)
        assert big.stats.nodes_after > 150
        with pytest.raises(grpc.RpcError) as e:  # never cached
            rpc.Evaluate(S.EvaluateRequest(handle=big.handle, inputs={}), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


# -- 8. the SDK splits long streams ------------------------------------------------------
def test_sdk_jacobian_and_hessian_respect_max_stream_feeds():
    with running_server(ServerConfig(max_stream_feeds=3)) as (_, target):
        g = adsvc.trace(lambda x: x * x, x=adsvc.f64(7))
        x = np.arange(7.0)
        with adsvc.connect(target, timeout=30) as client:
            jac = client.jacobian(g, None, "forward", {"x": x})
            np.testing.assert_allclose(jac["out"]["x"], np.diag(2 * x))
            hg = adsvc.trace(lambda x, y: adsvc.sum(x * x * y + y), x=adsvc.f64(4),
                             y=adsvc.f64(4))
            remote = client.hessian(hg, None, {"x": x[:4], "y": x[:4] + 1})
        local = adsvc.local().hessian(hg, None, {"x": x[:4], "y": x[:4] + 1})
        for out in local:
            for a in local[out]:
                np.testing.assert_allclose(remote[out][a], local[out][a])


# -- 9. bearer auth --------------------------------------------------------------------
@pytest.mark.parametrize("value,ok", [("Bearer s3cret", True), ("bearer s3cret", True),
                                      ("BEARER s3cret", True), ("Bearer nope", False),
                                      ("s3cret", False), ("Basic s3cret", False)])
def test_bearer_scheme_is_case_insensitive(token_rpc, value, ok):
    call = lambda: token_rpc.GetServerInfo(S.GetServerInfoRequest(), timeout=10,  # noqa: E731
                                           metadata=[("authorization", value)])
    if ok:
        assert call().limits.auth_required
    else:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_duplicate_authorization_headers_are_refused(token_rpc):
    md = [("authorization", "Bearer s3cret"), ("authorization", "Bearer s3cret")]
    with pytest.raises(grpc.RpcError) as e:
        token_rpc.GetServerInfo(S.GetServerInfoRequest(), timeout=10, metadata=md)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "2 authorization headers" in e.value.details()


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rpc_target():
    with running_server() as (_, target):
        yield target


@pytest.fixture(scope="module")
def rpc_server(rpc_target):
    with channel(rpc_target) as ch:
        yield stub(ch)


@pytest.fixture(scope="module")
def token_rpc():
    with running_server(ServerConfig(token="s3cret")) as (_, target), channel(target) as ch:
        yield stub(ch)
