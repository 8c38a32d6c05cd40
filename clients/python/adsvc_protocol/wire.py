"""Request bytes written around the tensors' own buffers (the lean wire path).

Encoding an EvaluateRequest the usual way copies each tensor's bytes three times
(`tobytes`, into the Tensor message, into the request's map) before
`SerializeToString` copies them a fourth time; for an 8 MB input that was several ms
per copy. `evaluate_request` (the SDK) and `evaluate_response` (the server) write the
same protobuf wire bytes with one copy: the
small parts (handle, map keys, dtype, dims) are serialized by protobuf itself and the
raw field's tag and length are written here, so the tensors' arrays go straight into
one `bytes.join`. The result parses to exactly the message `EvaluateRequest(handle=...,
inputs={name: to_tensor(...)})` (or the response) would be (tests/test_wire.py).
"""

from __future__ import annotations

import numpy as np

from adsvc_protocol.proto import ir_pb2, service_pb2
from adsvc_protocol.tensors import TO_ENUM, raw_array

# field numbers (protos/adsvc/v1/service.proto, ir.proto); wire type 2 = length-delimited
_HANDLE, _INPUTS = 2, 4  # EvaluateRequest.handle, EvaluateRequest.inputs (a map)
_OUTPUTS = 1  # EvaluateResponse.outputs (a map)
_KEY, _VALUE = 1, 2  # a map entry's key and value
_RAW = 3  # Tensor.raw
# below this many tensor bytes in all, protobuf's own encoding is faster (its C code
# against a few Python calls per tensor here)
LEAN_BYTES = 1 << 16


def worth_it(values) -> bool:
    """Do `values` hold enough bytes for the hand-written encoding to pay?"""
    return sum(np.asarray(v).nbytes for v in values) >= LEAN_BYTES


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(length)


def _tensor_map(number: int, tensors: list[tuple[str, str, object]]) -> list:
    """The parts of the entries of map<string, Tensor> field `number`."""
    parts = []
    for name, dtype, value in tensors:
        arr = raw_array(value, dtype)
        head = ir_pb2.Tensor(dtype=TO_ENUM[dtype], dims=arr.shape).SerializeToString()
        data = memoryview(arr).cast("B") if arr.size else b""
        tensor = [head, _field(_RAW, len(data)), data] if len(data) else [head]
        t_len = sum(len(p) for p in tensor)
        key = name.encode("utf-8")
        key_field = _field(_KEY, len(key)) + key
        entry_len = len(key_field) + len(_field(_VALUE, t_len)) + t_len
        parts += [_field(number, entry_len), key_field, _field(_VALUE, t_len), *tensor]
    return parts


def evaluate_request(handle: str, inputs: list[tuple[str, str, object]],
                     output_filter: tuple[str, ...] = ()) -> bytes:
    """The serialized EvaluateRequest for `handle` with `inputs` [(name, dtype, value)]
    (values already checked against the signature) and `output_filter`."""
    head = service_pb2.EvaluateRequest(handle=handle, output_filter=output_filter)
    return b"".join([head.SerializeToString(), *_tensor_map(_INPUTS, inputs)])


def evaluate_response(handle: str, outputs: list[tuple[str, str, object]]) -> bytes:
    """The serialized EvaluateResponse with `outputs` [(name, dtype, value)] and `handle`
    (values of the declared dtypes; a value that cannot be converted raises as
    `to_tensor` does)."""
    return b"".join([*_tensor_map(_OUTPUTS, outputs),
                     service_pb2.EvaluateResponse(handle=handle).SerializeToString()])
