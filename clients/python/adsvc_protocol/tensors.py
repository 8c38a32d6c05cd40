"""numpy arrays <-> Tensor protos (raw little-endian bytes; `values` accepted on read)."""

from __future__ import annotations

import math

import numpy as np

from adsvc_protocol import dtypes
from adsvc_protocol.errors import InputError, LimitExceededError
from adsvc_protocol.proto import ir_pb2

TO_ENUM = {
    dtypes.FLOAT64: ir_pb2.DTYPE_FLOAT64, dtypes.FLOAT32: ir_pb2.DTYPE_FLOAT32,
    dtypes.INT64: ir_pb2.DTYPE_INT64, dtypes.INT32: ir_pb2.DTYPE_INT32,
    dtypes.BOOL: ir_pb2.DTYPE_BOOL,
}
FROM_ENUM = {v: k for k, v in TO_ENUM.items()}


def dtype_from_enum(value: int, where: str = "", error=InputError) -> str:
    """The dtype name of a DType enum value; `error` (at `where`) if it is unset or
    unknown."""
    try:
        return FROM_ENUM[value]
    except KeyError:
        raise error(f"dtype is unset or unknown ({value})", field=where) from None


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
    arr = np.asarray(arr, dtype=dtypes.to_numpy(dtype), order="C")  # keeps 0-d shapes
    return ir_pb2.Tensor(dtype=TO_ENUM[dtype], dims=arr.shape, raw=arr.tobytes())


def from_tensor(t: ir_pb2.Tensor, where: str = "", error=InputError,
                max_elements: int | None = None) -> np.ndarray:
    """Decode a Tensor; errors name `where` and say what is inconsistent."""
    dt = dtype_from_enum(t.dtype, where, error)
    dims = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in dims):
        raise error(f"negative dimension in {list(dims)}", field=where)
    n = math.prod(dims)  # exact: np.prod in int64 would wrap for huge dims
    if n >= 2**62:
        raise error(f"shape {list(dims)} has too many elements", field=where)
    if max_elements is not None and n > max_elements:
        raise LimitExceededError(f"tensor has {n} elements; the limit is {max_elements}",
                                 field=where)
    np_dt = dtypes.to_numpy(dt)
    if t.raw and len(t.values):
        raise error("set either raw or values, not both", field=where)
    if len(t.values):
        if len(t.values) != n:
            raise error(f"{len(t.values)} values for shape {list(dims)} ({n} elements)",
                        field=where)
        src = np.asarray(t.values, dtype=np.float64)
        arr = src.astype(np_dt)
        if dt != dtypes.FLOAT32 and dt != dtypes.FLOAT64 and not np.array_equal(arr, src):
            raise error(f"values are not exact {dt}", field=where)
        return arr.reshape(dims)
    if len(t.raw) != n * np_dt.itemsize:
        raise error(f"raw has {len(t.raw)} bytes; {dt}{list(dims)} needs "
                    f"{n * np_dt.itemsize}", field=where)
    arr = np.frombuffer(t.raw, dtype=np_dt).reshape(dims)
    if dt == dtypes.BOOL and arr.size and arr.view(np.uint8).max() > 1:
        raise error("bool bytes must be 0 or 1", field=where)
    return arr.astype(np_dt.newbyteorder("="), copy=False)
