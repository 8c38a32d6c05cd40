"""Evaluate's small-call path: a small native tape whose inputs and outputs are all
float64 scalars (the seed example, most scalar models), run from the request's floats
straight to the response's bytes.

The general path turns each feed into an array, checks it against the signature, wraps
every result in a 0-d array and builds a Tensor message per output; for a handful of
numbers that is most of a call's time. Here a request laid out as one answered before
(the SDK writes them so) goes from its bytes to the response's bytes in one C call
(`scalar_vm.small_call`: the bytes outside the doubles compared with the layout's, the
doubles read, the tape run, the outputs written into the response's layout). Other
requests are parsed: the feeds are read as doubles from their raw bytes, the tape runs
on floats (`TapePlan.run_floats`) and the response is packed by a layout kept per
output selection (`adsvc_protocol.scalar_wire`). Only requests the general path would
answer the same way are taken: every input present once as a
float64 0-d tensor in `raw` and no other input, every filtered name an output;
anything else (a missing or extra input, `values`, another dtype or shape, an unknown
name) returns None and goes the general way, which answers or names the error.
"""

from __future__ import annotations

import struct
import threading

import numpy as np

from adsvc.runtime.scalar_vm import small_call
from adsvc.runtime.tape import TapePlan
from adsvc_protocol.scalar_wire import F64, all_scalars, request_layout, response_layout

_DOUBLE = struct.Struct("<d")
LAYOUTS = 8  # output selections kept per entry (a client sends one or two)


def _int32s(values) -> bytes:
    return np.asarray(values, dtype=np.int32).tobytes()


class ScalarPath:
    """The small-call path of one compiled entry (see the module docstring)."""

    def __init__(self, handle: str, plan: TapePlan):
        self.handle, self.plan = handle, plan
        self.inputs = list(plan.inputs)
        self.index = {name: i for i, name in enumerate(plan.output_names)}
        self._layouts: dict[tuple, tuple] = {}  # output_filter -> (response, positions)
        # (request layout, response layout, positions) of each selection seen: requests
        # written so (by the SDK) are read from their bytes (`read`), without parsing
        self._known: tuple = ()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, entry) -> ScalarPath | None:
        """The path of a cache entry, or None when its plan is not such a tape."""
        plan = entry.plan
        if not (isinstance(plan, TapePlan) and plan.floats_only
                and all_scalars(plan.inputs) and all_scalars(plan.outputs_sig)):
            return None
        return cls(entry.handle, plan)

    def read(self, data: bytes) -> bytes | None:
        """The EvaluateResponse bytes for request bytes laid out as a request `evaluate`
        answered before (this handle, these inputs in order, as `raw`, the same
        output_filter), or None."""
        for layouts in self._known:
            out = small_call(self.plan.native, *layouts, data)
            if out is not None:
                return out
        return None

    def evaluate(self, request) -> bytes | None:
        """The EvaluateResponse bytes for a parsed EvaluateRequest, or None (see the
        module docstring)."""
        feeds = request.inputs
        if len(feeds) != len(self.inputs):
            return None
        values = []
        for name in self.inputs:
            t = feeds.get(name)
            if t is None or t.dtype != F64 or t.dims or t.values:
                return None
            raw = t.raw
            if len(raw) != 8:
                return None
            values.append(_DOUBLE.unpack(raw)[0])
        picked = self._layout(tuple(request.output_filter))
        if picked is None:
            return None
        layout, which = picked
        out = self.plan.run_floats(values)
        return layout.pack([out[i] for i in which])

    def _layout(self, wanted: tuple) -> tuple | None:
        """(layout, output positions) of an output selection (empty: every output)."""
        found = self._layouts.get(wanted)
        if found is None:
            names = list(dict.fromkeys(wanted)) if wanted else list(self.index)
            if any(n not in self.index for n in names):
                return None
            response = response_layout(self.handle, names)
            found = (response, [self.index[n] for n in names])
            request = request_layout(self.handle, self.inputs, wanted)
            native = (request.template, _int32s(request.offsets), response.template,
                      _int32s(response.offsets), _int32s(found[1]))
            with self._lock:
                if wanted in self._layouts:  # (another call added it meanwhile)
                    return self._layouts[wanted]
                if len(self._layouts) >= LAYOUTS:
                    self._layouts.clear()
                    self._known = ()
                self._layouts[wanted] = found
                self._known = (*self._known, native)
        return found
