"""Messages written around the tensors' own buffers, and read without copying them
(the lean wire path).

Encoding an EvaluateRequest the usual way copies each tensor's bytes three times
(`tobytes`, into the Tensor message, into the request's map) before
`SerializeToString` copies them a fourth time; for an 8 MB input that was several ms
per copy. `evaluate_request` (the SDK) and `evaluate_response` (the server) write the
same protobuf wire bytes with one copy: the
small parts (handle, map keys, dtype, dims) are serialized by protobuf itself and the
raw field's tag and length are written here, so the tensors' arrays go straight into
one `bytes.join`. The result parses to exactly the message `EvaluateRequest(handle=...,
inputs={name: to_tensor(...)})` (or the response) would be (tests/test_wire.py).
`read_evaluate_response` (the SDK) and `read_evaluate_request` (the server) read the
tensors of a large message as views of the received bytes: protobuf's parse copies
them, and so does every read of a Tensor's raw field.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from adsvc_protocol.proto import ir_pb2, service_pb2
from adsvc_protocol.tensors import TO_ENUM, raw_array

# field numbers (protos/adsvc/v1/service.proto, ir.proto); wire type 2 = length-delimited
_HANDLE, _INPUTS = 2, 4  # EvaluateRequest.handle, EvaluateRequest.inputs (a map)
_OUTPUTS, _HANDLE_OUT = 1, 2  # EvaluateResponse.outputs (a map), EvaluateResponse.handle
_KEY, _VALUE = 1, 2  # a map entry's key and value
_RAW, _PAD = 3, 15  # Tensor.raw, Tensor.pad
ALIGN = 8  # raw data starts at a multiple of this in messages written here
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


def _padding(size: int) -> bytes:
    """A Tensor.pad field of `size` bytes in all (2 to 129)."""
    return _field(_PAD, size - 2) + bytes(size - 2)


def _tensor_map(number: int, tensors: list[tuple[str, str, object]], start: int = 0) -> list:
    """The parts of the entries of map<string, Tensor> field `number`, which starts at
    byte `start` of the message: each raw field's bytes start at a multiple of ALIGN
    (a Tensor.pad field in front of it), so the reader can use them in place."""
    parts, pos = [], start
    for name, dtype, value in tensors:
        arr = raw_array(value, dtype)
        head = ir_pb2.Tensor(dtype=TO_ENUM[dtype], dims=arr.shape).SerializeToString()
        data = memoryview(arr).cast("B") if arr.size else b""
        key = name.encode("utf-8")
        key_field = _field(_KEY, len(key)) + key
        # no pad, then pads of 2, 3, ... bytes: the first that aligns the data (a longer
        # pad can lengthen the entry's length varints, so not every size aligns; two of
        # them would have to cross a varint step for none of 2..2 * ALIGN + 1 to)
        for size in (0, *range(2, 2 * ALIGN + 2)):
            pad = _padding(size) if size else b""
            tensor = [head, pad, _field(_RAW, len(data))] if len(data) else [head]
            t_len = sum(len(p) for p in tensor) + len(data)
            entry_len = len(key_field) + len(_field(_VALUE, t_len)) + t_len
            front = [_field(number, entry_len), key_field, _field(_VALUE, t_len), *tensor]
            at = pos + sum(len(p) for p in front)  # where the data starts
            if not len(data) or at % ALIGN == 0:
                break
        else:  # (cannot happen: see above)
            raise AssertionError("no pad aligns the tensor's data")
        parts += [*front, data] if len(data) else front
        pos = at + len(data)
    return parts


def evaluate_request(handle: str, inputs: list[tuple[str, str, object]],
                     output_filter: tuple[str, ...] = ()) -> bytes:
    """The serialized EvaluateRequest for `handle` with `inputs` [(name, dtype, value)]
    (values already checked against the signature) and `output_filter`."""
    head = service_pb2.EvaluateRequest(handle=handle,
                                       output_filter=output_filter).SerializeToString()
    return b"".join([head, *_tensor_map(_INPUTS, inputs, len(head))])


def evaluate_response(handle: str, outputs: list[tuple[str, str, object]]) -> bytes:
    """The serialized EvaluateResponse with `outputs` [(name, dtype, value)] and `handle`
    (values of the declared dtypes; a value that cannot be converted raises as
    `to_tensor` does)."""
    return b"".join([*_tensor_map(_OUTPUTS, outputs),
                     service_pb2.EvaluateResponse(handle=handle).SerializeToString()])


# -- reading a response without copying its tensors -------------------------------------
def _varint_at(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes, start: int, end: int, wanted=(1, 2)):
    """(field number, start of its tag, start of its value, end) of each field in
    buf[start:end]; the `wanted` ones must be length-delimited (buf[value:end])."""
    pos = start
    while pos < end:
        at = pos
        tag, pos = _varint_at(buf, pos)
        kind = tag & 7
        if kind == 0:
            _, after = _varint_at(buf, pos)
        elif kind == 1:
            after = pos + 8
        elif kind == 5:
            after = pos + 4
        elif kind == 2:
            length, pos = _varint_at(buf, pos)
            after = pos + length
        else:
            raise ValueError(f"wire type {kind}")
        if after > end:
            raise ValueError("truncated field")
        if kind != 2 and (tag >> 3) in wanted:  # a known field of another wire type
            raise ValueError(f"field {tag >> 3}: wire type {kind}")
        yield tag >> 3, at, pos, after
        pos = after


def _tensor_parts(buf: bytes, start: int, end: int) -> tuple[ir_pb2.Tensor, memoryview]:
    """The Tensor in buf[start:end] without its raw bytes, and those bytes (a view)."""
    small, raw, pos = [], memoryview(b""), start
    for number, at, value, after in _fields(buf, start, end, (_RAW,)):
        if number == _RAW:  # (the last one counts, as in protobuf)
            small.append(buf[pos:at])
            raw, pos = memoryview(buf)[value:after], after
    small.append(buf[pos:end])
    return ir_pb2.Tensor.FromString(b"".join(small)), raw


def _map_entry(buf: bytes, start: int, end: int) -> tuple[str, tuple]:
    """(key, (Tensor without raw, raw bytes as a view)) of the map<string, Tensor> entry
    in buf[start:end]. Its value must come once: protobuf merges repeated ones (the
    caller then parses the whole message with protobuf)."""
    key, tensor = "", (ir_pb2.Tensor(), memoryview(b""))
    for n, _, v, a in _fields(buf, start, end):
        if n == _KEY:
            key = buf[v:a].decode("utf-8")
        elif n == _VALUE:
            if tensor[0].ByteSize() or len(tensor[1]):
                raise ValueError("a map entry with its value twice")
            tensor = _tensor_parts(buf, v, a)
    return key, tensor


def read_evaluate_request(buf: bytes) -> tuple[service_pb2.EvaluateRequest, dict]:
    """(the EvaluateRequest without its inputs' raw bytes, {input: raw bytes as a view
    of `buf`}) of a serialized request (the server, for large ones): protobuf's parse
    copies the tensors, and so does each read of a raw field. Everything but the inputs'
    raw bytes is parsed by protobuf; anything malformed is parsed by protobuf whole,
    which raises its own error (then the views are empty)."""
    try:
        rest, tensors, raws, pos = [], {}, {}, 0
        for number, at, value, after in _fields(buf, 0, len(buf), (_INPUTS,)):
            if number != _INPUTS:
                continue
            key, tensor = _map_entry(buf, value, after)
            rest.append(buf[pos:at])
            pos = after
            tensors[key], raws[key] = tensor  # (the last entry of a key counts)
        rest.append(buf[pos:])
        msg = service_pb2.EvaluateRequest.FromString(b"".join(rest))
        for key, t in tensors.items():
            msg.inputs[key].CopyFrom(t)
        return msg, raws
    except (ValueError, IndexError, UnicodeDecodeError, DecodeError):
        return service_pb2.EvaluateRequest.FromString(buf), {}  # (raises its DecodeError)


def read_evaluate_response(buf: bytes) -> tuple[str, dict[str, tuple]]:
    """(handle, {output: (Tensor without raw, raw bytes as a view of `buf`)}) of a
    serialized EvaluateResponse: the tensors' bytes are not copied (protobuf's parse
    and each read of a bytes field copy them). Anything malformed is parsed by
    protobuf instead, which raises its own error."""
    try:
        handle, outputs = "", {}
        for number, _, value, after in _fields(buf, 0, len(buf)):
            if number == _OUTPUTS:
                key, tensor = _map_entry(buf, value, after)
                outputs[key] = tensor
            elif number == _HANDLE_OUT:
                handle = buf[value:after].decode("utf-8")
        return handle, outputs
    except (ValueError, IndexError, UnicodeDecodeError, DecodeError):
        msg = service_pb2.EvaluateResponse.FromString(buf)  # raises its DecodeError
        return msg.handle, {k: (t, memoryview(t.raw)) for k, t in msg.outputs.items()}
