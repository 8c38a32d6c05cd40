"""Deadlines and cancellation stop the server's work, not just the client's wait.

The evaluation is a chain of 3000 `sin` over 200k elements (seconds of work); the
server checks the call every 256 steps. Proof that the work stopped comes from the
server itself: its `evaluations_interrupted` counter and the call's log line, which
records how many steps ran before the interruption.
"""


import grpc
import numpy as np
import pytest
from service_fixtures import (
    channel,
    running_server,
    sin_chain,
    stats,
    stopped_steps,
    stub,
    wait_until,
)

import adsvc
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import to_tensor

STEPS = 3000
SIZE = 200_000


@pytest.fixture(scope="module")
def setup():
    with running_server() as (_srv, target), channel(target) as ch:
        rpc = stub(ch)
        handle = rpc.Differentiate(S.DifferentiateRequest(graph=sin_chain(STEPS, SIZE),
                                                          omit_graph=True)).handle
        yield rpc, handle, target





def test_deadline_stops_the_evaluation(setup, caplog):
    rpc, handle, _ = setup
    before = stats(rpc).evaluations_interrupted
    x = to_tensor(np.full(SIZE, 0.5))
    with caplog.at_level("INFO", logger="adsvc.server"):
        with pytest.raises(grpc.RpcError) as e:
            rpc.Evaluate(S.EvaluateRequest(handle=handle, inputs={"x": x}), timeout=0.5,
                         metadata=[("x-request-id", "deadline-1")])
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the server's worker thread returns (the call leaves the in-flight count) and
        # counts the evaluation as interrupted
        assert wait_until(lambda: (s := stats(rpc)).calls_in_flight == 1
                          and s.evaluations_interrupted == before + 1)
    assert stopped_steps(caplog, "deadline-1", "DEADLINE_EXCEEDED") < STEPS


def test_cancellation_stops_the_evaluation(setup, caplog):
    rpc, handle, _ = setup
    before = stats(rpc).evaluations_interrupted
    x = to_tensor(np.full(SIZE, 0.5))
    with caplog.at_level("INFO", logger="adsvc.server"):
        future = rpc.Evaluate.future(S.EvaluateRequest(handle=handle, inputs={"x": x}),
                                     timeout=120, metadata=[("x-request-id", "cancel-1")])
        assert wait_until(lambda: stats(rpc).calls_in_flight == 2)  # it is running
        future.cancel()
        assert wait_until(lambda: (s := stats(rpc)).calls_in_flight == 1
                          and s.evaluations_interrupted == before + 1)
    assert stopped_steps(caplog, "cancel-1", "CANCELLED") < STEPS


def test_sdk_timeout_raises_deadline_exceeded(setup):
    rpc, _, target = setup
    before = stats(rpc).evaluations_interrupted
    with adsvc.connect(target) as client, pytest.raises(adsvc.errors.DeadlineExceededError):
        client.evaluate(sin_chain(STEPS, SIZE), {"x": np.full(SIZE, 0.5)}, timeout=1.0)
    assert wait_until(lambda: stats(rpc).evaluations_interrupted == before + 1)
