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
import threading
from collections import OrderedDict

import numpy as np

from adsvc_protocol import dtypes

MIN_BYTES = 1 << 18  # smaller allocations are cheap (the allocator's heap)
PER_KEY = 2
SPARE_BYTES = 1 << 26  # what the process keeps between runs (`Spares`)


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


class Spares:
    """The arrays runs left in their pools, kept (at most SPARE_BYTES in all; the shapes
    kept longest ago make room for newer ones) for the next runs of any plan: without
    them every run's first large results are mapped and faulted afresh. Thread-safe;
    `clear()` hands them back (the server does once calls pause, with its heap trim)."""

    def __init__(self, limit: int = SPARE_BYTES):
        self.limit, self.bytes = limit, 0
        self._arrays: OrderedDict[tuple, list[np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: tuple) -> np.ndarray | None:
        """A kept array of `key`'s shape and dtype, or None."""
        with self._lock:
            arrays = self._arrays.get(key)
            if not arrays:
                return None
            a = arrays.pop()
            self.bytes -= a.nbytes
            return a

    def keep(self, key: tuple, arrays: list[np.ndarray]) -> None:
        """Keep what fits of `arrays` (each seen only by the pool that gives them)."""
        with self._lock:
            mine = self._arrays.pop(key, [])
            self._arrays[key] = mine  # the newest shape
            for a in arrays:
                if len(mine) >= PER_KEY or a.nbytes > self.limit:
                    break
                while self.bytes + a.nbytes > self.limit:  # the oldest shape's go first
                    old = next(iter(self._arrays.values()))
                    if old is mine:
                        return
                    if old:
                        self.bytes -= old.pop().nbytes
                    else:
                        self._arrays.popitem(last=False)
                mine.append(a)
                self.bytes += a.nbytes

    def clear(self) -> None:
        """Drop every kept array."""
        with self._lock:
            self._arrays.clear()
            self.bytes = 0


SPARES = Spares()


class BufferPool:
    """Freed arrays by (shape, dtype), for one run of a plan (topped up from, and
    handed back to, the process's `SPARES`)."""

    def __init__(self):
        self.free: dict[tuple, list[np.ndarray]] = {}

    def take(self, key: tuple) -> np.ndarray | None:
        """A freed array of `key`'s shape and dtype, or None."""
        arrays = self.free.get(key)
        return arrays.pop() if arrays else SPARES.take(key)

    def close(self) -> None:
        """The run is over: its unused arrays become spares."""
        for key, arrays in self.free.items():
            if arrays:
                SPARES.keep(key, arrays)
        self.free = {}

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
