"""The lean wire path (adsvc_protocol/wire.py): a request written around the tensors'
buffers parses to exactly the message protobuf would have serialized, for every dtype,
scalars, empty and multi-dimensional arrays, non-contiguous and big-endian inputs,
non-ASCII names and large tensors (multi-byte lengths); and the SDK's Evaluate, which
sends it, answers as before, the re-send after an unknown handle included."""

from __future__ import annotations

import numpy as np
import pytest
from service_fixtures import running_server

import adsvc as ad
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor
from adsvc_protocol.wire import (
    evaluate_request,
    evaluate_response,
    read_evaluate_request,
    read_evaluate_response,
)

RNG = np.random.default_rng(0)
CASES = [
    ("x", "float64", RNG.standard_normal((30, 7))),
    ("scalar", "float64", 3.5),
    ("flags", "bool", np.array([True, False, True])),
    ("empty", "float32", np.zeros((0, 3), np.float32)),
    ("ints", "int64", np.arange(5)),
    ("i32", "int32", np.array([[1, -2], [3, 4]], np.int32)),
    ("transposed", "float64", RNG.standard_normal((4, 6)).T),  # not C-contiguous
    ("big_endian", "float64", np.arange(6, dtype=">f8")),
    ("größe", "float32", RNG.standard_normal(3).astype(np.float32)),
    ("large", "float64", RNG.standard_normal(300_000)),  # 2.4 MB: a 3-byte length
]


def _unpadded(msg, field: str):
    """`msg` with the Tensor.pad fields cleared (ignored on read), and the pads' sizes."""
    sizes = []
    for t in getattr(msg, field).values():
        sizes.append(len(t.pad))
        t.ClearField("pad")
    return msg, sizes


def _aligned(buf: bytes, tensors) -> bool:
    """Does every nonempty tensor's raw data start at a multiple of wire.ALIGN?"""
    from adsvc_protocol import wire

    found = [raw for _, (_, raw) in tensors.items()]
    return all(np.frombuffer(buf, np.uint8).ctypes.data % 8 == 0 and
               (len(raw) == 0 or (np.frombuffer(raw, np.uint8).ctypes.data
                                  - np.frombuffer(buf, np.uint8).ctypes.data) % wire.ALIGN == 0)
               for raw in found)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_tensor_parses_to_the_protobuf_message(case):
    name, dtype, value = case
    raw = evaluate_request("h" * 64, [case])
    want = S.EvaluateRequest(handle="h" * 64, inputs={name: to_tensor(value, dtype)})
    got, pads = _unpadded(S.EvaluateRequest.FromString(raw), "inputs")
    assert got == want and all(p < 8 for p in pads)  # (pads of 2 to 9 bytes in all)
    np.testing.assert_array_equal(from_tensor(got.inputs[name]), np.asarray(value))


def test_several_inputs_in_one_request():
    raw = evaluate_request("abc", CASES)
    want = S.EvaluateRequest(handle="abc",
                             inputs={n: to_tensor(v, d) for n, d, v in CASES})
    assert _unpadded(S.EvaluateRequest.FromString(raw), "inputs")[0] == want
    msg, raws = read_evaluate_request(raw)
    assert _aligned(raw, {k: (None, v) for k, v in raws.items()})


@pytest.mark.parametrize("n", [1, 15, 16, 17, 2**14 - 1, 2**14, 2**21 - 2, 2**21])
@pytest.mark.parametrize("handle", ["", "h", "h" * 64, "h" * 200])
def test_raw_data_starts_aligned_whatever_the_lengths(n, handle):
    """Lengths around the varints' size steps (2**7, 2**14, 2**21 bytes) and handles
    of any length: the pad puts each raw field's bytes at a multiple of 8 of the
    message, in requests and responses."""
    x = np.arange(n, dtype=np.float64)
    pair = [("x", "float64", x), ("y" * 130, "int32", np.arange(n % 7 + 1, dtype=np.int32))]
    req = evaluate_request(handle, pair, ("f",))
    assert _aligned(req, {k: (None, v) for k, v in read_evaluate_request(req)[1].items()})
    resp = evaluate_response(handle, pair)
    assert _aligned(resp, read_evaluate_response(resp)[1])
    np.testing.assert_array_equal(np.frombuffer(read_evaluate_response(resp)[1]["x"][1]), x)


@pytest.mark.parametrize("n", [1000, 20_000])  # under and over wire.LEAN_BYTES
def test_the_sdk_sends_it_and_resends_after_an_unknown_handle(n):
    from adsvc_protocol import wire

    assert (n * 8 >= wire.LEAN_BYTES) == (n == 20_000)
    g = ad.trace(lambda x, y: ad.sum(x * x) * y, x=ad.f64(n), y=ad.f64())
    h = ad.trace(lambda x: x * 2.0, x=ad.f64(n))
    x = RNG.standard_normal(n)
    with running_server() as (srv, target), ad.connect(target, timeout=60) as c:
        value, grads = c.value_and_grad(g, x=x, y=2.0)
        assert float(value) == pytest.approx(2.0 * float(np.sum(x * x)), rel=1e-14)
        np.testing.assert_allclose(grads["x"], 4.0 * x, rtol=1e-14)
        srv.adsvc_servicer.compiler.cache.clear()  # as after a restart
        value2, grads2 = c.value_and_grad(g, x=x, y=2.0)
        assert float(value2) == float(value)
        np.testing.assert_array_equal(grads2["x"], grads["x"])
        out = c.evaluate(h, x=x)  # a response of n floats: lean above LEAN_BYTES
        np.testing.assert_array_equal(out["out"], x * 2.0)


def test_the_response_parses_to_the_protobuf_message():
    from adsvc_protocol.wire import evaluate_response

    raw = evaluate_response("handle-1", CASES)
    want = S.EvaluateResponse(handle="handle-1",
                              outputs={n: to_tensor(v, d) for n, d, v in CASES})
    assert _unpadded(S.EvaluateResponse.FromString(raw), "outputs")[0] == want
    assert _aligned(raw, read_evaluate_response(raw)[1])
    assert S.EvaluateResponse.FromString(evaluate_response("h", [])) == \
        S.EvaluateResponse(handle="h")


def _read(buf: bytes) -> tuple[str, dict]:
    """What read_evaluate_response gives, decoded: (handle, {name: (dtype, array)})."""
    handle, outs = read_evaluate_response(buf)
    return handle, {k: (t.dtype, list(t.dims), from_tensor(t, raw=raw))
                    for k, (t, raw) in outs.items()}


def _protobuf(buf: bytes) -> tuple[str, dict]:
    msg = S.EvaluateResponse.FromString(buf)
    return msg.handle, {k: (t.dtype, list(t.dims), from_tensor(t)) for k, t in msg.outputs.items()}


def _same(a, b):
    assert a[0] == b[0] and a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k][:2] == b[1][k][:2], k
        np.testing.assert_array_equal(a[1][k][2], b[1][k][2])
        assert a[1][k][2].dtype == b[1][k][2].dtype, k


def test_responses_read_in_place_equal_protobufs_parse():
    """Every dtype and shape, the lean writer's bytes and protobuf's own, unknown fields,
    a key given twice and a raw field given twice (the last counts, as in protobuf),
    values instead of raw, and no handle: read_evaluate_response agrees with parsing,
    and its arrays are views of the response bytes."""
    lean = evaluate_response("h" * 64, CASES)
    _same(_read(lean), _protobuf(lean))
    handle, outs = read_evaluate_response(lean)
    assert outs["large"][1].obj is lean  # the bytes themselves, not a copy
    msg = S.EvaluateResponse(handle="abc", outputs={k: to_tensor(v, d) for k, d, v in CASES})
    msg.outputs["listed"].CopyFrom(ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, dims=[2],
                                                 values=[1.5, -2.0]))
    _same(_read(msg.SerializeToString()), _protobuf(msg.SerializeToString()))
    t = ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, dims=[1], raw=np.float64(1.0).tobytes())
    twice = t.SerializeToString() + ir_pb2.Tensor(raw=np.float64(7.0).tobytes()).SerializeToString()
    entry = S.EvaluateResponse(outputs={"a": t}).SerializeToString()
    odd = (b"\x58\x05" + entry  # field 11 (unknown) as a varint
           + S.EvaluateResponse(outputs={"a": ir_pb2.Tensor.FromString(twice)}).SerializeToString())
    _same(_read(odd), _protobuf(odd))
    assert _read(odd)[1]["a"][2].tolist() == [7.0]
    assert _read(b"") == ("", {})


def _as_protobuf_does(read, parse, bad: bytes) -> None:
    """`read(bad)` raises what `parse(bad)` raises, or gives what it gives."""
    try:
        want = parse(bad)
    except Exception as e:  # protobuf refuses it: the reader raises the same
        with pytest.raises(type(e)):
            read(bad)
    else:
        _same(read(bad), want)


def test_malformed_responses_raise_as_protobuf_does():
    good = evaluate_response("h", [("x", "float64", np.arange(4.0))])
    for bad in (good[:-3], good[:5], b"\x0a\xff\xff\xff\xff\x0f", b"\x0b", b"\x08\x01"):
        _as_protobuf_does(_read, _protobuf, bad)


def _read_request(buf: bytes):
    """What read_evaluate_request gives, decoded: (the message without inputs, {name:
    (dtype, dims, array)})."""
    msg, raws = read_evaluate_request(buf)
    inputs = {k: (t.dtype, list(t.dims), from_tensor(t, raw=raws.get(k)))
              for k, t in msg.inputs.items()}
    msg.ClearField("inputs")
    return msg, inputs


def _protobuf_request(buf: bytes):
    msg = S.EvaluateRequest.FromString(buf)
    inputs = {k: (t.dtype, list(t.dims), from_tensor(t)) for k, t in msg.inputs.items()}
    msg.ClearField("inputs")
    return msg, inputs


def test_requests_read_in_place_equal_protobufs_parse():
    """As for responses: every dtype and shape, the SDK's bytes and protobuf's own, a
    graph and differentiation with the inputs, an output_filter, unknown fields, a key
    and a raw field given twice, values instead of raw; the arrays view the bytes."""
    lean = evaluate_request("h" * 64, CASES, ("a", "b"))
    _same(_read_request(lean), _protobuf_request(lean))
    msg, raws = read_evaluate_request(lean)
    assert raws["large"].obj is lean and msg.output_filter == ["a", "b"]
    g = ad.to_proto(ad.trace(lambda x: x * x))
    full = S.EvaluateRequest(graph=g, differentiation=S.Differentiation(
        modes=[S.MODE_REVERSE], seed=True), inputs={k: to_tensor(v, d) for k, d, v in CASES})
    full.inputs["listed"].CopyFrom(ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, dims=[2],
                                                 values=[1.5, -2.0]))
    _same(_read_request(full.SerializeToString()), _protobuf_request(full.SerializeToString()))
    t = ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, dims=[1], raw=np.float64(1.0).tobytes())
    twice = t.SerializeToString() + ir_pb2.Tensor(raw=np.float64(7.0).tobytes()).SerializeToString()
    odd = (b"\x58\x05" + S.EvaluateRequest(handle="h", inputs={"a": t}).SerializeToString()
           + S.EvaluateRequest(inputs={"a": ir_pb2.Tensor.FromString(twice)}).SerializeToString())
    _same(_read_request(odd), _protobuf_request(odd))
    assert _read_request(odd)[1]["a"][2].tolist() == [7.0]


def test_malformed_requests_raise_as_protobuf_does():
    good = evaluate_request("h", [("x", "float64", np.arange(4.0))])
    for bad in (good[:-3], good[:5], b"\x22\xff\xff\xff\xff\x0f", b"\x23", b"\x20\x01",
                b"\x22\x04\x0a\x02\xff\xfe"):
        _as_protobuf_does(_read_request, _protobuf_request, bad)


def test_the_server_reads_large_requests_in_place():
    """A large Evaluate gives what the small path's protobuf parse gives (the 8 MB case
    of W5, smaller), and a malformed large request is INVALID_ARGUMENT."""
    import grpc

    x = RNG.standard_normal(20_000)
    g = ad.trace(lambda x: ad.sum(x * x * 0.5), x=ad.f64(20_000))
    with running_server() as (_, target), ad.connect(target, timeout=60) as c:
        assert np.array_equal(c.grad(g, x=x)["x"], x)
        raw = grpc.insecure_channel(target).unary_unary("/adsvc.v1.AutodiffService/Evaluate")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\x22\xff\xff\x03" + bytes(70_000), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid adsvc.v1.EvaluateRequest" in e.value.details()


@pytest.mark.parametrize("first", [1, 16, 8192])
def test_later_entries_at_varint_steps_are_aligned_too(first):
    """A second entry whose lengths sit at a varint step (entry length 127/128 and
    16383/16384, whatever the key's length): a pad that lengthens the entry's length
    varint must not undo the alignment (it once alternated between two pads forever)."""
    for n2 in [*range(10, 18), *range(2038, 2050)]:
        for key in ("b", "grad:bias", "k" * 60, "k" * 127):
            pair = [("y", "float64", np.zeros(first)),
                    (key, "float64", np.arange(n2, dtype=np.float64))]
            resp = evaluate_response("a" * 64, pair)
            assert _aligned(resp, read_evaluate_response(resp)[1]), (n2, key)
            req = evaluate_request("a" * 64, pair)
            assert _aligned(req, {k: (None, v) for k, v in read_evaluate_request(req)[1].items()})
            assert _unpadded(S.EvaluateResponse.FromString(resp), "outputs")[0] == \
                S.EvaluateResponse(handle="a" * 64,
                                   outputs={n: to_tensor(v, d) for n, d, v in pair})


def test_an_entry_with_its_value_twice_is_merged_as_protobuf_does():
    """protobuf merges an entry's repeated `value` messages (dtype and dims from one,
    raw from the other): both readers give what protobuf gives."""
    from adsvc_protocol.wire import _field

    head = ir_pb2.Tensor(dtype=ir_pb2.DTYPE_FLOAT64, dims=[8192]).SerializeToString()
    data = ir_pb2.Tensor(raw=np.arange(8192, dtype=np.float64).tobytes()).SerializeToString()
    body = b"\x0a\x01x" + _field(2, len(head)) + head + _field(2, len(data)) + data
    for number, read, parse in [(4, _read_request, _protobuf_request),
                                (1, _read, _protobuf)]:
        buf = _field(number, len(body)) + body
        got, want = read(buf), parse(buf)
        _same(got, want)
        assert list(got[1]["x"][1]) == [8192]
