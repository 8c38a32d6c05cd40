"""The five element types of the IR and their numpy equivalents."""

from __future__ import annotations

import numpy as np

FLOAT64, FLOAT32, INT64, INT32, BOOL = "float64", "float32", "int64", "int32", "bool"
DTYPES = (FLOAT64, FLOAT32, INT64, INT32, BOOL)
FLOATS = frozenset({FLOAT64, FLOAT32})
INTS = frozenset({INT64, INT32})

_NP = {d: np.dtype(d) for d in DTYPES}
_LITTLE = {d: t.newbyteorder("<") for d, t in _NP.items()}


def to_numpy(dtype: str) -> np.dtype:
    """The little-endian numpy dtype of an IR dtype name."""
    return _LITTLE[dtype]


def from_numpy(dt) -> str:
    """The IR dtype name of a numpy dtype; ValueError if it has none."""
    name = np.dtype(dt).name
    if name not in _NP:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
    return name


def is_float(dtype: str) -> bool:
    """True for float64 and float32, the dtypes that have derivatives."""
    return dtype in FLOATS
