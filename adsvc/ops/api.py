"""Graph-building functions, one per op (each documented by its op's `OpDef.doc`), plus
composites of them and helpers for derivative rules.

Derivative rules, the tracer and users all build graphs through these functions (and
the operators of `Node`, which build the same nodes). Python numbers are lifted to
constants of the other operand's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adsvc.ir.node import BUILDER, Node, constant, lift, make


def _bin(op: str, a, b) -> Node:
    return BUILDER.binary(op, a, b)


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


def ones(shape, dtype="float64") -> Node:
    """A tensor of ones without storing one: a scalar constant broadcast to `shape`."""
    return full(shape, 1, dtype)


def ones_like(x: Node) -> Node:
    """Ones of x's shape and dtype."""
    return ones(x.shape, x.dtype)


def full(shape, value, dtype="float64") -> Node:
    """A tensor of `value` without storing one: a scalar constant broadcast to `shape`."""
    return broadcast_to(constant(np.full((), value, dtype=dtype)), tuple(shape))


def zeros_like(x: Node) -> Node:
    """Zeros of x's shape and dtype."""
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


def add_any(a, b):
    """Sum of two possibly-symbolic-zero (None) derivatives; the derivatives of a node
    with several results are tuples (one entry per result), summed entry by entry."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(add_any(x, y) for x, y in zip(a, b))
    return add(a, b)


def element(t: Node, index: int) -> Node:
    return make("element", (t,), {"index": index})


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
    """exp(x) / sum(exp(x)) along `axis`, computed stably (through logsumexp)."""
    x = lift(x)
    return exp(sub(x, logsumexp(x, axis, keepdims=True)))


def log_softmax(x, axis=-1):
    """x - logsumexp(x) along `axis`: the log of softmax, stable for large inputs."""
    x = lift(x)
    return sub(x, logsumexp(x, axis, keepdims=True))


def dot(a, b):
    """sum(a * b) over all elements (broadcasting)."""
    return sum(mul(a, b))


def norm(x, axes=None, keepdims=False):
    """Euclidean norm (gradient at 0 is inf/NaN like sqrt; add an epsilon if needed)."""
    return sqrt(sum(square(x), axes, keepdims))


def squared_norm(x, axes=None, keepdims=False):
    """sum(x * x) over `axes` (absent: all); unlike norm, smooth at 0."""
    return sum(square(x), axes, keepdims)


def swap_last(x: Node) -> Node:
    """x with its last two axes exchanged (matrix transpose of each batch element)."""
    perm = list(range(x.ndim))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return transpose(x, perm)
