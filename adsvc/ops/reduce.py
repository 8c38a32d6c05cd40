"""Reductions over `axes` (absent = all axes) with `keepdims`.

max/min at ties split the derivative evenly among the tied elements. logsumexp is
computed stably (shifted by the max) and handles -inf entries.
"""

from __future__ import annotations

import numpy as np

from adsvc.ir.opdef import Attr, OpDef, register
from adsvc.ops import api as A
from adsvc.ops import patterns
from adsvc.ops.rules import norm_axes, reduced_shape, same_dtype
from adsvc_protocol import dtypes

ATTRS = {"axes": Attr("ints", None, "axes to reduce; absent = all"),
         "keepdims": Attr("bool", False, "keep reduced axes with size 1")}


def _axes(node):
    return norm_axes(node.op, node.attr("axes"), node.inputs[0].ndim)


def _infer(name, allowed, out=None):
    def infer(ins, attrs):
        x, = ins
        dt = same_dtype(name, ins, allowed)
        axes = norm_axes(name, attrs.get("axes"), x.ndim)
        if name in ("max", "min", "logsumexp"):
            for a in axes:
                if x.shape[a] == 0:
                    raise _empty_axis_error(name, x, a)
        return out or dt, reduced_shape(x.shape, axes, attrs["keepdims"])
    return infer


def _empty_axis_error(name, x, a):
    from adsvc_protocol.errors import ShapeError
    return ShapeError(f"op {name!r}: cannot reduce empty axis {a} of shape {list(x.shape)}")


def _kernel(fn):
    def bind(attrs):
        axes = attrs.get("axes")
        axes = None if axes is None else tuple(axes)
        keep = attrs["keepdims"]
        return lambda x: fn(x, axis=axes, keepdims=keep)
    return bind


def _keep(node, v):
    """Reshape a reduced value to the keepdims shape so it broadcasts against the input."""
    x = node.inputs[0]
    target = reduced_shape(x.shape, _axes(node), True)
    return v if v.shape == target else A.reshape(v, target)


def _expand(node, v):
    return A.broadcast_to(_keep(node, v), node.inputs[0].shape)


def _sum_vjp(node, ct):
    return [_expand(node, ct)]


def _sum_jvp(node, ts):
    t, = ts
    return None if t is None else A.sum(t, _axes(node), node.attr("keepdims"))


def _count(node):
    """How many elements each result averages: a number, or, over symbolic axes, a node
    that counts them when the sizes are bound (the sum of ones of those axes)."""
    x = node.inputs[0]
    dims = [x.shape[a] for a in _axes(node)]
    if all(isinstance(d, int) for d in dims):
        return float(np.prod(dims))
    return A.sum(A.ones(tuple(dims), x.dtype))


def _mean_jvp(node, ts):
    t, = ts
    return None if t is None else A.mean(t, _axes(node), node.attr("keepdims"))


def _mean_vjp(node, ct):
    return [_expand(node, A.div(ct, _count(node)))]


def _extremum_weights(node):
    """1/k on each of the k elements equal to the extremum, 0 elsewhere."""
    x = node.inputs[0]
    mask = A.cast(A.eq(x, _expand(node, node)), x.dtype)
    return A.div(mask, _expand(node, A.sum(mask, _axes(node), node.attr("keepdims"))))


def _ext_jvp(node, ts):
    t, = ts
    if t is None:
        return None
    return A.sum(A.mul_or_zero(t, _extremum_weights(node)), _axes(node),
                 node.attr("keepdims"))


def _ext_vjp(node, ct):
    return [A.mul_or_zero(_expand(node, ct), _extremum_weights(node))]


def _logsumexp(x, axis=None, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, np.zeros((), x.dtype))
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def _softmax(node):
    """exp(x - lse) computed as exp(x - m) / sum(exp(x - m)), m = max(x): exact to
    rounding even when |x| is large (exp(x - lse) would amplify the rounding of lse).
    m is held constant: the expression does not depend on it mathematically."""
    x = node.inputs[0]
    axes = _axes(node)
    m = A.stop_gradient(A.max(x, axes, keepdims=True))
    e = A.exp(A.sub(x, m))
    return A.div(e, A.sum(e, axes, keepdims=True))


def _lse_jvp(node, ts):
    t, = ts
    if t is None:
        return None
    return A.sum(A.mul_or_zero(t, _softmax(node)), _axes(node), node.attr("keepdims"))


def _lse_vjp(node, ct):
    return [A.mul_or_zero(_expand(node, ct), _softmax(node))]


NUMERIC = dtypes.FLOATS | dtypes.INTS
register(OpDef("sum", 1, _infer("sum", NUMERIC),
               _kernel(lambda x, axis, keepdims: np.sum(x, axis=axis, keepdims=keepdims,
                                                        dtype=x.dtype)), _sum_jvp, _sum_vjp,
               dict(ATTRS), doc="sum over axes",
               sparsity=patterns.reduction, linear=True))
register(OpDef("mean", 1, _infer("mean", dtypes.FLOATS), _kernel(np.mean), _mean_jvp,
               _mean_vjp, dict(ATTRS), doc="mean over axes",
               sparsity=patterns.reduction, linear=True))
register(OpDef("max", 1, _infer("max", NUMERIC), _kernel(np.max), _ext_jvp, _ext_vjp,
               dict(ATTRS), doc="max over axes; ties share the derivative evenly",
               sparsity=patterns.reduction))
register(OpDef("min", 1, _infer("min", NUMERIC), _kernel(np.min), _ext_jvp, _ext_vjp,
               dict(ATTRS), doc="min over axes; ties share the derivative evenly",
               sparsity=patterns.reduction))
register(OpDef("logsumexp", 1, _infer("logsumexp", dtypes.FLOATS), _kernel(_logsumexp),
               _lse_jvp, _lse_vjp, dict(ATTRS), doc="log(sum(exp(x))) over axes, stable",
               sparsity=patterns.reduction, temporaries=2))  # x - m and exp(x - m)
