"""Shape ops: reshape, transpose, broadcast_to, concat, slice, pad, take, scatter_add,
matmul. All are linear in their float operands, so their rules are plain linear maps."""

from __future__ import annotations

import builtins
import math

import numpy as np

from adsvc.ir.opdef import BILINEAR, Attr, OpDef, register
from adsvc.ops import api as A
from adsvc.ops import patterns
from adsvc.ops.rules import broadcast_shapes, norm_axis, same_dtype
from adsvc_protocol import dtypes
from adsvc_protocol.dims import Dim, check_le, known_le
from adsvc_protocol.errors import AttributeError_, DTypeError, ShapeError


def _linear(op_fn):
    """JVP of an op linear in its first operand: apply the op to the tangent."""
    def jvp(node, ts):
        t = ts[0]
        return None if t is None else op_fn(node, t)
    return jvp


# -- reshape ---------------------------------------------------------------------------
def _reshape_infer(ins, attrs):
    x, = ins
    shape = list(attrs["shape"])
    fixed = [d for d in shape if isinstance(d, int)]
    if shape.count(-1) > 1 or builtins.any(d < -1 for d in fixed):
        raise AttributeError_(f"op 'reshape': bad target shape {shape}")
    known = math.prod(d for d in shape if not isinstance(d, int) or d != -1)
    if -1 in shape:
        if not isinstance(x.size, int) or not isinstance(known, int):
            rest = Dim.divide(x.size, known) if isinstance(x.size, Dim) else None
            if rest is None:
                raise ShapeError(f"op 'reshape': cannot reshape {list(x.shape)} to {shape}: "
                                 "the -1 is not an exact quotient of the symbolic sizes")
            shape[shape.index(-1)] = rest
            return x.dtype, tuple(shape)
        if known == 0 or x.size % known:
            raise ShapeError(f"op 'reshape': cannot reshape {list(x.shape)} to {shape}")
        shape[shape.index(-1)] = x.size // known
    elif known != x.size:
        raise ShapeError(f"op 'reshape': cannot reshape {list(x.shape)} "
                         f"({x.size} elements) to {shape}")
    return x.dtype, tuple(shape)


register(OpDef(
    "reshape", 1, _reshape_infer,
    lambda a: (lambda x, s=tuple(a["shape"]): np.reshape(x, s)),
    _linear(lambda n, t: A.reshape(t, n.shape)),
    lambda n, ct: [A.reshape(ct, n.inputs[0].shape)],
    {"shape": Attr("ints", doc="target shape; one entry may be -1")},
    doc="row-major reshape",  # a view when numpy can, a copy otherwise: counted as a copy
    sparsity=patterns.index_map, linear=True))


# -- transpose -------------------------------------------------------------------------
def _transpose_infer(ins, attrs):
    x, = ins
    perm = attrs["perm"]
    if sorted(perm) != list(range(x.ndim)):
        raise AttributeError_(f"op 'transpose': perm {list(perm)} is not a permutation "
                              f"of the {x.ndim} axes of {list(x.shape)}")
    return x.dtype, tuple(x.shape[p] for p in perm)


register(OpDef(
    "transpose", 1, _transpose_infer,
    lambda a: (lambda x, p=tuple(a["perm"]): np.transpose(x, p)),
    _linear(lambda n, t: A.transpose(t, n.attr("perm"))),
    lambda n, ct: [A.transpose(ct, np.argsort(n.attr("perm")).tolist())],
    {"perm": Attr("ints", doc="output axis i is input axis perm[i]")},
    doc="permute axes", view=True, sparsity=patterns.index_map, linear=True))


# -- broadcast_to ------------------------------------------------------------------------
def _bcast_infer(ins, attrs):
    x, = ins
    shape = tuple(attrs["shape"])
    if len(shape) < x.ndim or broadcast_shapes("broadcast_to", x.shape, shape) != shape:
        raise ShapeError(f"op 'broadcast_to': cannot broadcast {list(x.shape)} to {list(shape)}")
    return x.dtype, shape


register(OpDef(
    "broadcast_to", 1, _bcast_infer,
    lambda a: (lambda x, s=tuple(a["shape"]): np.broadcast_to(x, s)),
    _linear(lambda n, t: A.broadcast_to(t, n.shape)),
    lambda n, ct: [A.unbroadcast(ct, n.inputs[0].shape)],
    {"shape": Attr("ints", doc="target shape (numpy broadcasting)")},
    doc="broadcast to a shape", view=True, sparsity=patterns.index_map, linear=True))


# -- concat ----------------------------------------------------------------------------
def _concat_infer(ins, attrs):
    dt = same_dtype("concat", ins)
    first = ins[0]
    if first.ndim == 0:
        raise ShapeError("op 'concat': operands must have rank >= 1")
    axis = norm_axis("concat", attrs["axis"], first.ndim)
    for x in ins[1:]:
        if x.ndim != first.ndim or builtins.any(
                d != e for i, (d, e) in enumerate(zip(x.shape, first.shape)) if i != axis):
            raise ShapeError("op 'concat': shapes " + ", ".join(str(list(n.shape)) for n in ins)
                             + f" differ outside axis {axis}")
    shape = list(first.shape)
    shape[axis] = builtins.sum(x.shape[axis] for x in ins)
    return dt, tuple(shape)


def _concat_jvp(node, ts):
    if builtins.all(t is None for t in ts):
        return None
    ts = [A.zeros_like(x) if t is None else t for x, t in zip(node.inputs, ts)]
    return A.concat(ts, node.attr("axis"))


def _concat_vjp(node, ct):
    axis = norm_axis("concat", node.attr("axis"), node.ndim)
    out, start = [], 0
    for x in node.inputs:
        stop = start + x.shape[axis]
        starts = [0] * node.ndim
        stops = list(node.shape)
        starts[axis], stops[axis] = start, stop
        out.append(A.slice(ct, starts, stops))
        start = stop
    return out


register(OpDef(
    "concat", None, _concat_infer,
    lambda a: (lambda *xs, ax=a["axis"]: np.concatenate(xs, axis=ax)),
    _concat_jvp, _concat_vjp, {"axis": Attr("int", 0)},
    doc="join operands along an axis", sparsity=patterns.index_map, linear=True))


# -- slice and pad -----------------------------------------------------------------------
def _per_axis(op, attrs, key, ndim, default):
    v = attrs.get(key)
    if v is None:
        return [default] * ndim
    if len(v) != ndim:
        raise AttributeError_(f"op {op!r}: attribute {key!r} needs {ndim} entries, got {len(v)}")
    return list(v)


def _slice_params(x, attrs):
    starts = _per_axis("slice", attrs, "starts", x.ndim, 0)
    stops = _per_axis("slice", attrs, "stops", x.ndim, 0)
    steps = _per_axis("slice", attrs, "steps", x.ndim, 1)
    for ax, (a, b, s, d) in enumerate(zip(starts, stops, steps, x.shape)):
        def bad(ax=ax, a=a, b=b, s=s, d=d):
            return AttributeError_(
                f"op 'slice': axis {ax}: need 0 <= start <= stop <= {d} and step >= 1, "
                f"got start={a} stop={b} step={s}")
        if not isinstance(s, int) or s < 1:
            raise bad()
        for lo, hi in ((0, a), (a, b), (b, d)):  # symbolic: checked again once bound
            check_le(lo, hi, bad)
    return starts, stops, steps


def _slice_len(a, b, s):
    if isinstance(a, int) and isinstance(b, int):
        return len(range(a, b, s))
    if s == 1:
        return b - a
    n = (b - a + s - 1).divide(s) if not isinstance(b - a + s - 1, int) else None
    if n is None:
        raise ShapeError(f"op 'slice': a step of {s} over {b - a} symbolic elements has no "
                         "exact length; slice with step 1 or bind the size first")
    return n


def _slice_infer(ins, attrs):
    x, = ins
    starts, stops, steps = _slice_params(x, attrs)
    return x.dtype, tuple(_slice_len(a, b, s) for a, b, s in zip(starts, stops, steps))


def _slice_kernel(attrs):
    def bind(x):
        idx = tuple(builtins.slice(a, b, s) for a, b, s in zip(
            attrs["starts"], attrs["stops"], attrs.get("steps") or [1] * len(attrs["starts"])))
        return x[idx]
    return bind


def _slice_vjp(node, ct):
    x = node.inputs[0]
    starts, _, steps = _slice_params(x, dict(node.attrs))
    if isinstance(node.size, int) and node.size == 0:
        return [A.zeros_like(x)]
    low, high, interior = [], [], []
    for a, s, m, d in zip(starts, steps, node.shape, x.shape):
        low.append(a)
        interior.append(s - 1)
        high.append(d - (a + (m - 1) * s + 1))
    return [A.pad(ct, low, high, interior)]


register(OpDef(
    "slice", 1, _slice_infer, _slice_kernel,
    _linear(lambda n, t: A.slice(t, n.attr("starts"), n.attr("stops"), n.attr("steps"))),
    _slice_vjp,
    {"starts": Attr("ints", doc="first index per axis"),
     "stops": Attr("ints", doc="end index (exclusive) per axis"),
     "steps": Attr("ints", None, doc="stride per axis (>= 1); absent = 1")},
    doc="strided slice x[start:stop:step] on every axis", view=True,
    sparsity=patterns.index_map, linear=True))


def _pad_params(x, attrs):
    low = _per_axis("pad", attrs, "low", x.ndim, 0)
    high = _per_axis("pad", attrs, "high", x.ndim, 0)
    interior = _per_axis("pad", attrs, "interior", x.ndim, 0)
    for v in low + high + interior:
        check_le(0, v, lambda: AttributeError_("op 'pad': low, high and interior must be "
                                               ">= 0"))
    return low, high, interior


def _pad_infer(ins, attrs):
    x, = ins
    low, high, interior = _pad_params(x, attrs)
    shape = tuple(lo + hi + (d + (d - 1) * i if not isinstance(d, int) or d else 0)
                  for lo, hi, i, d in zip(low, high, interior, x.shape))
    return x.dtype, shape


def _pad_index(x, low, interior) -> tuple:
    """Where the operand `x` lands in its padded result (one slice per axis)."""
    return tuple(builtins.slice(lo, lo + (d - 1) * (i + 1) + 1 if d else lo, i + 1)
                 for lo, i, d in zip(low, interior, x.shape))


def pad_index(node) -> tuple:
    """The same for a pad node (its operand's shape and its attributes)."""
    x = node.inputs[0]
    low, _, interior = _pad_params(x, dict(node.attrs))
    return _pad_index(x, low, interior)


def _pad_kernel(attrs):
    def bind(x):
        low, high, interior = _pad_params(x, attrs)
        shape = tuple(lo + hi + (d + (d - 1) * i if d else 0)
                      for lo, hi, i, d in zip(low, high, interior, x.shape))
        out = np.zeros(shape, dtype=x.dtype)
        out[_pad_index(x, low, interior)] = x
        return out
    return bind


def _pad_vjp(node, ct):
    x = node.inputs[0]
    low, _, interior = _pad_params(x, dict(node.attrs))
    stops = [lo + (d - 1) * (i + 1) + 1 if not isinstance(d, int) or d else lo
             for lo, i, d in zip(low, interior, x.shape)]
    return [A.slice(ct, low, stops, [i + 1 for i in interior])]


register(OpDef(
    "pad", 1, _pad_infer, _pad_kernel,
    _linear(lambda n, t: A.pad(t, n.attr("low"), n.attr("high"), n.attr("interior"))),
    _pad_vjp,
    {"low": Attr("ints", doc="zeros before each axis"),
     "high": Attr("ints", doc="zeros after each axis"),
     "interior": Attr("ints", None, doc="zeros between elements per axis; absent = 0")},
    doc="zero padding (the transpose of slice)", sparsity=patterns.index_map, linear=True))


# -- take and scatter_add ----------------------------------------------------------------
def _indices_check(op, idx):
    if idx.dtype not in dtypes.INTS:
        raise DTypeError(f"op {op!r}: indices must be int32 or int64, got {idx.dtype}")


def _take_infer(ins, attrs):
    x, idx = ins
    _indices_check("take", idx)
    if x.ndim == 0:
        raise ShapeError("op 'take': operand must have rank >= 1")
    axis = norm_axis("take", attrs["axis"], x.ndim)
    return x.dtype, x.shape[:axis] + idx.shape + x.shape[axis + 1:]


def _take_kernel(attrs):
    def bind(x, idx, ax=attrs["axis"]):
        return np.take(x, idx, axis=ax)  # raises IndexError when out of range
    return bind


def _take_vjp(node, ct):
    x, idx = node.inputs
    axis = norm_axis("take", node.attr("axis"), x.ndim)
    return [A.scatter_add(ct, idx, axis, x.shape[axis]), None]


register(OpDef(
    "take", 2, _take_infer, _take_kernel,
    _linear(lambda n, t: A.take(t, n.inputs[1], n.attr("axis"))), _take_vjp,
    {"axis": Attr("int", 0)},
    doc="gather x[..., indices, ...] along axis (indices in [-n, n))",
    sparsity=patterns.gather, linear=True))


def _scatter_infer(ins, attrs):
    u, idx = ins
    _indices_check("scatter_add", idx)
    axis, size = attrs["axis"], attrs["size"]
    if known_le(0, size) is False or not 0 <= axis <= u.ndim - idx.ndim:
        raise AttributeError_(f"op 'scatter_add': bad axis {axis} / size {size} for updates "
                              f"{list(u.shape)} and indices {list(idx.shape)}")
    if u.shape[axis:axis + idx.ndim] != idx.shape:
        raise ShapeError(f"op 'scatter_add': updates {list(u.shape)} do not have indices' "
                         f"shape {list(idx.shape)} at axis {axis}")
    return u.dtype, u.shape[:axis] + (size,) + u.shape[axis + idx.ndim:]


def _scatter_kernel(attrs):
    axis, size = attrs["axis"], attrs["size"]

    def bind(u, idx):
        k = idx.ndim
        out_shape = u.shape[:axis] + (size,) + u.shape[axis + k:]
        out = np.zeros(out_shape, dtype=u.dtype)
        moved = np.moveaxis(out, axis, 0)
        flat_u = np.moveaxis(u.reshape(u.shape[:axis] + (idx.size,) + u.shape[axis + k:]),
                             axis, 0)
        np.add.at(moved, idx.reshape(-1), flat_u)
        return out
    return bind


register(OpDef(
    "scatter_add", 2, _scatter_infer, _scatter_kernel,
    _linear(lambda n, t: A.scatter_add(t, n.inputs[1], n.attr("axis"), n.attr("size"))),
    lambda n, ct: [A.take(ct, n.inputs[1], n.attr("axis")), None],
    {"axis": Attr("int"), "size": Attr("int", doc="length of the result along axis")},
    doc="zeros of the result shape with updates added at indices along axis (take's VJP)",
    # temporaries: the updates reshaped (copied when they are a broadcast)
    sparsity=patterns.scatter, temporaries=1, linear=True))


# -- matmul ----------------------------------------------------------------------------
def _matmul_infer(ins, attrs):
    a, b = ins
    dt = same_dtype("matmul", ins, dtypes.FLOATS | dtypes.INTS)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"op 'matmul': operands must have rank >= 1, got {list(a.shape)} "
                         f"and {list(b.shape)}")
    ka = a.shape[-1]
    kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if ka != kb:
        raise ShapeError(f"op 'matmul': contraction sizes differ: {list(a.shape)} @ "
                         f"{list(b.shape)} ({ka} != {kb})")
    batch = broadcast_shapes("matmul", a.shape[:-2], b.shape[:-2])
    shape = batch + (a.shape[-2:-1] if a.ndim >= 2 else ()) + (b.shape[-1:] if b.ndim >= 2 else ())
    return dt, shape


def _matmul_jvp(node, ts):
    a, b = node.inputs
    ta, tb = ts
    return A.add_any(None if ta is None else A.matmul(ta, b),
                     None if tb is None else A.matmul(a, tb))


def _matmul_vjp(node, ct):
    a, b = node.inputs
    a2 = A.reshape(a, (1, a.shape[0])) if a.ndim == 1 else a
    b2 = A.reshape(b, (b.shape[0], 1)) if b.ndim == 1 else b
    out2 = A.matmul(a2, b2).shape if (a.ndim == 1 or b.ndim == 1) else node.shape
    ct2 = A.reshape(ct, out2) if ct.shape != out2 else ct
    da = A.unbroadcast(A.matmul(ct2, A.swap_last(b2)), a2.shape)
    db = A.unbroadcast(A.matmul(A.swap_last(a2), ct2), b2.shape)
    return [A.reshape(da, a.shape) if da.shape != a.shape else da,
            A.reshape(db, b.shape) if db.shape != b.shape else db]


INT_MATMUL_SLOWDOWN = 16  # no BLAS for integers: measured 14x slower than float64


def _matmul_flops(node) -> int:
    """2·m·k·n per batch element: the contraction dimension times the result's size (in
    float-BLAS flops: integer products are charged INT_MATMUL_SLOWDOWN times more)."""
    flops = 2 * node.inputs[0].shape[-1] * max(node.size, 1)
    return flops if dtypes.is_float(node.dtype) else flops * INT_MATMUL_SLOWDOWN


register(OpDef("matmul", 2, _matmul_infer, lambda a: np.matmul, _matmul_jvp, _matmul_vjp,
               doc="matrix product with numpy semantics (batch broadcasting, 1-D operands)",
               flops=_matmul_flops, sparsity=patterns.matmul, linear=BILINEAR))
