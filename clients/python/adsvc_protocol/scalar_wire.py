"""Evaluate messages whose tensors are all float64 scalars, written and read by a fixed
layout: the small-call path of the SDK (requests) and the server (responses).

An entry of a map<string, Tensor> holding a float64 0-d tensor in `raw` is the same
bytes every time except for its 8 data bytes, which come last:

    map tag, length | key tag, length, key | value tag, length | dtype tag, FLOAT64 |
    raw tag, 8 | the double, little-endian

A `Layout` is a whole message of such entries, in one order, with the constant bytes
around them (the handle, an output_filter). Writing one is one `struct.pack`; reading
one is one `struct.unpack` and a comparison of the constant parts, so bytes laid out in
any other way (other entry order, `values` instead of `raw`, extra fields, another
dtype) do not match and `unpack` returns None: the caller then reads them the general
way (protobuf), which gives the same message. What `pack` writes parses to the message
protobuf would build from the same fields (tests/test_small_calls.py).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

import numpy as np

from adsvc_protocol import dtypes
from adsvc_protocol.proto import ir_pb2, service_pb2
from adsvc_protocol.tensors import TO_ENUM
from adsvc_protocol.wire import _HANDLE, _HANDLE_OUT, _INPUTS, _KEY, _OUTPUTS, _VALUE, _field

F64 = TO_ENUM[dtypes.FLOAT64]
SCALAR = (dtypes.FLOAT64, ())  # the one signature entry this path carries
# a float64 0-d Tensor with raw data, without its 8 data bytes (raw is its last field)
_TENSOR_HEAD = ir_pb2.Tensor(dtype=F64, raw=bytes(8)).SerializeToString()[:-8]
_TENSOR_LEN = len(_TENSOR_HEAD) + 8


MAX_VALUES = 1024  # inputs or outputs at most: small calls (layouts are kept per call)


def all_scalars(signature) -> bool:
    """Is every entry of a {name: (dtype, shape)} signature a float64 scalar, and are
    there at most MAX_VALUES?"""
    return len(signature) <= MAX_VALUES and all(sig == SCALAR for sig in signature.values())


def _entry_head(number: int, name: str) -> bytes:
    """The bytes of map field `number`'s entry for `name`, up to its 8 data bytes."""
    key = name.encode("utf-8")
    key_field = _field(_KEY, len(key)) + key
    value_head = _field(_VALUE, _TENSOR_LEN)
    size = len(key_field) + len(value_head) + _TENSOR_LEN
    return _field(number, size) + key_field + value_head + _TENSOR_HEAD


class Layout:
    """A message of len(parts) - 1 doubles between constant byte strings `parts`."""

    def __init__(self, parts: Sequence[bytes]):
        *heads, tail = parts
        self.count = len(heads)
        self._struct = struct.Struct(
            "<" + "".join(f"{len(h)}sd" for h in heads) + f"{len(tail)}s")
        self._args = [x for h in heads for x in (h, 0.0)] + [tail]
        self._parts = tuple(parts)
        self.size = self._struct.size
        # the message with zeros for the doubles, and where each double starts
        self.template = self.pack([0.0] * self.count)
        starts = itertools.accumulate(len(h) + 8 for h in heads)
        self.offsets = [end - 8 for end in starts]

    def pack(self, values: Sequence[float]) -> bytes:
        """The message with these `count` doubles."""
        args = self._args.copy()
        args[1:-1:2] = values
        return self._struct.pack(*args)

    def unpack(self, buf) -> tuple[float, ...] | None:
        """The doubles of a message laid out exactly so, else None."""
        if len(buf) != self.size:
            return None
        got = self._struct.unpack(buf)
        return got[1::2] if got[0::2] == self._parts else None


def request_layout(handle: str, names: Sequence[str],
                   output_filter: Sequence[str] = ()) -> Layout:
    """EvaluateRequest(handle, inputs={name: float64 scalar}, output_filter), the
    inputs in the order of `names` (fields in protobuf's order: 2, 4, 5)."""
    head = service_pb2.EvaluateRequest(handle=handle).SerializeToString()
    tail = service_pb2.EvaluateRequest(output_filter=output_filter).SerializeToString()
    return Layout(_parts(_INPUTS, head, names, tail))


def response_layout(handle: str, names: Sequence[str]) -> Layout:
    """EvaluateResponse(outputs={name: float64 scalar}, handle), in the order of `names`."""
    tail = _field(_HANDLE_OUT, len(handle.encode("utf-8"))) + handle.encode("utf-8") \
        if handle else b""
    return Layout(_parts(_OUTPUTS, b"", names, tail))


def leading_handle(buf) -> str | None:
    """The handle an EvaluateRequest's bytes start with (field 2, as protobuf and
    `request_layout` write it first), or None: the bytes start otherwise."""
    if len(buf) < 2 or buf[0] != _HANDLE << 3 | 2 or not 0 < buf[1] < 0x80:
        return None
    try:
        return bytes(buf[2:2 + buf[1]]).decode("ascii")
    except UnicodeDecodeError:
        return None


def _parts(number: int, head: bytes, names: Sequence[str], tail: bytes) -> list[bytes]:
    heads = [_entry_head(number, n) for n in names]
    if not heads:
        return [head + tail]
    return [head + heads[0], *heads[1:], tail]


class ScalarCall:
    """The SDK's small-call path for one compiled graph and output selection: an
    Evaluate by `handle` whose inputs and (selected) outputs are all float64 scalars,
    its request packed from the feeds and its response read by layout."""

    def __init__(self, handle: str, inputs: Sequence[str], outputs: Sequence[str],
                 output_filter: Sequence[str] = ()):
        self.handle = handle
        self.inputs = list(inputs)
        self.outputs = list(dict.fromkeys(output_filter)) if output_filter else list(outputs)
        self.request = request_layout(handle, self.inputs, output_filter)
        self.response = response_layout(handle, self.outputs)

    def pack(self, feeds) -> bytes | None:
        """The request for these feeds ({name: value}), or None unless they are exactly
        the inputs, each a Python float (anything else is checked the general way)."""
        if len(feeds) != len(self.inputs):
            return None
        values = [feeds.get(n) for n in self.inputs]
        for v in values:
            if not isinstance(v, float):
                return None
        return self.request.pack(values)

    def read(self, buf) -> dict[str, np.ndarray] | None:
        """{output: 0-d float64 array} of a response laid out as expected, else None."""
        got = self.response.unpack(buf)
        return None if got is None else {n: np.array(v) for n, v in zip(self.outputs, got)}
