"""numpy arrays <-> Tensor protos (raw little-endian bytes; `values` accepted on read)."""

from __future__ import annotations

import math
import sys

import numpy as np

from adsvc_protocol import dtypes
from adsvc_protocol.dims import Dim, is_symbolic
from adsvc_protocol.errors import InputError, InvalidGraphError, LimitExceededError, ShapeError
from adsvc_protocol.proto import ir_pb2

TO_ENUM = {
    dtypes.FLOAT64: ir_pb2.DTYPE_FLOAT64, dtypes.FLOAT32: ir_pb2.DTYPE_FLOAT32,
    dtypes.INT64: ir_pb2.DTYPE_INT64, dtypes.INT32: ir_pb2.DTYPE_INT32,
    dtypes.BOOL: ir_pb2.DTYPE_BOOL,
}
FROM_ENUM = {v: k for k, v in TO_ENUM.items()}
_LITTLE_ENDIAN = sys.byteorder == "little"  # raw bytes are this machine's order


def dtype_from_enum(value: int, where: str = "", error=InputError) -> str:
    """The dtype name of a DType enum value; `error` (at `where`) if it is unset or
    unknown."""
    try:
        return FROM_ENUM[value]
    except KeyError:
        raise error(f"dtype is unset or unknown ({value})", field=where) from None


def ints_to_proto(values) -> tuple[list[int], list[str]]:
    """(values, symbols) of a list of ints and symbolic dims, as TensorType.dims/symbols
    and IntList.values/symbols write them (symbols empty when none is symbolic)."""
    if not is_symbolic(values):
        return [int(v) for v in values], []
    return ([-1 if isinstance(v, Dim) else int(v) for v in values],
            [str(v) if isinstance(v, Dim) else "" for v in values])


def ints_from_proto(values, symbols, where: str = "") -> tuple:
    """The ints and symbolic dims of (values, symbols); InvalidGraphError naming `where`
    for a bad expression or mismatched lengths."""
    if not len(symbols):
        return tuple(int(v) for v in values)
    if len(symbols) != len(values):
        raise InvalidGraphError(f"{len(symbols)} symbols for {len(values)} dimensions",
                                field=where)
    try:
        return tuple(Dim.parse(s) if s else int(v) for v, s in zip(values, symbols))
    except ShapeError as e:
        raise InvalidGraphError(e.description, field=where) from None


def type_to_proto(dtype: str, shape) -> ir_pb2.TensorType:
    """The TensorType of (dtype, shape), symbolic dimensions included."""
    dims, symbols = ints_to_proto(shape)
    return ir_pb2.TensorType(dtype=TO_ENUM[dtype], dims=dims, symbols=symbols)


def shape_from_proto(t: ir_pb2.TensorType, where: str = "") -> tuple:
    """The shape of a TensorType, symbolic dimensions included."""
    return ints_from_proto(t.dims, t.symbols, where)


def to_tensor(value, dtype: str | None = None) -> ir_pb2.Tensor:
    """Encode an array-like as a Tensor with raw little-endian bytes."""
    arr = np.asarray(value)
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"unsigned values up to {arr.max()} do not fit in int64")
    if dtype is None:
        if arr.dtype.kind == "f" and arr.dtype != np.float32:
            dtype = dtypes.FLOAT64
        elif arr.dtype.kind in "iu" and arr.dtype not in (np.int32,):
            dtype = dtypes.INT64
        else:
            dtype = dtypes.from_numpy(arr.dtype)
    arr = raw_array(arr, dtype)
    return ir_pb2.Tensor(dtype=TO_ENUM[dtype], dims=arr.shape, raw=arr.tobytes())


def raw_array(value, dtype: str) -> np.ndarray:
    """`value` as the array a Tensor's raw bytes hold: of `dtype`, C order, little-endian
    (0-d shapes kept)."""
    return np.asarray(value, dtype=dtypes.to_numpy(dtype), order="C")  # (to_numpy: "<")


def from_tensor(t: ir_pb2.Tensor, where: str = "", error=InputError,
                max_elements: int | None = None, raw=None) -> np.ndarray:
    """Decode a Tensor; errors name `where` and say what is inconsistent. `raw`: its raw
    bytes when read separately (`wire.read_evaluate_response`: a view, not copied)."""
    dt = dtype_from_enum(t.dtype, where, error)
    dims = tuple(t.dims)  # (ints: repeated int64)
    if dims and min(dims) < 0:
        raise error(f"negative dimension in {list(dims)}", field=where)
    n = math.prod(dims)  # exact: np.prod in int64 would wrap for huge dims
    if n >= 2**62:
        raise error(f"shape {list(dims)} has too many elements", field=where)
    if max_elements is not None and n > max_elements:
        raise LimitExceededError(f"tensor has {n} elements; the limit is {max_elements}",
                                 field=where)
    np_dt = dtypes.to_numpy(dt)
    raw = t.raw if raw is None else raw  # read once: each read of a bytes field copies it
    if len(t.values):
        if raw:
            raise error("set either raw or values, not both", field=where)
        if len(t.values) != n:
            raise error(f"{len(t.values)} values for shape {list(dims)} ({n} elements)",
                        field=where)
        src = np.asarray(t.values, dtype=np.float64)
        arr = src.astype(np_dt)
        if dt != dtypes.FLOAT32 and dt != dtypes.FLOAT64 and not np.array_equal(arr, src):
            raise error(f"values are not exact {dt}", field=where)
        return arr.reshape(dims)
    if len(raw) != n * np_dt.itemsize:
        raise error(f"raw has {len(raw)} bytes; {dt}{list(dims)} needs "
                    f"{n * np_dt.itemsize}", field=where)
    arr = np.frombuffer(raw, dtype=np_dt).reshape(dims)  # a view of the bytes: no copy
    if not arr.flags.aligned:  # numpy is several times slower on unaligned elements
        arr = arr.copy()
    if dt == dtypes.BOOL and arr.size and arr.view(np.uint8).max() > 1:
        raise error("bool bytes must be 0 or 1", field=where)
    return arr if _LITTLE_ENDIAN else arr.astype(np_dt.newbyteorder("="), copy=False)
