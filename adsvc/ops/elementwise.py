"""Elementwise ops (numpy broadcasting semantics).

Unary float ops are declared by their kernel and local derivative `d(x, y)` (y is the
op's own output node): JVP = t * d, VJP = ct * d. Every such chain-rule product is a
`mul_or_zero` node: exactly 0 where either factor is 0, even if the other is inf or NaN
there. That is what keeps the untaken branch of `where` (whose
cotangent is 0) from injecting NaN, and keeps forward mode finite where reverse mode is.

Conventions at awkward points (documented in protos/README.md):
sqrt'(0) = +inf; abs'(0) = sign(0) = 0; maximum/minimum at ties give each side 1/2;
pow: d/da = b * a**(b-1) is 0 where b == 0 (by the zero rule of mul_or_zero), and
d/db = a**b * log(a) is defined as 0 where a == 0 (the limit where a**b is defined).
"""

from __future__ import annotations

import numpy as np

from adsvc.ir.opdef import BILINEAR, NONE, ZERO, OpDef, register
from adsvc.ops import api as A
from adsvc.ops import patterns
from adsvc.ops.rules import binary, float_unary, numeric_unary
from adsvc_protocol import dtypes

NUMERIC = dtypes.FLOATS | dtypes.INTS


def _sigmoid(x):
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(x.dtype, copy=False)


UNARY_DOCS = {
    "exp": "e**x; derivative e**x", "log": "natural log; derivative 1/x",
    "log1p": "log(1 + x), accurate near 0; derivative 1/(1 + x)",
    "expm1": "e**x - 1, accurate near 0; derivative e**x", "sin": "sine; derivative cos(x)",
    "cos": "cosine; derivative -sin(x)", "tan": "tangent; derivative 1 + tan(x)**2",
    "tanh": "hyperbolic tangent; derivative 1 - tanh(x)**2",
    "sigmoid": "1/(1 + e**-x), stable; derivative s(1 - s)",
    "softplus": "log(1 + e**x), stable; derivative sigmoid(x)",
    "sqrt": "square root; derivative 1/(2 sqrt(x)), +inf at 0",
    "abs": "|x|; derivative sign(x), 0 at 0", "square": "x*x; derivative 2x",
    "reciprocal": "1/x; derivative -1/x**2",
}


def _unary(name, kernel, d, *, numeric=False, temporaries=0):
    def jvp(node, ts):
        t, = ts
        if t is None:
            return None
        return A.mul_or_zero(t, d(node.inputs[0], node))

    def vjp(node, ct):
        return [A.mul_or_zero(ct, d(node.inputs[0], node))]

    infer = numeric_unary(name) if numeric else float_unary(name)
    register(OpDef(name, 1, infer, lambda attrs: kernel, jvp, vjp, doc=UNARY_DOCS[name],
                   sparsity=patterns.elementwise, temporaries=temporaries))


# neg, abs and sign also accept integers (not differentiated there: activity analysis
# never reaches integer values).
register(OpDef("neg", 1, numeric_unary("neg"), lambda a: np.negative,
               lambda n, ts: None if ts[0] is None else A.neg(ts[0]),
               lambda n, ct: [A.neg(ct)], doc="-x; derivative -1",
               sparsity=patterns.elementwise, linear=True))
_unary("exp", np.exp, lambda x, y: y)
_unary("log", np.log, lambda x, y: A.reciprocal(x))
_unary("log1p", np.log1p, lambda x, y: A.reciprocal(A.add(x, 1.0)))
_unary("expm1", np.expm1, lambda x, y: A.add(y, 1.0))
_unary("sin", np.sin, lambda x, y: A.cos(x))
_unary("cos", np.cos, lambda x, y: A.neg(A.sin(x)))
_unary("tan", np.tan, lambda x, y: A.add(A.square(y), 1.0))
_unary("tanh", np.tanh, lambda x, y: A.sub(1.0, A.square(y)))
_unary("sigmoid", _sigmoid, lambda x, y: A.mul(y, A.sub(1.0, y)), temporaries=2)
_unary("softplus", lambda x: np.logaddexp(np.zeros((), x.dtype), x), lambda x, y: A.sigmoid(x))
_unary("sqrt", np.sqrt, lambda x, y: A.div(0.5, y))
_unary("abs", np.abs, lambda x, y: A.sign(x), numeric=True)
_unary("square", np.square, lambda x, y: A.mul(x, 2.0))
_unary("reciprocal", np.reciprocal, lambda x, y: A.neg(A.square(y)))
register(OpDef("sign", 1, numeric_unary("sign"), lambda a: np.sign, derivative=ZERO,
               doc="sign(x); derivative 0"))


# -- binary ----------------------------------------------------------------------------
def _lin_jvp(combine):
    def jvp(node, ts):
        ta, tb = ts
        out = combine(ta, tb)
        return None if out is None else A.broadcast_to(out, node.shape)
    return jvp


def _add_jvp(ta, tb):
    return A.add_any(ta, tb)


def _sub_jvp(ta, tb):
    return A.add_any(ta, None if tb is None else A.neg(tb))


def _ub(ct, x):
    return A.unbroadcast(ct, x.shape)


register(OpDef("add", 2, binary("add", NUMERIC), lambda a: np.add, _lin_jvp(_add_jvp),
               lambda n, ct: [_ub(ct, n.inputs[0]), _ub(ct, n.inputs[1])], doc="a + b",
               sparsity=patterns.elementwise, linear=True))
register(OpDef("sub", 2, binary("sub", NUMERIC), lambda a: np.subtract, _lin_jvp(_sub_jvp),
               lambda n, ct: [_ub(ct, n.inputs[0]), A.neg(_ub(ct, n.inputs[1]))],
               doc="a - b", sparsity=patterns.elementwise, linear=True))


def _partials_jvp(partials):
    """JVP of a binary op from its local partials (da, db) given as nodes."""
    def jvp(node, ts):
        a, b = node.inputs
        pa, pb = partials(node, a, b)
        ta, tb = ts
        out = A.add_any(None if ta is None else A.mul_or_zero(ta, pa),
                        None if tb is None else A.mul_or_zero(tb, pb))
        return None if out is None else A.broadcast_to(out, node.shape)
    return jvp


def _partials_vjp(partials):
    def vjp(node, ct):
        a, b = node.inputs
        pa, pb = partials(node, a, b)
        return [_ub(A.mul_or_zero(ct, pa), a), _ub(A.mul_or_zero(ct, pb), b)]
    return vjp


def _binary_op(name, kernel, partials, doc="", numeric=False, linear=False):
    register(OpDef(name, 2, binary(name, NUMERIC if numeric else dtypes.FLOATS),
                   lambda a: kernel, _partials_jvp(partials), _partials_vjp(partials),
                   doc=doc, sparsity=patterns.elementwise, linear=linear))


_binary_op("mul", np.multiply, lambda n, a, b: (b, a), doc="a * b", numeric=True,
           linear=BILINEAR)
_binary_op("div", np.divide, lambda n, a, b: (A.reciprocal(b), A.neg(A.div(n, b))),
           doc="a / b (true division)")


def _pow_partials(n, a, b):
    # d/da = b * a**(b-1): 0 where b == 0 (a**0 == 1 for every a, even a == 0).
    da = A.mul_or_zero(b, A.pow(a, A.sub(b, 1.0)))
    # d/db = a**b * log(a): defined as 0 where a == 0 (the limit for b > 0, where
    # a**b == 0; also at 0**0); NaN for a < 0.
    db = A.where(A.eq(a, 0.0), 0.0, A.mul_or_zero(n, A.log(a)))
    return da, db


_binary_op("pow", np.power, _pow_partials, doc="a ** b (d/db is NaN for a < 0)")


def _extremum_partials(cmp):
    def partials(n, a, b):
        wa = A.where(cmp(a, b), 1.0, A.where(A.eq(a, b), 0.5, 0.0))
        wa = A.cast(wa, n.dtype)
        return wa, A.sub(1.0, wa)
    return partials


_binary_op("maximum", np.maximum, _extremum_partials(A.gt), numeric=True,
           doc="elementwise max; at ties each side gets 1/2 of the derivative")
_binary_op("minimum", np.minimum, _extremum_partials(A.lt), numeric=True,
           doc="elementwise min; at ties each side gets 1/2 of the derivative")


def _mul_or_zero(a, b, out=None):
    out = np.multiply(a, b) if out is None else np.multiply(a, b, out=out)
    # 0 * inf is the only way a zero factor gives NaN, so a product without NaN needs no
    # fix-up; the scalar test is cheap, which matters on scalar-heavy graphs.
    # Per element, as the VMs decide: 0 where a factor is 0 and the product is NaN (a zero
    # product elsewhere keeps its IEEE sign).
    if (out != out) if out.ndim == 0 else np.isnan(out).any():
        zero = ((a == 0) | (b == 0)) & (out != out)
        if out.ndim == 0:
            out = np.where(zero, np.zeros((), out.dtype), out)
        else:  # in place: the same values as np.where(zero, 0, out)
            np.copyto(out, np.zeros((), out.dtype), where=zero)
    return out


_mul_or_zero.accepts_out = True  # a plan may hand it a freed buffer (runtime.buffers)


# a * b, except exactly 0 where either factor is 0 (0 * inf = inf * 0 = 0): the
# chain-rule product (see module docstring). Being symmetric, its own derivatives keep
# the rule: every term of its JVP/VJP is again a mul_or_zero product.
register(OpDef(
    "mul_or_zero", 2, binary("mul_or_zero", dtypes.FLOATS), lambda a: _mul_or_zero,
    _partials_jvp(lambda n, a, b: (b, a)), _partials_vjp(lambda n, a, b: (b, a)),
    doc="a * b, but exactly 0 where either factor is 0 (0 * inf = 0): the chain-rule "
        "product", sparsity=patterns.elementwise, temporaries=1,  # the NaN fix-up masks
    linear=BILINEAR))


# -- comparisons and where ---------------------------------------------------------------
CMP_SYMBOL = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


def _cmp(name, kernel):
    register(OpDef(name, 2, binary(name, dtypes.DTYPES, out_dtype=dtypes.BOOL),
                   lambda a: kernel, derivative=NONE,
                   doc=f"elementwise comparison a {CMP_SYMBOL[name]} b (bool result)"))


for _n, _k in [("lt", np.less), ("le", np.less_equal), ("gt", np.greater),
               ("ge", np.greater_equal), ("eq", np.equal), ("ne", np.not_equal)]:
    _cmp(_n, _k)


def _where_infer(ins, attrs):
    from adsvc.ops.rules import broadcast_shapes, same_dtype
    from adsvc_protocol.errors import DTypeError

    c, a, b = ins
    if c.dtype != dtypes.BOOL:
        raise DTypeError(f"op 'where': condition must be bool, got {c.dtype}")
    dt = same_dtype("where", (a, b))
    return dt, broadcast_shapes("where", c.shape, a.shape, b.shape)


def _where_jvp(node, ts):
    c, a, b = node.inputs
    _, ta, tb = ts
    if ta is None and tb is None:
        return None
    ta = A.zeros_like(a) if ta is None else ta
    tb = A.zeros_like(b) if tb is None else tb
    return A.where(c, ta, tb)


def _where_vjp(node, ct):
    c, a, b = node.inputs
    z = A.zeros((), node.dtype)
    return [None, _ub(A.where(c, ct, z), a), _ub(A.where(c, z, ct), b)]


register(OpDef("where", 3, _where_infer, lambda a: np.where, _where_jvp, _where_vjp,
               doc="where(cond, a, b): a where cond else b; no gradient flows to the "
                   "untaken side", sparsity=patterns.elementwise, linear=True))
