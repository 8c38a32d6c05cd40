"""The shared compiled-graph store (Redis) and the Prometheus metrics.

Two in-process servers share a real redis-server on 127.0.0.1 (started here): a handle
compiled on one is served by the other, from a raw stub that never re-sends graphs.
Redis down or holding garbage: the server keeps serving from its local cache.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import grpc
import pytest
from service_fixtures import channel, hand_graph, running_server, seed_graph, stub

from adsvc.server.config import ServerConfig
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor

XY = {"x": to_tensor(3.0), "y": to_tensor(4.0)}
REVERSE = S.Differentiation(modes=[S.MODE_REVERSE], seed=True)

if not shutil.which("redis-server"):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install redis-server (see .ci/run)")
    pytest.skip("redis-server is not installed (apt-get install redis-server)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_handle_compiled_on_one_replica_is_served_by_another(redis_url):
    config = ServerConfig(store=redis_url)
    with running_server(config) as (a, ta), running_server(config) as (b, tb), \
            channel(ta) as ca, channel(tb) as cb:
        resp = stub(ca).Differentiate(S.DifferentiateRequest(
            graph=seed_graph(), differentiation=REVERSE, omit_graph=True), timeout=30)
        # no waiting: the compiling replica wrote the store before it answered
        out = stub(cb).Evaluate(S.EvaluateRequest(handle=resp.handle, inputs=XY), timeout=30)
        assert float(from_tensor(out.outputs["grad:x"])) == 10.0
        g = stub(cb).Gradient(S.GradientRequest(handle=resp.handle, inputs=XY), timeout=30)
        assert float(from_tensor(g.gradients["y"])) == 3.0
        metrics = b.adsvc_servicer.metrics.text()
        assert 'adsvc_store_total{result="hit"} 1.0' in metrics
        # the same graph sent to replica b is not compiled again: the store has it
        again = stub(cb).Differentiate(S.DifferentiateRequest(
            graph=seed_graph(), differentiation=REVERSE, omit_graph=True), timeout=30)
        assert again.stats.cache_hit and again.handle == resp.handle


def test_garbage_or_invalid_store_entries_are_misses(redis_url):
    import redis

    from adsvc.server.store import PREFIX

    r = redis.Redis.from_url(redis_url)
    bad = "f" * 64
    r.set(PREFIX + bad, b"\xff\xff not a proto")
    too_big = hand_graph([(0, "x", [])], [(i, "neg", [i - 1]) for i in range(1, 50)],
                         [("z", 49)])
    r.set(PREFIX + "e" * 64, S.DifferentiateRequest(graph=too_big).SerializeToString())
    with running_server(ServerConfig(store=redis_url, max_nodes=20,
                                     max_compiled_nodes=20)) as (_, t), \
            channel(t) as ch:
        for handle in (bad, "e" * 64):
            with pytest.raises(grpc.RpcError) as e:
                stub(ch).Evaluate(S.EvaluateRequest(handle=handle, inputs=XY), timeout=30)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_redis_unreachable_the_server_keeps_serving(caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with running_server(ServerConfig(store=url)) as (srv, t), channel(t) as ch:
        for _ in range(3):
            g = stub(ch).Gradient(S.GradientRequest(graph=seed_graph(), inputs=XY),
                                  timeout=30)
            assert float(from_tensor(g.value)) == 23.0
        with pytest.raises(grpc.RpcError) as e:
            stub(ch).Evaluate(S.EvaluateRequest(handle="0" * 64, inputs=XY), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        srv.adsvc_servicer.compiler.store.flush()
    assert any("serving from the local cache" in r.getMessage() for r in caplog.records)


def test_metrics_count_calls_statuses_and_refusals():
    with running_server(ServerConfig(max_nodes=20)) as (srv, t), channel(t) as ch:
        rpc = stub(ch)
        rpc.Gradient(S.GradientRequest(graph=seed_graph(), inputs=XY), timeout=30)
        rpc.Gradient(S.GradientRequest(graph=seed_graph(), inputs=XY), timeout=30)
        big = hand_graph([(0, "x", [])], [(i, "neg", [i - 1]) for i in range(1, 50)],
                         [("z", 49)])
        with pytest.raises(grpc.RpcError):
            rpc.Evaluate(S.EvaluateRequest(graph=big, inputs={"x": to_tensor(1.0)}),
                         timeout=30)
        http, _thread = srv.adsvc_servicer.metrics.serve_http(0, "127.0.0.1")
        try:
            port = http.server_port
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                          timeout=10).read().decode()
        finally:
            http.shutdown()
    assert 'adsvc_calls_total{rpc="Gradient",status="OK"} 2.0' in text
    assert 'adsvc_calls_total{rpc="Evaluate",status="RESOURCE_EXHAUSTED"} 1.0' in text
    assert 'adsvc_refused_total{reason="nodes"} 1.0' in text
    assert 'adsvc_cache_total{result="hit"} 1.0' in text
    assert "adsvc_compile_seconds_count 1.0" in text
    assert 'adsvc_call_seconds_count{rpc="Gradient"} 2.0' in text


def test_serve_flags_store_and_metrics_port(redis_url):
    from service_fixtures import ServerProcess

    port = free_port()
    proc = ServerProcess("--store", redis_url, "--metrics-port", str(port))
    try:
        graph = seed_graph()
        graph.name = "never-stored-before"  # a new handle: the store misses it
        with channel(proc.target) as ch:
            g = stub(ch).Gradient(S.GradientRequest(graph=graph, inputs=XY), timeout=30)
            assert float(from_tensor(g.value)) == 23.0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                      timeout=10).read().decode()
        assert 'adsvc_calls_total{rpc="Gradient",status="OK"} 1.0' in text
        assert 'adsvc_store_total{result="miss"} 1.0' in text
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_signed_entries_tampering_is_ignored(redis_url):
    """With a shared secret, whoever can write to Redis cannot change what a handle
    computes: a swapped payload is a miss, and the graph is compiled again."""
    import redis

    from adsvc.server.store import PREFIX

    config = ServerConfig(store=redis_url, store_secret=b"0123456789abcdef-secret")
    with running_server(config) as (_, ta), running_server(config) as (_, tb), \
            channel(ta) as ca, channel(tb) as cb:
        graph = seed_graph()
        graph.name = "signed-entries"
        handle = stub(ca).Differentiate(S.DifferentiateRequest(
            graph=graph, differentiation=REVERSE, omit_graph=True), timeout=30).handle
        r = redis.Redis.from_url(redis_url)
        good = r.get(PREFIX + handle)
        forged = S.DifferentiateRequest(graph=hand_graph([(0, "x", []), (1, "y", [])],
                                                         [(2, "add", [0, 1])], [("z", 2)]))
        r.set(PREFIX + handle, good[:32] + forged.SerializeToString())  # old signature
        with pytest.raises(grpc.RpcError) as e:
            stub(cb).Evaluate(S.EvaluateRequest(handle=handle, inputs=XY), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        r.set(PREFIX + handle, good)  # the genuine entry is served
        out = stub(cb).Evaluate(S.EvaluateRequest(handle=handle, inputs=XY), timeout=30)
        assert float(from_tensor(out.outputs["grad:x"])) == 10.0
