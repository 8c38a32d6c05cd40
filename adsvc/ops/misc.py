"""constant, stop_gradient, cast, element (one result of a node with several)."""

from __future__ import annotations

import numpy as np

from adsvc.ir.opdef import NONE, TUPLE, ZERO, Attr, OpDef, register
from adsvc.ops import api as A
from adsvc.ops import patterns
from adsvc_protocol import dtypes
from adsvc_protocol.errors import AttributeError_, DTypeError


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


def _element_infer(ins, attrs):
    t, = ins
    if t.dtype != TUPLE:
        raise DTypeError(f"op 'element' reads a result of a node with several results "
                         f"(a loop or a branch), got {t.dtype}{list(t.shape)}")
    i = attrs["index"]
    if not 0 <= i < len(t.types):
        raise AttributeError_(f"op 'element': index {i} out of range: the {t.op} node has "
                              f"{len(t.types)} results")
    return t.types[i]


def _element_jvp(node, ts):
    t, = ts
    return None if t is None else t[node.attr("index")]


def _element_vjp(node, ct):
    n = len(node.inputs[0].types)
    i = node.attr("index")
    return [tuple(ct if j == i else None for j in range(n))]


register(OpDef(
    "element", 1, _element_infer, lambda a: (lambda t, i=a["index"]: t[i]),
    _element_jvp, _element_vjp, {"index": Attr("int", doc="which result, from 0")},
    view=True, linear=True,
    doc="one result of a node with several results (scan, while_loop, cond)"))
