"""Reusing the buffers of freed values as the `out=` of later steps.

A plan frees each value after its last use. For large values (at least MIN_BYTES) the
allocator hands that memory back to the system and the next large result is mapped
afresh: every page faults and is zeroed again, which costs several times the arithmetic
of an elementwise op (a chain of four 8 MB ops: 14 ms fresh, 2.9 ms into reused
buffers). So a plan keeps a freed array whose shape and dtype a later step produces
and passes it as that step's `out=` (numpy ufuncs; kernels marked `accepts_out`).

An array is reused only when nothing else can see it: a base array (not a view), owned,
writeable, C-contiguous, and referenced by nothing but the plan's slot (a view of it
held elsewhere, a caller's reference, an output: all keep it out). At most PER_KEY
arrays of one shape are kept, so the pool adds at most that many values to the plan's
planned peak of live bytes.
"""

from __future__ import annotations

import sys

import numpy as np

from adsvc_protocol import dtypes

MIN_BYTES = 1 << 18  # smaller allocations are cheap (the allocator's heap)
PER_KEY = 2


def out_key(fn, node) -> tuple | None:
    """(shape, dtype) of the buffer a step could write into, or None: its kernel takes
    no `out=`, its result is small, or its shape is not fixed."""
    if not (isinstance(fn, np.ufunc) and fn.nout == 1) and not getattr(fn, "accepts_out",
                                                                       False):
        return None
    if node.types is not None or not all(isinstance(d, int) for d in node.shape):
        return None
    dtype = np.dtype(dtypes.to_numpy(node.dtype))
    if dtype.itemsize * int(np.prod(node.shape, dtype=np.int64)) < MIN_BYTES:
        return None
    return tuple(node.shape), dtype


class BufferPool:
    """Freed arrays by (shape, dtype), for one run of a plan."""

    def __init__(self):
        self.free: dict[tuple, list[np.ndarray]] = {}

    def take(self, key: tuple) -> np.ndarray | None:
        """A freed array of `key`'s shape and dtype, or None."""
        arrays = self.free.get(key)
        return arrays.pop() if arrays else None

    def give(self, key: tuple, vals: list, slot: int) -> None:
        """Free `vals[slot]`; keep its array for reuse if nothing else can see it."""
        v = vals[slot]
        vals[slot] = None
        if (type(v) is not np.ndarray or sys.getrefcount(v) != 2 or not v.flags.owndata
                or not v.flags.writeable or not v.flags.c_contiguous
                or v.shape != key[0] or v.dtype != key[1]):
            return
        arrays = self.free.setdefault(key, [])
        if len(arrays) < PER_KEY:
            arrays.append(v)
