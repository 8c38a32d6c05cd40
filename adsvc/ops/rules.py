"""Shared shape/dtype rule helpers for op declarations."""

from __future__ import annotations

from adsvc_protocol import dtypes
from adsvc_protocol.errors import AttributeError_, DTypeError, ShapeError


def _desc(nodes) -> str:
    return ", ".join(f"{n.dtype}{list(n.shape)}" for n in nodes)


def broadcast_shapes(op: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    """numpy broadcasting of shapes, or ShapeError naming them."""
    nd = max(len(s) for s in shapes)
    out = []
    for i in range(nd):
        dims = {s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0} - {1}
        if len(dims) > 1:
            raise ShapeError(f"op {op!r}: shapes {', '.join(str(list(s)) for s in shapes)} "
                             "do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def same_dtype(op: str, nodes, allowed=dtypes.DTYPES) -> str:
    """The one dtype of all of `nodes`; DTypeError if they differ or it is not `allowed`."""
    dts = {n.dtype for n in nodes}
    if len(dts) != 1:
        raise DTypeError(f"op {op!r}: operand dtypes differ ({_desc(nodes)}); use cast")
    dt = dts.pop()
    if dt not in allowed:
        raise DTypeError(f"op {op!r}: dtype {dt} not supported "
                         f"(allowed: {', '.join(sorted(allowed))})")
    return dt


def float_unary(op):
    """The shape rule of a one-operand float op: the operand's dtype and shape."""
    def infer(ins, attrs):
        x, = ins
        same_dtype(op, ins, dtypes.FLOATS)
        return x.dtype, x.shape
    return infer


def numeric_unary(op):
    """The shape rule of a one-operand float or integer op: the operand's dtype and
    shape."""
    def infer(ins, attrs):
        x, = ins
        same_dtype(op, ins, dtypes.FLOATS | dtypes.INTS)
        return x.dtype, x.shape
    return infer


def binary(op, allowed, out_dtype=None):
    """The shape rule of an elementwise op on operands of one `allowed` dtype: the
    broadcast shape, and `out_dtype` if given (comparisons: bool) or the operands' dtype."""
    def infer(ins, attrs):
        dt = same_dtype(op, ins, allowed)
        return out_dtype or dt, broadcast_shapes(op, *(n.shape for n in ins))
    return infer


def norm_axes(op: str, axes, ndim: int) -> tuple[int, ...]:
    """Normalize an `axes` attribute (None = all axes; negatives count from the end)."""
    if axes is None:
        return tuple(range(ndim))
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise AttributeError_(f"op {op!r}: axis {a} out of range for rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise AttributeError_(f"op {op!r}: repeated axis in {list(axes)}")
    return tuple(sorted(out))


def norm_axis(op: str, axis: int, ndim: int) -> int:
    """`axis` as an index in 0..ndim-1 (negatives count from the end); AttributeError_
    if out of range."""
    if not -ndim <= axis < ndim:
        raise AttributeError_(f"op {op!r}: axis {axis} out of range for rank {ndim}")
    return axis % ndim


def reduced_shape(shape, axes, keepdims) -> tuple[int, ...]:
    """`shape` after reducing `axes` (normalized, see `norm_axes`): dropped, or kept
    with size 1 if `keepdims`."""
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)
