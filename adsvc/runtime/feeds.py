"""Checking and converting the caller's input values against a graph's declared inputs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from adsvc_protocol import dtypes
from adsvc_protocol.errors import InputError


def check_feeds(inputs, feeds: Mapping[str, object]) -> list[np.ndarray]:
    """Arrays for `inputs` (nodes with name/dtype/shape) in order, or InputError.

    Python numbers and lists are converted to the declared dtype; numpy arrays must have
    a dtype of the same kind (an int64 array may feed a float input; a float array may
    not feed an int input). Shapes must match exactly.
    """
    declared = {n.name for n in inputs}
    unknown = sorted(set(feeds) - declared)
    if unknown:
        raise InputError(f"unknown input {unknown[0]!r}; the graph's inputs are: "
                         + ", ".join(sorted(declared)), field=f"inputs.{unknown[0]}")
    out = []
    for n in inputs:
        if n.name not in feeds:
            raise InputError(f"missing input {n.name!r} ({n.dtype}{list(n.shape)})",
                             field=f"inputs.{n.name}")
        v = feeds[n.name]
        want = dtypes.to_numpy(n.dtype)
        if isinstance(v, (np.ndarray, np.generic)):
            if v.dtype != want and not np.can_cast(v.dtype, want, "same_kind"):
                raise InputError(f"input {n.name!r} has dtype {v.dtype}, expected {n.dtype}",
                                 field=f"inputs.{n.name}")
            if want.kind in "iu" and v.dtype != want and np.size(v):
                info = np.iinfo(want)
                if np.min(v) < info.min or np.max(v) > info.max:
                    raise InputError(f"input {n.name!r}: values out of range for {n.dtype}",
                                     field=f"inputs.{n.name}")
            arr = np.asarray(v, dtype=want)
        else:  # Python numbers / (nested) lists
            try:
                raw = np.asarray(v)
                if raw.dtype.kind not in "biuf":
                    raise TypeError(f"got {type(v).__name__} values that are not numbers "
                                    "(or do not fit in 64 bits)")
                arr = raw.astype(want)
                exact = want.kind == "f" or np.array_equal(raw, arr)
            except (TypeError, ValueError, OverflowError) as e:
                raise InputError(f"input {n.name!r} is not a {n.dtype} array: {e}",
                                 field=f"inputs.{n.name}") from None
            if not exact:
                raise InputError(f"input {n.name!r}: values are not exact {n.dtype}",
                                 field=f"inputs.{n.name}")
        if arr.shape != n.shape:
            raise InputError(f"input {n.name!r} has shape {list(arr.shape)}, expected "
                             f"{list(n.shape)}", field=f"inputs.{n.name}")
        out.append(arr)
    return out
