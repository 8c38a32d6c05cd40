"""Helpers for the service tests: in-process servers on 127.0.0.1:0, subprocess servers,
stubs, and hand-built graphs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from adsvc.server.app import create_server
from adsvc.server.config import ServerConfig
from adsvc_protocol.proto import ir_pb2, service_pb2, service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
F64 = ir_pb2.DTYPE_FLOAT64


@contextlib.contextmanager
def running_server(config: ServerConfig | None = None):
    """(server, "127.0.0.1:port") of a started in-process server; stopped afterwards."""
    server, port = create_server("127.0.0.1:0", config or ServerConfig())
    server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@contextlib.contextmanager
def channel(target: str):
    ch = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        yield ch
    finally:
        ch.close()


def stub(ch) -> service_pb2_grpc.AutodiffServiceStub:
    return service_pb2_grpc.AutodiffServiceStub(ch)


def hand_graph(inputs, nodes, outputs, ir_version: int = 1, opset: int = 1) -> ir_pb2.Graph:
    """inputs: [(id, name, dims)], nodes: [(id, op, operands, attrs?, value?)] (float64),
    outputs: [(name, id)]."""
    g = ir_pb2.Graph(ir_version=ir_version, opset_version=opset)
    for nid, name, dims in inputs:
        g.inputs.add(id=nid, name=name, type=ir_pb2.TensorType(dtype=F64, dims=dims))
    for nid, op, operands, *rest in nodes:
        n = g.nodes.add(id=nid, op=op, operands=operands)
        attrs = rest[0] if rest else {}
        for k, v in attrs.items():
            n.attrs[k].CopyFrom(v)
        if len(rest) > 1:
            n.value.CopyFrom(rest[1])
    for name, nid in outputs:
        g.outputs.add(name=name, id=nid)
    return g


def seed_graph() -> ir_pb2.Graph:
    """z = x*x + x*y + 2, written by hand."""
    two = ir_pb2.Tensor(dtype=F64, values=[2.0])
    return hand_graph(
        [(0, "x", []), (1, "y", [])],
        [(2, "mul", [0, 0]), (3, "mul", [0, 1]), (4, "add", [2, 3]),
         (5, "constant", [], {}, two), (6, "add", [4, 5])],
        [("z", 6)])


def sin_chain(n: int, size: int) -> ir_pb2.Graph:
    """out = sum(sin(sin(...sin(x)))) with n sins on a vector of `size` elements: a long
    evaluation (interrupt checks every 256 steps)."""
    nodes = [(i + 1, "sin", [i]) for i in range(n)]
    nodes.append((n + 1, "sum", [n]))
    return hand_graph([(0, "x", [size])], nodes, [("out", n + 1)])


class ServerProcess:
    """`python -m adsvc.server ...` in a subprocess; parses the announced address."""

    def __init__(self, *args: str, timeout: float = 60.0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adsvc.server", "--host", "127.0.0.1", "--port", "0",
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=ROOT)
        self.stderr_lines: list[str] = []
        self._stderr = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr.start()
        self.target = self._read_target(timeout)

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def _read_target(self, timeout: float) -> str:
        result: list[str] = []

        def read():
            for line in self.proc.stdout:
                m = re.search(r"serving on (\S+?:\d+)", line)
                if m:
                    result.append(m.group(1))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not result:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.stderr_lines))
        return result[0]

    def terminate(self):
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def stats(rpc):
    """The server's counters (GetServerInfo.stats)."""
    return rpc.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=10).stats


def wait_until(predicate, limit=30.0):
    """Poll `predicate` every 50 ms for at most `limit` seconds."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def stopped_steps(caplog, request_id, status):
    """The evaluation steps the server's log line for `request_id` says ran."""
    lines = [r.getMessage() for r in caplog.records
             if f"request_id={request_id}" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"status={status}" in lines[0]
    m = re.search(r"interrupted after (\d+) evaluation steps", lines[0])
    assert m, lines[0]
    return int(m.group(1))


# module-scoped fixtures (tests/conftest.py offers them to every test module): a test
# module's SERVER_CONFIG, if it has one, configures its server, CLIENT_OPTIONS its client
@pytest.fixture(scope="module")
def server(request):
    """(server, target) of an in-process server, for the module's tests."""
    with running_server(getattr(request.module, "SERVER_CONFIG", None)) as (srv, target):
        yield srv, target


@pytest.fixture(scope="module")
def rpc(server):
    """A raw stub on a channel to `server`."""
    with channel(server[1]) as ch:
        yield stub(ch)


@pytest.fixture(scope="module")
def client(request, server):
    """The SDK connected to `server`."""
    import adsvc

    options = getattr(request.module, "CLIENT_OPTIONS", {})
    with adsvc.connect(server[1], timeout=60, **options) as c:
        yield c
