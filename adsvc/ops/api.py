"""Graph-building functions, one per op, plus composites and Node operator overloads.

Derivative rules, the tracer and users all build graphs through these functions.
Python numbers are lifted to constants of the other operand's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adsvc.ir.node import Node, constant, make


def lift(v, like: Node | None = None) -> Node:
    """`v` as a node: nodes pass through, numbers/arrays become constants."""
    if isinstance(v, Node):
        return v
    if like is not None and isinstance(v, (int, float, bool, np.number)):
        value = np.asarray(v)
        converted = value.astype(like.dtype)
        if like.dtype not in ("float64", "float32") and not (
                np.isfinite(value) and converted == value):
            from adsvc_protocol.errors import DTypeError

            raise DTypeError(f"the number {v!r} is not exactly a {like.dtype}: cast the "
                             f"{like.dtype} operand first (adsvc.cast(x, 'float64'))")
        return constant(converted)
    return constant(v)


def _bin(op: str, a, b) -> Node:
    if not isinstance(a, Node):
        a = lift(a, b)
    b = lift(b, a)
    return make(op, (a, b))


# -- elementwise unary ---------------------------------------------------------------
def neg(x): return make("neg", (lift(x),))
def exp(x): return make("exp", (lift(x),))
def log(x): return make("log", (lift(x),))
def log1p(x): return make("log1p", (lift(x),))
def expm1(x): return make("expm1", (lift(x),))
def sin(x): return make("sin", (lift(x),))
def cos(x): return make("cos", (lift(x),))
def tan(x): return make("tan", (lift(x),))
def tanh(x): return make("tanh", (lift(x),))
def sigmoid(x): return make("sigmoid", (lift(x),))
def softplus(x): return make("softplus", (lift(x),))
def sqrt(x): return make("sqrt", (lift(x),))
def abs(x): return make("abs", (lift(x),))
def sign(x): return make("sign", (lift(x),))
def square(x): return make("square", (lift(x),))
def reciprocal(x): return make("reciprocal", (lift(x),))


# -- elementwise binary --------------------------------------------------------------
def add(a, b): return _bin("add", a, b)
def sub(a, b): return _bin("sub", a, b)
def mul(a, b): return _bin("mul", a, b)
def div(a, b): return _bin("div", a, b)
def pow(a, b): return _bin("pow", a, b)
def maximum(a, b): return _bin("maximum", a, b)
def minimum(a, b): return _bin("minimum", a, b)
def lt(a, b): return _bin("lt", a, b)
def le(a, b): return _bin("le", a, b)
def gt(a, b): return _bin("gt", a, b)
def ge(a, b): return _bin("ge", a, b)
def eq(a, b): return _bin("eq", a, b)
def ne(a, b): return _bin("ne", a, b)


def where(cond, a, b) -> Node:
    """Elementwise `a if cond else b` (broadcasting); the untaken side gets no gradient."""
    if not isinstance(a, Node):
        a = lift(a, b if isinstance(b, Node) else None)
    b = lift(b, a)
    return make("where", (lift(cond), a, b))


# -- reductions ----------------------------------------------------------------------
def _red(op, x, axes, keepdims):
    attrs = {"keepdims": bool(keepdims)}
    if axes is not None:
        attrs["axes"] = (axes,) if isinstance(axes, int) else tuple(axes)
    return make(op, (lift(x),), attrs)


def sum(x, axes=None, keepdims=False): return _red("sum", x, axes, keepdims)
def mean(x, axes=None, keepdims=False): return _red("mean", x, axes, keepdims)
def max(x, axes=None, keepdims=False): return _red("max", x, axes, keepdims)
def min(x, axes=None, keepdims=False): return _red("min", x, axes, keepdims)
def logsumexp(x, axes=None, keepdims=False): return _red("logsumexp", x, axes, keepdims)


# -- shape ---------------------------------------------------------------------------
def reshape(x, shape: Sequence[int]) -> Node:
    return make("reshape", (lift(x),), {"shape": tuple(shape)})


def transpose(x, perm: Sequence[int] | None = None) -> Node:
    x = lift(x)
    perm = tuple(reversed(range(x.ndim))) if perm is None else tuple(perm)
    return make("transpose", (x,), {"perm": perm})


def broadcast_to(x, shape: Sequence[int]) -> Node:
    x = lift(x)
    if x.shape == tuple(shape):
        return x
    return make("broadcast_to", (x,), {"shape": tuple(shape)})


def concat(xs: Sequence, axis: int = 0) -> Node:
    return make("concat", tuple(lift(x) for x in xs), {"axis": axis})


def slice(x, starts, stops, steps=None) -> Node:
    attrs = {"starts": tuple(starts), "stops": tuple(stops)}
    if steps is not None:
        attrs["steps"] = tuple(steps)
    return make("slice", (lift(x),), attrs)


def pad(x, low, high, interior=None) -> Node:
    x = lift(x)
    attrs = {"low": tuple(low), "high": tuple(high)}
    if interior is not None:
        attrs["interior"] = tuple(interior)
    return make("pad", (x,), attrs)


def take(x, indices, axis: int = 0) -> Node:
    return make("take", (lift(x), lift(indices)), {"axis": axis})


def scatter_add(updates, indices, axis: int, size: int) -> Node:
    return make("scatter_add", (lift(updates), lift(indices)), {"axis": axis, "size": size})


def matmul(a, b) -> Node:
    return make("matmul", (lift(a), lift(b)))


# -- misc ----------------------------------------------------------------------------
def stop_gradient(x) -> Node:
    return make("stop_gradient", (lift(x),))


def cast(x, dtype: str) -> Node:
    x = lift(x)
    if x.dtype == dtype:
        return x
    return make("cast", (x,), {"dtype": dtype})


# -- helpers used by derivative rules ------------------------------------------------
def zeros(shape, dtype="float64") -> Node:
    """A zero tensor without storing one: a scalar constant broadcast to `shape`."""
    return broadcast_to(constant(np.zeros((), dtype=dtype)), tuple(shape))


def full(shape, value, dtype="float64") -> Node:
    return broadcast_to(constant(np.full((), value, dtype=dtype)), tuple(shape))


def zeros_like(x: Node) -> Node:
    return zeros(x.shape, x.dtype)


def unbroadcast(ct: Node, shape: tuple[int, ...]) -> Node:
    """Sum a cotangent of a broadcast result back to an operand's `shape`."""
    shape = tuple(shape)
    if ct.shape == shape:
        return ct
    lead = ct.ndim - len(shape)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(shape)
                                if d == 1 and ct.shape[lead + i] != 1]
    out = sum(ct, axes) if axes else ct
    return out if out.shape == shape else reshape(out, shape)


def add_any(a: Node | None, b: Node | None) -> Node | None:
    """Sum of two possibly-symbolic-zero (None) derivatives."""
    if a is None:
        return b
    if b is None:
        return a
    return add(a, b)


def mul_or_zero(a, b) -> Node:
    """`a * b`, exactly 0 where either factor is 0 (even if the other is inf/NaN): the
    chain-rule product of a tangent/cotangent and a local derivative."""
    return _bin("mul_or_zero", a, b)


# -- composites (built from the ops above; not ops themselves) -----------------------
def relu(x):
    """max(x, 0); derivative at 0 is 0."""
    x = lift(x)
    return where(gt(x, 0.0), x, 0.0)


def softmax(x, axis=-1):
    x = lift(x)
    return exp(sub(x, logsumexp(x, axis, keepdims=True)))


def log_softmax(x, axis=-1):
    x = lift(x)
    return sub(x, logsumexp(x, axis, keepdims=True))


def dot(a, b):
    return sum(mul(a, b))


def norm(x, axes=None, keepdims=False):
    """Euclidean norm (gradient at 0 is inf/NaN like sqrt; add an epsilon if needed)."""
    return sqrt(sum(square(x), axes, keepdims))


def squared_norm(x, axes=None, keepdims=False):
    return sum(square(x), axes, keepdims)


def swap_last(x: Node) -> Node:
    perm = list(range(x.ndim))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return transpose(x, perm)


# -- operator overloading on Node ----------------------------------------------------
def _getitem(x: Node, idx):
    if not isinstance(idx, tuple):
        idx = (idx,)
    if len(idx) > x.ndim:
        raise IndexError(f"too many indices for a node of rank {x.ndim}")
    starts, stops, steps, squeeze = [], [], [], []
    for axis, d in enumerate(x.shape):
        i = idx[axis] if axis < len(idx) else builtins_slice(None)
        if isinstance(i, (int, np.integer)):
            if not -d <= i < d:
                raise IndexError(f"index {i} out of range for axis {axis} of size {d}")
            i = int(i) % d
            starts.append(i), stops.append(i + 1), steps.append(1), squeeze.append(axis)
        elif isinstance(i, builtins_slice):
            a, b, s = i.indices(d)
            if s <= 0:
                raise IndexError("only positive slice steps are supported")
            starts.append(a), stops.append(builtins_max(a, b)), steps.append(s)
        else:
            raise IndexError(f"unsupported index {i!r}: use ints, slices or take()")
    out = slice(x, starts, stops, steps)
    if squeeze:
        out = reshape(out, [d for a, d in enumerate(out.shape) if a not in squeeze])
    return out


def _eq(self, other):
    if isinstance(other, Node):
        return self is other  # identity: nodes are interned (and used as dict keys)
    raise TypeError("== / != on a traced value: use adsvc.eq(a, b) / adsvc.ne(a, b)")


def _ne(self, other):
    return not _eq(self, other)


def _bool(self):
    raise TypeError("a traced value has no truth value: use adsvc.where(cond, a, b) "
                    "instead of Python if/and/or on traced values")


import builtins as _b  # noqa: E402

builtins_slice, builtins_max = _b.slice, _b.max

for _name, _fn in {
    "__add__": add, "__radd__": lambda a, b: add(b, a),
    "__sub__": sub, "__rsub__": lambda a, b: sub(b, a),
    "__mul__": mul, "__rmul__": lambda a, b: mul(b, a),
    "__truediv__": div, "__rtruediv__": lambda a, b: div(b, a),
    "__pow__": pow, "__rpow__": lambda a, b: pow(b, a),
    "__matmul__": matmul, "__rmatmul__": lambda a, b: matmul(b, a),
    "__neg__": neg, "__pos__": lambda a: a, "__abs__": abs,
    "__lt__": lt, "__le__": le, "__gt__": gt, "__ge__": ge,
    "__getitem__": _getitem, "__bool__": _bool, "__eq__": _eq, "__ne__": _ne,
    "__hash__": object.__hash__,
    "sum": sum, "mean": mean, "max": max, "min": min, "reshape": reshape,
    "astype": cast,
}.items():
    setattr(Node, _name, _fn)
Node.T = property(lambda self: transpose(self))
