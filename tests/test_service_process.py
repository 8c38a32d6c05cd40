"""The server as operators run it (`python -m adsvc.server`, same as `adsvc serve`):
SIGTERM with calls in flight loses none, and `--workers 2` serves one port from two
processes. Everything is bounded in count and time."""

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import ServerProcess, channel, seed_graph, sin_chain, stub

import adsvc
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor

IN_FLIGHT = 4
STEPS, SIZE = 400, 100_000  # ~1 s of work per call on an idle core


def health_status(target):
    with channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                    timeout=5).status


@pytest.fixture
def server_process():
    procs = []

    def start(*args):
        p = ServerProcess(*args)
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.kill()


def test_sigterm_with_calls_in_flight_loses_none(server_process):
    srv = server_process("--grace", "60", "--drain", "2")
    with channel(srv.target) as ch:
        rpc = stub(ch)
        handle = rpc.Differentiate(S.DifferentiateRequest(graph=sin_chain(STEPS, SIZE),
                                                          omit_graph=True), timeout=60).handle
        x = np.linspace(0.0, 1.0, SIZE)
        expected = x
        for _ in range(STEPS):
            expected = np.sin(expected)
        calls = [rpc.Evaluate.future(S.EvaluateRequest(handle=handle, inputs={
            "x": to_tensor(x)}), timeout=120) for _ in range(IN_FLIGHT)]
        end = time.monotonic() + 60
        while rpc.GetServerInfo(S.GetServerInfoRequest(), timeout=10).stats.calls_in_flight \
                < IN_FLIGHT + 1:
            assert time.monotonic() < end, "the calls never started"
            time.sleep(0.02)
        srv.terminate()
        # during the drain period health reports NOT_SERVING
        end = time.monotonic() + 10
        while health_status(srv.target) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < end, "health never went NOT_SERVING"
            time.sleep(0.05)
        results = [c.result(timeout=120) for c in calls]  # raises if any call was lost
    for r in results:
        np.testing.assert_allclose(from_tensor(r.outputs["out"]), expected.sum(), rtol=1e-12)
    assert srv.wait(timeout=90) == 0
    log = "".join(srv.stderr_lines)
    assert log.count("rpc=Evaluate") == IN_FLIGHT and "status=OK" in log
    assert "Traceback" not in log
    with channel(srv.target) as ch, pytest.raises(grpc.RpcError) as e:
        stub(ch).GetServerInfo(S.GetServerInfoRequest(), timeout=2)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_two_workers_serve_one_port(server_process):
    srv = server_process("--workers", "2")
    pids = set()
    for _ in range(60):  # each new channel is a new connection, spread by SO_REUSEPORT
        with channel(srv.target) as ch:
            pids.add(stub(ch).GetServerInfo(S.GetServerInfoRequest(), timeout=30).pid)
        if len(pids) == 2:
            break
    assert len(pids) == 2
    with adsvc.connect(srv.target, timeout=60) as client:
        for mode in ("reverse", "forward"):
            assert client.value_and_grad(seed_graph(), mode=mode, x=3.0, y=4.0) == (
                23.0, {"x": 10.0, "y": 3.0})
    srv.terminate()
    assert srv.wait(timeout=60) == 0
