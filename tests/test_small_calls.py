"""The small-call path (float64 scalars in and out): the layouts of adsvc_protocol.
scalar_wire against protobuf's own encoding, the server's ScalarPath against its general
path, the SDK's ScalarCall, and the access line written without a LogRecord."""

from __future__ import annotations

import io
import logging
import math
import struct
import threading
import time

import grpc
import numpy as np
import pytest
from service_fixtures import wait_until

import adsvc
from adsvc.runtime.tape import TapePlan
from adsvc.server import access_log
from adsvc.server.access_log import AccessLog
from adsvc.server.scalar_path import LAYOUTS, ScalarPath
from adsvc_protocol import scalar_wire as W
from adsvc_protocol.errors import InputError
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import to_tensor

SEED = adsvc.trace(lambda x, y: x * x + x * y + 2)
ODD = [0.0, -0.0, 1.5, -3.25e-300, 5e-324, math.inf, -math.inf, math.nan, 1e308]


def f64(v) -> ir_pb2.Tensor:
    return to_tensor(np.float64(v), "float64")


def request(handle, feeds, output_filter=()) -> S.EvaluateRequest:
    return S.EvaluateRequest(handle=handle, inputs={k: f64(v) for k, v in feeds.items()},
                             output_filter=output_filter)


def bits(v) -> bytes:
    return struct.pack("<d", float(v))


# -- layouts ---------------------------------------------------------------------------
@pytest.mark.parametrize("names", [[], ["x"], ["x", "y", "z"], ["é" * 70, "grad:x"],
                                   ["n" * 200]])
@pytest.mark.parametrize("output_filter", [(), ("grad:x",), ("a", "b", "a")])
def test_a_request_layout_parses_to_the_message(names, output_filter):
    values = ODD[:len(names)]
    lay = W.request_layout("h" * 64, names, output_filter)
    msg = request("h" * 64, dict(zip(names, values)), output_filter)
    data = lay.pack(values)
    assert S.EvaluateRequest.FromString(data) == msg
    if len(names) <= 1:  # (protobuf's order of map entries is its own; fields: 2, 4, 5)
        assert data == msg.SerializeToString()
    got = lay.unpack(data)
    assert [bits(v) for v in got] == [bits(v) for v in values]


@pytest.mark.parametrize("handle", ["", "h" * 64])
def test_a_response_layout_parses_to_the_message(handle):
    names = ["f", "grad:x", "grad:y"]
    lay = W.response_layout(handle, names)
    data = lay.pack([23.0, -0.0, math.nan])
    msg = S.EvaluateResponse.FromString(data)
    assert msg.handle == handle and sorted(msg.outputs) == sorted(names)
    assert [msg.outputs[n].raw for n in names] == [bits(23.0), bits(-0.0), bits(math.nan)]
    assert all(t.dtype == ir_pb2.DTYPE_FLOAT64 and not t.dims for t in msg.outputs.values())
    assert lay.unpack(data) is not None


def test_bytes_laid_out_otherwise_do_not_unpack():
    lay = W.request_layout("h" * 64, ["x", "y"])
    good = lay.pack([3.0, 4.0])
    values = S.EvaluateRequest(handle="h" * 64, inputs={
        "x": ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, values=[3.0]), "y": f64(4.0)})
    swapped = W.request_layout("h" * 64, ["y", "x"]).pack([4.0, 3.0])
    assert S.EvaluateRequest.FromString(swapped) == S.EvaluateRequest.FromString(good)
    as_f32 = request("h" * 64, {"x": 3.0, "y": 4.0})
    as_f32.inputs["y"].CopyFrom(to_tensor(np.float32(4.0), "float32"))
    with_dims = request("h" * 64, {"x": 3.0, "y": 4.0})
    with_dims.inputs["y"].dims.append(1)
    for bad in (values, as_f32, with_dims, request("g" * 64, {"x": 3.0, "y": 4.0}),
                request("h" * 64, {"x": 3.0, "y": 4.0}, ("f",))):
        assert lay.unpack(bad.SerializeToString()) is None
    for bad in (swapped, good[:-1], good + b"\x28\x01", b"",
                good.replace(b"\x1a\x08", b"\x1a\x09", 1)):
        assert lay.unpack(bad) is None


def test_leading_handle():
    assert W.leading_handle(request("h" * 64, {"x": 1.0}).SerializeToString()) == "h" * 64
    assert W.leading_handle(S.EvaluateRequest(inputs={"x": f64(1.0)}).SerializeToString()) \
        is None
    assert W.leading_handle(b"") is None and W.leading_handle(b"\x12") is None
    assert W.leading_handle(b"\x12\x02\xff\xfe") is None  # not ASCII: no handle
    assert W.leading_handle(b"\x12\x80\x01" + b"h" * 128) is None  # (handles are short)


# -- the server's path -----------------------------------------------------------------
def _compiled(rpc, g=SEED, modes=(S.MODE_REVERSE,), seed=True) -> S.DifferentiateResponse:
    return rpc.Differentiate(S.DifferentiateRequest(
        graph=adsvc.to_proto(g), differentiation=S.Differentiation(modes=modes, seed=seed),
        omit_graph=True), timeout=60)


def _entry(server, handle):
    return server[0].adsvc_servicer.compiler.peek(handle)


def _outputs(resp: S.EvaluateResponse) -> dict[str, bytes]:
    assert all(t.dtype == ir_pb2.DTYPE_FLOAT64 and not t.dims for t in resp.outputs.values())
    return {k: t.raw for k, t in resp.outputs.items()}


def test_the_server_answers_small_calls_from_their_bytes(server, rpc):
    diff = _compiled(rpc)
    h, name = diff.handle, diff.outputs[0].name  # (the value's name, then the gradients)
    raw = grpc.insecure_channel(server[1]).unary_unary("/adsvc.v1.AutodiffService/Evaluate")
    local = adsvc.local()
    for x, y in [(3.0, 4.0), *zip(ODD, reversed(ODD))]:
        want = local.value_and_grad(SEED, x=x, y=y)
        want = {"f": bits(want[0]), "grad:x": bits(want[1]["x"]), "grad:y": bits(want[1]["y"])}
        data = request(h, {"x": x, "y": y}).SerializeToString()
        first = raw(data, timeout=30)
        again = raw(data, timeout=30)  # (read from the bytes: a layout seen before)
        assert first == again
        assert _outputs(S.EvaluateResponse.FromString(first)) == {
            k if k != "f" else name: v for k, v in want.items()}
    path = _entry(server, h).scalar
    assert isinstance(path, ScalarPath) and len(path._known) == 1


def test_requests_laid_out_otherwise_get_the_general_answer(server, rpc):
    h = _compiled(rpc).handle
    want = _outputs(rpc.Evaluate(request(h, {"x": 3.0, "y": 4.0}), timeout=30))
    raw = grpc.insecure_channel(server[1]).unary_unary("/adsvc.v1.AutodiffService/Evaluate")
    swapped = W.request_layout(h, ["y", "x"]).pack([4.0, 3.0])
    assert _outputs(S.EvaluateResponse.FromString(raw(swapped, timeout=30))) == want
    as_values = S.EvaluateRequest(handle=h, inputs={
        "x": ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, values=[3.0]), "y": f64(4.0)})
    as_graph = S.EvaluateRequest(graph=adsvc.to_proto(SEED), differentiation=S.Differentiation(
        modes=[S.MODE_REVERSE], seed=True), inputs={"x": f64(3.0), "y": f64(4.0)})
    for req in (as_values, as_graph):
        assert _outputs(rpc.Evaluate(req, timeout=30)) == want
    picked = rpc.Evaluate(request(h, {"x": 3.0, "y": 4.0}, ("grad:y", "grad:x", "grad:y")),
                          timeout=30)
    assert sorted(picked.outputs) == ["grad:x", "grad:y"]
    assert _outputs(picked) == {k: want[k] for k in ("grad:y", "grad:x")}


@pytest.mark.parametrize("req, code, text", [
    (lambda h: request(h, {"x": 3.0}), "INVALID_ARGUMENT", "missing input 'y'"),
    (lambda h: request(h, {"x": 3.0, "y": 4.0, "z": 1.0}), "INVALID_ARGUMENT", "'z'"),
    (lambda h: request(h, {"x": 3.0, "y": 4.0}, ("nope",)), "INVALID_ARGUMENT", "'nope'"),
    (lambda h: S.EvaluateRequest(handle=h, inputs={
        "x": f64(3.0), "y": ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, raw=b"\0" * 7)}),
     "INVALID_ARGUMENT", "raw has 7 bytes"),
    (lambda h: request("0" * 64, {"x": 3.0, "y": 4.0}), "NOT_FOUND", "no compiled graph"),
])
def test_bad_small_calls_get_the_general_errors(server, rpc, req, code, text):
    h = _compiled(rpc).handle
    rpc.Evaluate(request(h, {"x": 3.0, "y": 4.0}), timeout=30)  # (a layout is known)
    with pytest.raises(grpc.RpcError) as e:
        rpc.Evaluate(req(h), timeout=30)
    assert e.value.code().name == code and text in e.value.details()


def test_only_float_tapes_take_the_path(server, rpc):
    with_bool = adsvc.trace(lambda x, y: (x * y, x > y))
    diff = _compiled(rpc, with_bool, (S.MODE_REVERSE,), False)  # (a VJP: a cotangent input)
    h = diff.handle
    assert isinstance(_entry(server, h).plan, TapePlan)
    feeds = {i.name: 1.0 for i in diff.inputs} | {"x": 3.0, "y": 4.0}
    resp = rpc.Evaluate(request(h, feeds), timeout=30)
    assert sorted(t.dtype for t in resp.outputs.values()) == sorted(
        [ir_pb2.DTYPE_FLOAT64, ir_pb2.DTYPE_BOOL] + [ir_pb2.DTYPE_FLOAT64] * 2)
    assert _entry(server, h).scalar is None
    vector = adsvc.trace(lambda x: adsvc.sum(x * x), x=adsvc.f64(3))
    h = _compiled(rpc, vector).handle
    rpc.Evaluate(S.EvaluateRequest(handle=h, inputs={"x": to_tensor(np.ones(3), "float64")}),
                 timeout=30)
    assert _entry(server, h).scalar is None


def test_many_inputs_do_not_take_the_path(server, rpc):
    n = W.MAX_VALUES + 1
    many = adsvc.trace(lambda **xs: sum(xs.values(), 0.0) * 2.0,
                       **{f"x{i}": adsvc.f64() for i in range(n)})
    h = _compiled(rpc, many).handle
    resp = rpc.Evaluate(request(h, {f"x{i}": float(i) for i in range(n)}, ("grad:x7",)),
                        timeout=60)
    assert struct.unpack("<d", resp.outputs["grad:x7"].raw) == (2.0,)
    assert _entry(server, h).scalar is None


def test_forward_mode_tangents_take_the_path(server, rpc):
    diff = _compiled(rpc, modes=(S.MODE_FORWARD,), seed=False)
    h, name = diff.handle, diff.outputs[0].name
    feeds = {"x": 3.0, "y": 4.0, "tangent:x": 1.0, "tangent:y": 0.5}
    resp = rpc.Evaluate(request(h, feeds), timeout=30)
    assert struct.unpack("<d", resp.outputs["tangent:" + name].raw) == (10.0 + 0.5 * 3.0,)
    assert struct.unpack("<d", resp.outputs[name].raw) == (23.0,)
    assert isinstance(_entry(server, h).scalar, ScalarPath)


def test_the_layouts_kept_are_bounded(server, rpc):
    h = _compiled(rpc).handle
    rpc.Evaluate(request(h, {"x": 3.0, "y": 4.0}), timeout=30)
    outs = list(_entry(server, h).scalar.index)
    for i in range(3 * LAYOUTS):
        picked = tuple(outs[j % len(outs)] for j in range(i % 3 + 1 + i // 3))
        rpc.Evaluate(request(h, {"x": 3.0, "y": 4.0}, picked), timeout=30)
    path = _entry(server, h).scalar
    assert len(path._known) <= LAYOUTS and len(path._layouts) <= LAYOUTS


# -- the SDK's path --------------------------------------------------------------------
def test_the_sdk_sends_and_reads_small_calls_by_layout(server, client, monkeypatch):
    local = adsvc.local()
    sent = []
    real = W.ScalarCall.read

    def read(self, buf):
        got = real(self, buf)
        sent.append(got is not None)
        return got
    monkeypatch.setattr(W.ScalarCall, "read", read)
    for x, y in zip(ODD, reversed(ODD)):
        v, g = client.value_and_grad(SEED, x=x, y=y)
        lv, lg = local.value_and_grad(SEED, x=x, y=y)
        assert bits(v) == bits(lv) and {k: bits(a) for k, a in g.items()} == \
            {k: bits(a) for k, a in lg.items()}
        assert isinstance(v, np.ndarray) and v.dtype == np.float64 and v.shape == ()
        assert {k: bits(a) for k, a in client.grad(SEED, x=x, y=y).items()} == \
            {k: bits(a) for k, a in lg.items()}
    assert sent and all(sent)


def test_the_sdk_checks_other_feeds_the_general_way(client):
    want = client.value_and_grad(SEED, x=3.0, y=4.0)
    for feeds in ({"x": 3, "y": 4}, {"x": np.float64(3.0), "y": np.array(4.0)},
                  {"x": np.float32(3.0), "y": 4.0}):
        v, g = client.value_and_grad(SEED, **feeds)
        assert v == want[0] and g == want[1]
    with pytest.raises(InputError, match="missing input 'y'"):
        client.value_and_grad(SEED, x=3.0)
    with pytest.raises(InputError, match="unknown input 'z'"):
        client.value_and_grad(SEED, x=3.0, y=4.0, z=1.0)
    with pytest.raises(InputError, match="'y'"):
        client.value_and_grad(SEED, x=3.0, y="four")


def test_the_sdk_small_call_survives_a_handle_miss(server, client):
    assert client.grad(SEED, x=3.0, y=4.0) == {"x": 10.0, "y": 3.0}
    server[0].adsvc_servicer.compiler.cache.clear()  # as after a restart
    assert client.grad(SEED, x=3.0, y=4.0) == {"x": 10.0, "y": 3.0}
    assert client.grad(SEED, x=1.0, y=2.0) == {"x": 4.0, "y": 1.0}


# -- the access line -------------------------------------------------------------------
def _logger(name, handlers=1, fmt=access_log.FORMAT):
    lg = logging.getLogger(name)
    lg.handlers.clear()
    lg.filters.clear()
    lg.propagate, lg.level = False, logging.INFO
    streams = []
    for _ in range(handlers):
        streams.append(io.StringIO())
        h = logging.StreamHandler(streams[-1])
        h.setFormatter(logging.Formatter(fmt))
        lg.addHandler(h)
    return lg, streams


ARGS = ("Evaluate", "r-1", "OK", 0.123, "ipv4:127.0.0.1:1", " cache=handle ops=3")
FMT = "rpc=%s request_id=%s status=%s ms=%.1f peer=%s%s"


@pytest.mark.parametrize("now", [1_700_000_000.0, 1_700_000_000.999, 1_700_000_059.5])
def test_the_direct_access_line_is_what_logging_writes(monkeypatch, now):
    monkeypatch.setattr(time, "time", lambda: now)
    lg, (out,) = _logger("test.access.direct")
    access = AccessLog(lg)
    access.write(FMT, ARGS)
    access.flush()  # (written by its thread)
    direct = out.getvalue()
    out.seek(0)
    out.truncate()
    lg.info(FMT, *ARGS)
    assert direct == out.getvalue() and direct.endswith("ms=0.1 peer=ipv4:127.0.0.1:1 "
                                                         "cache=handle ops=3\n")


def test_queued_access_lines_are_written_in_order_and_flushed(monkeypatch):
    lg, (out,) = _logger("test.access.many")
    access = AccessLog(lg)
    for i in range(3 * AccessLog.BATCH):
        access.write("n=%d%s", (i, ""))
    access.flush()
    assert [int(line.rsplit("=", 1)[1]) for line in out.getvalue().splitlines()] == \
        list(range(3 * AccessLog.BATCH))


def test_other_configurations_get_log_records(monkeypatch):
    records = []
    for name, setup in [("two", lambda lg: None), ("filtered", lambda lg: lg.addFilter(
            lambda r: records.append(r) or True)), ("format", lambda lg: None)]:
        lg, streams = _logger(f"test.access.{name}", 2 if name == "two" else 1,
                              "%(levelname)s %(message)s" if name == "format"
                              else access_log.FORMAT)
        setup(lg)
        AccessLog(lg).write(FMT, ARGS)
        assert all(s.getvalue().count("request_id=r-1") == 1 for s in streams), name
    assert len(records) == 1 and records[0].getMessage() == FMT % ARGS
    lg, (out,) = _logger("test.access.off")
    lg.setLevel(logging.WARNING)
    AccessLog(lg).write(FMT, ARGS)
    assert out.getvalue() == ""


def test_a_failing_stream_falls_back_to_logging(capsys):
    lg, _ = _logger("test.access.closed")
    stream = io.StringIO()
    lg.handlers[0].setStream(stream)
    stream.close()
    access = AccessLog(lg)
    access.write(FMT, ARGS)
    access.flush()  # logging reports the error on stderr; nothing is raised
    assert "Logging error" in capsys.readouterr().err


# -- the C call behind `ScalarPath.read` -----------------------------------------------
def _tape(mode, seed, g):
    from adsvc.runtime.tape import tape_plan

    return tape_plan(g, (mode,), None, seed, lambda: None)


FIVE = adsvc.trace(lambda a, b, c, d, e: adsvc.sin(a * b) / (c + 2.5) - adsvc.tanh(d) * e
                   + a * a)


@pytest.mark.parametrize("mode, seed", [("reverse", True), ("reverse", False),
                                        ("forward", False)])
def test_the_c_small_call_answers_as_the_python_path(mode, seed):
    from adsvc.runtime.scalar_vm import small_call

    plan = _tape(mode, seed, FIVE)
    assert plan is not None and plan.floats_only
    path = ScalarPath("h" * 64, plan)
    rng = np.random.default_rng(3)
    for trial in range(20):
        feeds = dict(zip(path.inputs, rng.standard_normal(len(path.inputs)) * 3))
        if trial == 0:
            feeds = dict(zip(path.inputs, (ODD * 2)[:len(path.inputs)]))
        picked = () if trial % 2 else tuple(path.index)[::-1][:2]
        msg = request("h" * 64, feeds, picked)
        slow = path.evaluate(msg)  # (parsed: floats and a packed response; learns layout)
        data = W.request_layout("h" * 64, path.inputs, picked).pack(list(feeds.values()))
        fast = path.read(data)
        assert fast == slow
        assert small_call(plan.native, *path._known[0][:4], path._known[0][4],
                          data[:-1]) is None
        bad = bytearray(data)
        bad[3] ^= 1  # (in the handle)
        assert path.read(bytes(bad)) is None


def test_the_c_small_call_checks_its_layouts():
    from adsvc.runtime.scalar_vm import small_call

    plan = _tape("reverse", True, SEED)
    path = ScalarPath("h" * 64, plan)
    path.evaluate(request("h" * 64, {"x": 1.0, "y": 2.0}))
    rq, io, rs, oo, src = path._known[0]
    data = W.request_layout("h" * 64, ["x", "y"]).pack([1.0, 2.0])
    assert small_call(plan.native, rq, io, rs, oo, src, data) is not None
    i32 = np.int32
    for bad in [(rq, np.array([len(rq) - 4, 0], i32).tobytes(), rs, oo, src),  # past the end
                (rq, np.array([20, 16], i32).tobytes(), rs, oo, src),  # not ascending
                (rq, io[:4], rs, oo, src),  # an input missing
                (rq, io, rs, oo, np.array([0, 1, 9], i32).tobytes()),  # no such output
                (rq, io, rs, oo, src[:4])]:  # sources and offsets differ in number
        with pytest.raises(ValueError):
            small_call(plan.native, *bad, data)


def test_a_stuck_stream_holds_the_calls_back_instead_of_queueing(monkeypatch):
    lg, (out,) = _logger("test.access.stuck")
    access = AccessLog(lg)
    monkeypatch.setattr(AccessLog, "MAX_PENDING", 3)
    monkeypatch.setattr(AccessLog, "GATHER", 0.0)  # (the writer takes the first line alone)
    gate = threading.Event()
    real = access._emit

    def slow(handler, lines):
        gate.wait(10)
        real(handler, lines)
    monkeypatch.setattr(access, "_emit", slow)
    access.write(FMT, ARGS)  # the writer takes it and blocks in its write
    assert wait_until(lambda: access._queue.qsize() == 0, 10)
    time.sleep(0.2)  # (it is in `slow` now)
    for _ in range(3):
        access.write(FMT, ARGS)  # queued
    assert access._queue.qsize() == 3
    done = threading.Thread(target=access.write, args=(FMT, ARGS))
    done.start()  # over the bound: this call writes its own line, waiting for the stream
    done.join(0.3)
    assert done.is_alive() and access._queue.qsize() == 3
    gate.set()
    done.join(10)
    access.flush()
    assert out.getvalue().count("request_id=r-1") == 5


def test_the_writer_survives_a_failing_line(monkeypatch, caplog):
    lg, (out,) = _logger("test.access.bad")
    access = AccessLog(lg)

    class Broken:
        def __str__(self):
            raise RuntimeError("no peer")
    access.write("peer=%s", (Broken(),))
    access.flush()
    access.write(FMT, ARGS)
    access.flush()
    assert "request_id=r-1" in out.getvalue()


def test_without_the_native_vm_the_server_imports_and_answers():
    """The C extension is optional (a wheel built without a compiler, as a container's
    may be): the server's modules import and a seed gradient is served by numpy."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["adsvc.runtime._scalarvm"] = None  # as if it was never built
import adsvc
from adsvc.runtime import scalar_vm
from adsvc.server.config import ServerConfig
from service_fixtures import running_server
assert not scalar_vm.available() and scalar_vm.small_call is None
g = adsvc.trace(lambda x, y: x * x + x * y + 2)
with running_server(ServerConfig()) as (_, target), adsvc.connect(target, timeout=60) as c:
    for _ in range(3):
        v, gr = c.value_and_grad(g, x=3.0, y=4.0)
        assert float(v) == 23.0 and gr == {"x": 10.0, "y": 3.0}, (v, gr)
print("ok")
"""
    here = __import__("pathlib").Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=here, env={**__import__("os").environ,
                                                     "PYTHONPATH": str(here)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
