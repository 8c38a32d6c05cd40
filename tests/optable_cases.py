"""One or more small test graphs per op of the op table, with inputs in the op's domain.

tests/test_optable.py runs every case through the numerical derivative checks, and
fails if an op of the table has no case here (so a new op cannot skip its tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import adsvc as ad

RNG = np.random.default_rng(1234)


def R(*shape, lo=-2.0, hi=2.0):
    return RNG.uniform(lo, hi, size=shape)


def P(*shape):  # positive, away from 0
    return RNG.uniform(0.5, 2.0, size=shape)


def NZ(*shape):  # away from 0, either sign
    return P(*shape) * RNG.choice([-1.0, 1.0], size=shape)


@dataclass
class Case:
    name: str
    feeds: dict  # name -> array (float arrays are differentiated, int ones are not)
    fn: Callable  # fn(**nodes) -> node(s)
    # numpy reference of the function as seen by differentiation (for ops whose
    # derivative is not the derivative of their value, e.g. stop_gradient)
    fd_fn: Callable | None = None
    # numpy reference of the reverse gradient of <u, f>, likewise: grad_fn(feeds, u)
    grad_fn: Callable | None = None
    f64_only: bool = False  # the graph holds float64 constants; not traced at float32

    def specs(self):
        return {k: ad.Spec(ad_dtype(v), v.shape) for k, v in self.feeds.items()}


def ad_dtype(v):
    return np.asarray(v).dtype.name


IDX = np.array([[0, 4], [2, 2]], dtype=np.int64)

CASES: dict[str, list[Case]] = {}


def case(op, feeds, fn, **kw):
    CASES.setdefault(op, []).append(Case(op, feeds, fn, **kw))


for _op in ["neg", "exp", "expm1", "sin", "cos", "tanh", "sigmoid", "softplus", "square"]:
    case(_op, {"x": R(2, 3)}, lambda x, _op=_op: getattr(ad, _op)(x))
case("tan", {"x": R(3, lo=-1.0, hi=1.0)}, ad.tan)
for _op in ["log", "log1p", "sqrt"]:
    case(_op, {"x": P(2, 3)}, lambda x, _op=_op: getattr(ad, _op)(x))
case("abs", {"x": NZ(4)}, ad.abs)
case("reciprocal", {"x": NZ(4)}, ad.reciprocal)
case("sign", {"x": NZ(4)}, lambda x: x * ad.sign(x))

case("add", {"a": R(2, 3), "b": R(3)}, lambda a, b: a + b)
case("sub", {"a": R(3), "b": R(2, 1)}, lambda a, b: a - b)
case("mul", {"a": R(2, 3), "b": R(2, 1)}, lambda a, b: a * b)
case("mul_or_zero", {"a": R(2, 3), "b": R(3)}, ad.mul_or_zero)
case("div", {"a": R(2, 3), "b": NZ(3)}, lambda a, b: a / b)
case("pow", {"a": P(2, 3), "b": R(3)}, lambda a, b: a ** b)
case("maximum", {"a": R(2, 3), "b": R(3)}, ad.maximum)
case("minimum", {"a": R(2, 3), "b": R(3)}, ad.minimum)
for _op in ["lt", "le", "gt", "ge", "eq", "ne"]:
    case(_op, {"a": R(2, 3), "b": R(3)},
         lambda a, b, _op=_op: ad.where(getattr(ad, _op)(a, b), a * b, a + b))
case("where", {"a": R(2, 3), "b": R(3)}, lambda a, b: ad.where(a > 0.0, ad.sin(a), b * b))

for _op in ["sum", "mean", "max", "min", "logsumexp"]:
    case(_op, {"x": R(2, 3, 4)}, lambda x, _op=_op: getattr(ad, _op)(x, (0, 2)))
    case(_op, {"x": R(3, 4)}, lambda x, _op=_op: getattr(ad, _op)(x, 1, keepdims=True))
    case(_op, {"x": R(5)}, lambda x, _op=_op: getattr(ad, _op)(x))

case("reshape", {"x": R(2, 6)}, lambda x: ad.reshape(x, (3, -1)) * 1.5)
case("transpose", {"x": R(2, 3, 4)}, lambda x: ad.transpose(x, (2, 0, 1)))
case("broadcast_to", {"x": R(3, 1)}, lambda x: ad.broadcast_to(x, (2, 3, 4)))
case("concat", {"a": R(2, 3), "b": R(4, 3)}, lambda a, b: ad.concat([a, b * b], 0))
case("slice", {"x": R(5, 6)}, lambda x: ad.slice(x, (1, 0), (5, 6), (2, 3)))
case("slice", {"x": R(5)}, lambda x: x[1:4] * x[0])
case("pad", {"x": R(2, 3)}, lambda x: ad.pad(x, (1, 0), (0, 2), (1, 1)))
case("take", {"x": R(5, 3), "i": IDX}, lambda x, i: ad.take(x, i, 0))
case("take", {"x": R(3, 5), "i": np.array([4, -1, 0])}, lambda x, i: ad.take(x, i, 1))
case("scatter_add", {"u": R(2, 2, 3), "i": IDX}, lambda u, i: ad.scatter_add(u, i, 0, 5))
case("matmul", {"a": R(2, 3, 4), "b": R(4, 5)}, lambda a, b: a @ b)
case("matmul", {"a": R(4), "b": R(2, 4, 3)}, lambda a, b: a @ b)
case("matmul", {"a": R(3, 4), "b": R(4)}, lambda a, b: a @ b)
case("constant", {"x": R(3)}, lambda x: x * ad.constant(R(3)) + ad.constant(2.0),
     f64_only=True)
_SG = R(3)
# stop_gradient(x) is held at its value x0: the reference is x * x0.
case("stop_gradient", {"x": _SG}, lambda x: x * ad.stop_gradient(x),
     fd_fn=lambda fd: {"out": fd["x"] * _SG},
     grad_fn=lambda fd, u: {"x": u["out"] * _SG})
# Casting to int cuts the derivative: x * trunc(x) has derivative trunc(x). (Float-to-
# float casts are checked in test_derivatives.py with float32 tolerances.)
case("cast", {"x": R(4, lo=0.1, hi=3.9)},
     lambda x: x * ad.cast(ad.cast(x, "int64"), "float64"), f64_only=True)


# Control flow (bodies are graphs; their derivatives are passes over the bodies).
def _scan_case(x, w):
    def step(c, row):
        h = ad.tanh(c * row + 0.5 * x)  # reads x from the enclosing trace: a const operand
        return h, ad.sum(h * h)
    final, ys = ad.scan(step, x, w)
    return final * ad.sum(ys)


case("scan", {"x": R(3), "w": R(4, 3)}, _scan_case)
case("element", {"x": R(3), "w": R(4, 3)}, _scan_case)
case("while_loop", {"x": R(3), "s": P()},
     lambda x, s: ad.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, ad.sin(c[1]) * s),
                                (0, x), max_iters=10)[1])
case("cond", {"a": P(3), "b": R(3)},
     lambda a, b: ad.cond(ad.sum(a) > 1.0, lambda u, v: u * v * v, lambda u, v: ad.exp(u) - v,
                          a, b)
     + ad.cond(ad.sum(a) < 1.0, lambda u: u * 2.0, lambda u: ad.sin(u) * a, b))
