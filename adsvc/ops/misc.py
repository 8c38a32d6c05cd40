"""constant, stop_gradient, cast."""

from __future__ import annotations

import numpy as np

from adsvc.ir.opdef import NONE, ZERO, Attr, OpDef, register
from adsvc.ops import api as A
from adsvc.ops import patterns
from adsvc_protocol import dtypes


def _no_infer(ins, attrs):  # constants are built by ir.node.constant, never by make()
    raise AssertionError("constant nodes carry their own type")


register(OpDef("constant", 0, _no_infer, lambda a: None, derivative=NONE,
               doc="a literal tensor (Node.value)"))

register(OpDef(
    "stop_gradient", 1, lambda ins, a: (ins[0].dtype, ins[0].shape),
    lambda a: (lambda x: x), derivative=ZERO, view=True,
    doc="identity whose derivative is zero (cuts the gradient path)"))


def _cast_kernel(dt):
    return lambda x: np.asarray(x).astype(dt)


def _cast_jvp(node, ts):
    t, = ts
    if t is None or not dtypes.is_float(node.dtype):
        return None
    return A.cast(t, node.dtype)


def _cast_vjp(node, ct):
    x = node.inputs[0]
    return [A.cast(ct, x.dtype) if dtypes.is_float(x.dtype) else None]


register(OpDef(
    "cast", 1, lambda ins, a: (a["dtype"], ins[0].shape),
    lambda a: _cast_kernel(dtypes.to_numpy(a["dtype"])),
    _cast_jvp, _cast_vjp, {"dtype": Attr("dtype", doc="target dtype")},
    doc="convert dtype; derivative passes between float types only",
    sparsity=patterns.elementwise, linear=True))
