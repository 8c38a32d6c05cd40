"""Staying up: health answers while every adsvc slot is busy; `--workers N` restarts a
worker that dies (and gives up, instead of fork-bombing, on one that dies at once
again and again); SIGTERM stops everything gracefully and logs calls cut short.
Servers on 127.0.0.1:0; every loop is bounded in count and time."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_fixtures import (
    ServerProcess,
    channel,
    running_server,
    seed_graph,
    sin_chain,
    stub,
)

from adsvc.server import app
from adsvc.server.config import ServerConfig
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import to_tensor

FEEDS = {"x": to_tensor(np.float64(3.0)), "y": to_tensor(np.float64(4.0))}
HEALTH_CHECKS = 50


def wait_until(predicate, limit: float = 30.0, step: float = 0.05) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_health_always_answers_while_every_slot_is_busy():
    config = ServerConfig(max_concurrent_rpcs=2, threads=2)
    release = threading.Event()

    def held_stream():  # takes a slot and keeps it until released
        yield S.EvaluateStreamRequest(target=S.StreamTarget(graph=seed_graph()))
        release.wait(60)

    with running_server(config) as (_, target), channel(target) as ch:
        rpc = stub(ch)
        streams = [rpc.EvaluateStream(held_stream(), timeout=60) for _ in range(2)]
        try:
            assert wait_until(lambda: rpc.GetServerInfo(
                S.GetServerInfoRequest(), timeout=10).stats.calls_in_flight == 3)
            health = health_pb2_grpc.HealthStub(ch)
            checks = [health.Check.future(health_pb2.HealthCheckRequest(), timeout=10)
                      for _ in range(HEALTH_CHECKS)]
            excess = [rpc.Evaluate.future(S.EvaluateRequest(graph=seed_graph(), inputs=FEEDS),
                                          timeout=10) for _ in range(10)]
            statuses = [c.result(timeout=15).status for c in checks]
            assert statuses == [health_pb2.HealthCheckResponse.SERVING] * HEALTH_CHECKS
            for call in excess:  # refused at once, by the servicer, with its message
                assert call.exception(timeout=15).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "busy" in call.exception().details()
            # server info answers too (it takes no slot)
            assert rpc.GetServerInfo(S.GetServerInfoRequest(), timeout=10).pid == os.getpid()
        finally:
            release.set()
            for s in streams:
                s.cancel()
        assert wait_until(lambda: rpc.GetServerInfo(  # the slots are free again
            S.GetServerInfoRequest(), timeout=10).stats.calls_in_flight == 1)
        r = rpc.Evaluate(S.EvaluateRequest(graph=seed_graph(), inputs=FEEDS), timeout=10)
        assert np.frombuffer(r.outputs["z"].raw)[0] == 23.0


class WorkersProcess(ServerProcess):
    """A `--workers N` server that also keeps the worker pids it announces."""

    def _read_target(self, timeout: float) -> str:
        found: list[re.Match] = []

        def read():
            for line in self.proc.stdout:
                m = re.search(r"serving on (\S+?:\d+) \(workers \d+, pids ([\d ]+),", line)
                if m:
                    found.append(m)
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.stderr_lines))
        self.pids = [int(p) for p in found[0].group(2).split()]
        return found[0].group(1)

    def log(self) -> str:
        return "".join(self.stderr_lines)


@pytest.fixture
def workers_process():
    procs: list[ServerProcess] = []

    def start(*args):
        p = WorkersProcess(*args)
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.kill()


def pid_answering(target: str) -> int | None:
    """The pid of the worker a new connection reaches (None while nothing answers)."""
    with channel(target) as ch:
        try:
            return stub(ch).GetServerInfo(S.GetServerInfoRequest(), timeout=5).pid
        except grpc.RpcError:
            return None


def test_killed_worker_is_restarted_and_sigterm_stops_all(workers_process):
    srv = workers_process("--workers", "2")
    assert len(srv.pids) == 2
    victim, survivor = srv.pids
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    seen: set[int] = set()
    for _ in range(400):  # each new channel is a new connection, spread by SO_REUSEPORT
        pid = pid_answering(srv.target)
        seen.add(pid)
        if pid not in (victim, survivor, None) or time.monotonic() - killed > 10:
            break
    new = seen - {victim, survivor, None}
    assert len(new) == 1, (seen, srv.log())
    assert time.monotonic() - killed < 5.0
    assert victim not in seen
    log = srv.log()
    assert re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL", log), log
    assert f"restarted worker 0: pid {new.pop()} (was pid {victim})" in log, log
    srv.terminate()
    assert srv.wait(timeout=60) == 0
    log = srv.log()
    assert log.count("exited with code 0") == 2, log
    assert "Traceback" not in log


def test_worker_dying_at_once_again_and_again_makes_the_server_give_up(workers_process,
                                                                       tmp_path):
    from test_service_tls import make_pki

    pki = make_pki(tmp_path)
    key = tmp_path / "key-to-remove.pem"
    shutil.copy(pki["server_key"], key)
    srv = workers_process("--workers", "2", "--tls-cert", pki["server_cert"],
                          "--tls-key", str(key))
    key.unlink()  # every new worker now fails at once: it cannot read its key
    start = time.monotonic()
    os.kill(srv.pids[0], signal.SIGKILL)
    assert srv.wait(timeout=30) == 1
    took = time.monotonic() - start
    log = srv.log()
    restarts = log.count("restarted worker 0")
    assert restarts == app.MAX_FAST_FAILURES - 1, log  # then it gave up
    assert "giving up" in log, log
    # backed off: the delays double, so the restarts took more than their sum's half
    delays = sum(app.FAST_RESTART_DELAY * 2 ** k for k in range(restarts))
    assert delays / 2 < took < 20, (took, log)
    assert f"worker pid {srv.pids[1]} exited with code 0" in log, log  # stopped cleanly


def test_sigterm_logs_calls_cut_short_by_the_grace_period():
    srv = ServerProcess("--grace", "0.5")
    try:
        with channel(srv.target) as ch:
            rpc = stub(ch)
            x = to_tensor(np.full(200_000, 0.5))
            call = rpc.Evaluate.future(S.EvaluateRequest(graph=sin_chain(3000, 200_000),
                                                         inputs={"x": x}), timeout=60)
            assert wait_until(lambda: rpc.GetServerInfo(
                S.GetServerInfoRequest(), timeout=10).stats.calls_in_flight == 2)
            srv.terminate()
            with pytest.raises(grpc.RpcError):
                call.result(timeout=30)
        assert srv.wait(timeout=60) == 0
    finally:
        srv.kill()
    log = "".join(srv.stderr_lines)
    assert "stopped: 1 of 1 call(s) in flight were still running when the 0.5s grace " \
           "period ran out" in log, log


def test_sigterm_with_nothing_in_flight_logs_that_all_finished():
    srv = ServerProcess()
    try:
        assert pid_answering(srv.target) == srv.proc.pid
        srv.terminate()
        assert srv.wait(timeout=60) == 0
    finally:
        srv.kill()
    assert "stopped: 0 call(s) were in flight at shutdown" in "".join(srv.stderr_lines)
