"""The SDK retries UNAVAILABLE (jittered exponential backoff, up to `retry_seconds`,
never beyond the call's timeout) and nothing else; an EvaluateStream only while no
response came back. Real servers on 127.0.0.1 started late on a port chosen in
advance; fakes of the stub for what a real server cannot be made to do on cue."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from service_fixtures import seed_graph

import adsvc
from adsvc.server.app import create_server
from adsvc_client import remote
from adsvc_protocol import errors as E
from adsvc_protocol.proto import service_pb2

SEED = (23.0, {"x": 10.0, "y": 3.0})
LATE = 2.0  # seconds before the server starts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_later(port: int, delay: float):
    """A server on 127.0.0.1:`port`, started `delay` seconds from now (in a thread)."""
    started = threading.Event()
    servers = []

    def start():
        server, bound = create_server(f"127.0.0.1:{port}")
        assert bound == port
        server.start()
        servers.append(server)
        started.set()

    timer = threading.Timer(delay, start)
    timer.start()
    try:
        yield started
    finally:
        timer.cancel()
        timer.join(10)
        for s in servers:
            s.stop(0).wait()


def test_a_call_made_before_the_server_starts_succeeds():
    port = free_port()
    with server_later(port, LATE) as started, \
            adsvc.connect(f"127.0.0.1:{port}", timeout=30) as c:
        t0 = time.monotonic()
        assert c.value_and_grad(seed_graph(), x=3.0, y=4.0) == SEED
        took = time.monotonic() - t0
        assert started.is_set()
    assert LATE - 0.5 < took < LATE + 5, took


def test_retry_seconds_zero_fails_fast():
    port = free_port()
    with adsvc.connect(f"127.0.0.1:{port}", timeout=30, retry_seconds=0) as c:
        t0 = time.monotonic()
        with pytest.raises(E.UnavailableError):
            c.value_and_grad(seed_graph(), x=3.0, y=4.0)
    assert time.monotonic() - t0 < 1.0


def test_retries_end_by_the_calls_timeout_and_say_so():
    port = free_port()
    with adsvc.connect(f"127.0.0.1:{port}", retry_seconds=60) as c:
        t0 = time.monotonic()
        with pytest.raises(E.UnavailableError) as e:
            c.evaluate(seed_graph(), x=3.0, y=4.0, timeout=1.5)
        took = time.monotonic() - t0
    assert 0.5 < took <= 1.5 + 0.5, took
    assert "tried" in str(e.value) and "times" in str(e.value)


def test_a_stream_is_retried_across_a_server_restart(caplog):
    port = free_port()
    target = f"127.0.0.1:{port}"
    g = adsvc.trace(lambda x, y: x * x * y + y, x=adsvc.f64(2), y=adsvc.f64())
    with adsvc.connect(target, timeout=30) as c:
        with server_later(port, 0.0) as started:
            assert started.wait(10)
            first = c.jacobian(g, mode="forward", x=np.array([1.0, 2.0]), y=3.0)
        # the server is gone; the compiled handle is cached: the next call goes straight
        # to EvaluateStream, which waits for the new server (and re-sends the graph)
        caplog.clear()
        with caplog.at_level(logging.INFO, "adsvc.server"), server_later(port, 1.0):
            again = c.jacobian(g, mode="forward", x=np.array([1.0, 2.0]), y=3.0)
    calls = [re.search(r"rpc=(\w+) .*status=(\w+)", r.getMessage()).groups()
             for r in caplog.records if "rpc=" in r.getMessage()]
    assert calls == [("EvaluateStream", "NOT_FOUND"), ("EvaluateStream", "OK")], calls
    for out in first:
        for name in first[out]:
            np.testing.assert_array_equal(first[out][name], again[out][name])


def test_every_rpc_is_declared_free_of_side_effects():
    methods = service_pb2.DESCRIPTOR.services_by_name["AutodiffService"].methods
    assert remote.RETRY_SAFE == {m.name for m in methods}


# -- fakes: statuses a real server cannot be made to answer on cue -------------------------
class FakeRpcError(grpc.RpcError):
    """A failed call as grpc raises it: code, details, no trailing metadata."""

    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"

    def trailing_metadata(self):
        return None


class FakeStub:
    """Counts the calls; each fails with `code` (a stream after `responses` responses)."""

    def __init__(self, code: grpc.StatusCode, responses: int = 0):
        self.code, self.responses, self.calls = code, responses, 0

    def GetServerInfo(self, request, timeout=None, metadata=None):
        self.calls += 1
        raise FakeRpcError(self.code)

    def EvaluateStream(self, requests, timeout=None, metadata=None):
        self.calls += 1
        for i in range(self.responses):
            yield service_pb2.EvaluateStreamResponse(index=i)
        raise FakeRpcError(self.code)


@pytest.mark.parametrize("code", [grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL])
def test_nothing_but_unavailable_is_retried(code):
    with remote.RemoteClient("127.0.0.1:1", retry_seconds=30) as c:
        c._stub = FakeStub(code)
        with pytest.raises(E.AdsvcError):
            c.server_info(timeout=30)
        assert c._stub.calls == 1


def test_unavailable_is_retried_with_growing_jittered_delays():
    retry = remote.Retry(1.0, None)
    while retry.again(FakeRpcError(grpc.StatusCode.UNAVAILABLE)):
        assert retry.attempts < 50
    took = time.monotonic() - retry.start
    assert 3 <= len(retry.delays) and took <= 1.0 + 0.2, (retry.delays, took)
    for k, delay in enumerate(retry.delays):
        cap = min(remote.RETRY_MAX_DELAY, remote.RETRY_FIRST_DELAY * 2 ** k)
        assert cap / 2 <= delay <= cap, (k, delay)
    assert len(set(retry.delays)) == len(retry.delays)  # jittered
    # never beyond the call's deadline, whatever the budget
    retry = remote.Retry(60.0, 0.3)
    while retry.again(FakeRpcError(grpc.StatusCode.UNAVAILABLE)):
        pass
    assert time.monotonic() - retry.start <= 0.3 and retry.remaining() <= 0.3


def test_a_stream_is_not_retried_once_a_response_came_back():
    encoded = [{}, {}]
    for responses, calls in ((1, 1), (0, None)):
        with remote.RemoteClient("127.0.0.1:1", retry_seconds=0.5) as c:
            c._stub = FakeStub(grpc.StatusCode.UNAVAILABLE, responses)
            with pytest.raises(E.UnavailableError):
                c._stream(service_pb2.StreamTarget(handle="h"), encoded, timeout=10)
            if calls is None:
                assert c._stub.calls > 1  # nothing came back: retried
            else:
                assert c._stub.calls == calls
