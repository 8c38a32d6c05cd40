"""Checking and converting a caller's input values against a graph's declared inputs:
the one rule used by the evaluator, the SDK (before encoding) and the CLI."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from adsvc_protocol import dims, dtypes
from adsvc_protocol.errors import InputError

TypeSig = tuple[str, tuple[int, ...]]  # (dtype, shape)


def convert_feed(name: str, value, dtype: str, shape: tuple[int, ...],
                 field: str | None = None) -> np.ndarray:
    """`value` as an array of the declared dtype and shape, or InputError naming it.

    Python numbers and (nested) lists are converted to the declared dtype and must be
    exact for integer and bool inputs; numpy arrays must have a dtype of the same kind
    (an int64 array may feed a float input; a float array may not feed an int input)
    and integer values must fit. Shapes must match exactly.
    """
    want = dtypes.to_numpy(dtype)
    # the common cases, without the general checks (same results): a Python float for a
    # float scalar; an array that already has the declared dtype and shape
    if type(value) is float and want.kind == "f" and shape == ():
        return np.asarray(value, dtype=want)
    if type(value) is np.ndarray and value.dtype == want and value.shape == tuple(shape):
        return value
    field = field or f"inputs.{name}"
    with np.errstate(all="ignore"):  # a lossy cast is reported as an InputError, not warned
        if isinstance(value, (np.ndarray, np.generic)):
            arr = _from_array(name, value, dtype, want, field)
        else:
            arr = _from_python(name, value, dtype, want, field)
    if arr.shape != tuple(shape):
        raise InputError(f"input {name!r} has shape {list(arr.shape)}, expected "
                         f"{list(shape)}", field=field)
    return arr


def _from_array(name, v, dtype, want, field) -> np.ndarray:
    if v.dtype != want and not np.can_cast(v.dtype, want, "same_kind"):
        raise InputError(f"input {name!r} has dtype {v.dtype}, expected {dtype}", field=field)
    if want.kind in "iu" and v.dtype != want and np.size(v):
        info = np.iinfo(want)
        if np.min(v) < info.min or np.max(v) > info.max:
            raise InputError(f"input {name!r}: values out of range for {dtype}", field=field)
    return np.asarray(v, dtype=want)


def _from_python(name, v, dtype, want, field) -> np.ndarray:
    try:
        raw = np.asarray(v)
        if raw.dtype.kind not in "biuf":
            raise TypeError(f"got {type(v).__name__} values that are not numbers "
                            "(or do not fit in 64 bits)")
        arr = raw.astype(want)
        exact = want.kind == "f" or np.array_equal(raw, arr)
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError(f"input {name!r} is not a {dtype} array: {e}", field=field) from None
    if not exact:
        raise InputError(f"input {name!r}: values are not exact {dtype}", field=field)
    return arr


def check_feeds(signature: Mapping[str, TypeSig], feeds: Mapping[str, object],
                prefix: str = "") -> list[np.ndarray]:
    """Arrays for every input of `signature` ({name: (dtype, shape)}, in order), or
    InputError naming the missing, unknown or ill-typed input (field `prefix` +
    ``inputs.<name>``)."""
    unknown = sorted(set(feeds) - set(signature))
    if unknown:
        raise InputError(f"unknown input {unknown[0]!r}; the graph's inputs are: "
                         + ", ".join(sorted(signature)), field=f"{prefix}inputs.{unknown[0]}")
    if any(dims.is_symbolic(shape) for _, shape in signature.values()):
        signature = _bound(signature, feeds, prefix)
    out = []
    for name, (dtype, shape) in signature.items():
        if name not in feeds:
            raise InputError(f"missing input {name!r} ({dtype}[{', '.join(map(str, shape))}])",
                             field=f"{prefix}inputs.{name}")
        out.append(convert_feed(name, feeds[name], dtype, shape, f"{prefix}inputs.{name}"))
    return out


def _bound(signature: Mapping[str, TypeSig], feeds: Mapping[str, object],
           prefix: str) -> dict[str, TypeSig]:
    """`signature` with its symbolic dimensions bound by the shapes of `feeds` (inputs
    whose symbols no feed binds keep them: they are missing)."""
    try:
        binding = dims.bind(signature, {k: np.shape(v) for k, v in feeds.items()
                                        if k in signature})
    except InputError as e:
        raise InputError(e.description, field=prefix + e.field) from None
    out = {}
    for name, (dtype, shape) in signature.items():
        syms = {s for d in shape if isinstance(d, dims.Dim) for s in d.symbols}
        out[name] = (dtype, dims.concrete(shape, binding) if syms <= set(binding) else shape)
    return out
