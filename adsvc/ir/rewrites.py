"""Exact algebraic simplification: the rewrite rules and the rewriter that applies them.

The builder (`ir.node.Builder`) is given a `Rewriter` and applies it to every node it
makes, so graphs — derivative graphs above all — come out simplified instead of being
rebuilt by a later pass. Every rule is exact in IEEE arithmetic, signed zeros included
(x + 0.0 is not x when x is -0.0), and returns a replacement node or None. A rule gets
the node and the builder (to make the replacement); it never sees the rest of the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from adsvc.ir.opdef import OPS

if TYPE_CHECKING:
    from adsvc.ir.node import Builder, Node

FOLD_LIMIT = 64  # fold constant subexpressions with at most this many elements
Rule = Callable[["Node", "Builder"], "Node | None"]


def _base(node: Node) -> Node:
    while node.op == "broadcast_to":
        node = node.inputs[0]
    return node


def _scalar_const(node: Node):
    """The value if `node` is a constant (or a broadcast constant) with all-equal elements."""
    node = _base(node)
    if node.op != "constant" or node.value.size == 0:
        return None
    v = node.value.flat[0]
    return v if node.value.size == 1 or np.all(node.value == v) else None


def _is(node: Node, v) -> bool:
    c = _scalar_const(node)
    return c is not None and c == v and not isinstance(c, np.bool_)


def _is_zero(node: Node, negative: bool) -> bool:
    """Every element is a zero of the given sign; for integers any zero will do."""
    if node.dtype not in ("float64", "float32"):
        return _is(node, 0)
    node = _base(node)
    v = node.value
    return (node.op == "constant" and v.size > 0 and not v.any()
            and bool((np.signbit(v) == negative).all()))


def _same(x: Node, n: Node) -> bool:
    """`x` can replace `n`: same shape (a rule must never change a shape) and dtype."""
    return x.shape == n.shape and x.dtype == n.dtype


# -- the rules, by op -----------------------------------------------------------------
def _times_one(n, b):  # x * 1 = 1 * x = x (mul and the chain-rule mul_or_zero)
    x, y = n.inputs
    return x if _is(y, 1) and _same(x, n) else y if _is(x, 1) and _same(y, n) else None


def _plus_zero(n, b):  # x + (-0.0) = (-0.0) + x = x
    x, y = n.inputs
    return x if _is_zero(y, True) and _same(x, n) else y if _is_zero(x, True) and _same(y, n) \
        else None


def _minus_zero(n, b):  # x - (+0.0) = x;  (-0.0) - x = -x
    x, y = n.inputs
    if _is_zero(y, False) and _same(x, n):
        return x
    return b.make("neg", (y,)) if _is_zero(x, True) and _same(y, n) else None


def _over_one(n, b):  # x / 1 = x
    x, y = n.inputs
    return x if _is(y, 1) and _same(x, n) else None


def _pow_one_zero(n, b):  # x ** 1 = x;  x ** 0 = 1 (IEEE pow: even for NaN and inf);
    x, y = n.inputs    # x ** 2 = square(x) (numpy computes it so)
    if _is(y, 1) and _same(x, n):
        return x
    if _is(y, 2) and _same(x, n):
        return b.make("square", (x,))
    if _is(y, 0) and x.dtype in ("float64", "float32"):
        return b.make("broadcast_to", (b.constant(np.ones((), x.dtype)),), {"shape": n.shape})
    return None


def _mul_or_zero_by_constant(n, b):  # mul_or_zero(c, y) = c * y for a finite nonzero c
    # (the zero rule only differs from mul where an operand is 0 and the other inf/NaN)
    x, y = n.inputs
    for c, other in ((x, y), (y, x)):
        v = _scalar_const(c)
        if v is not None and np.isfinite(v) and v != 0:
            return b.make("mul", (c, other)) if c is x else b.make("mul", (other, c))
    return None


def _broadcast_constants(n, b):  # op(broadcast_to(a), c) = broadcast_to(op(a, c))
    # elementwise ops on constants, some of them broadcast: folded on the small bases, so
    # a gradient does not multiply a million broadcast ones by 100 on every call
    if not any(x.op == "broadcast_to" for x in n.inputs):  # the common case: nothing to do
        return None
    bases = [_base(x) for x in n.inputs]
    if (all(x is i for x, i in zip(bases, n.inputs)) or any(x.op != "constant" for x in bases)
            or not isinstance(n.size, int) or max(x.size for x in bases) > FOLD_LIMIT):
        return None
    try:
        with np.errstate(all="ignore"):
            v = np.asarray(OPS[n.op].kernel(dict(n.attrs))(*[x.value for x in bases]))
    except Exception:  # leave it for evaluation to report
        return None
    small = b.constant(v.astype(n.dtype, copy=False), n.dtype)
    return small if small.shape == n.shape else b.make("broadcast_to", (small,),
                                                         {"shape": n.shape})


def _unbroadcast_operand(n, b):  # op(broadcast_to(a), y) = op(a, y) when y has n's shape
    # (the kernel broadcasts a itself: no full-size copy of it)
    x, y = n.inputs
    if x.op == "broadcast_to" and y.shape == n.shape and y.op != "broadcast_to":
        return b.make(n.op, (x.inputs[0], y), dict(n.attrs))
    if y.op == "broadcast_to" and x.shape == n.shape and x.op != "broadcast_to":
        return b.make(n.op, (x, y.inputs[0]), dict(n.attrs))
    return None


def _neg_neg(n, b):  # -(-x) = x
    x, = n.inputs
    return x.inputs[0] if x.op == "neg" else None


def _identity(n, b):  # reshape/broadcast_to/cast to the operand's own type; x.T.T-free perm
    x = n.inputs[0]
    if n.op == "transpose":
        return x if list(n.attr("perm")) == list(range(n.ndim)) else None
    return x if _same(x, n) else None


def _reshape_reshape(n, b):  # reshape(reshape(x)) = reshape(x)
    x, = n.inputs
    return b.make("reshape", (x.inputs[0],), {"shape": n.shape}) if x.op == "reshape" else None


def _where_const(n, b):  # where(True, a, b) = a, where(False, a, b) = b (broadcast)
    c = _scalar_const(n.inputs[0])
    if c is None:
        return None
    pick = n.inputs[1] if c else n.inputs[2]
    return b.make("broadcast_to", (pick,), {"shape": n.shape}) if pick.shape != n.shape \
        else pick


RULES: dict[str, tuple[Rule, ...]] = {
    "mul": (_times_one, _broadcast_constants, _unbroadcast_operand),
    "mul_or_zero": (_times_one, _mul_or_zero_by_constant, _broadcast_constants,
                    _unbroadcast_operand),
    "pow": (_pow_one_zero, _broadcast_constants, _unbroadcast_operand),
    "add": (_plus_zero, _broadcast_constants, _unbroadcast_operand),
    "sub": (_minus_zero, _broadcast_constants, _unbroadcast_operand),
    "div": (_over_one, _broadcast_constants, _unbroadcast_operand),
    "neg": (_neg_neg,),
    "reshape": (_identity, _reshape_reshape), "broadcast_to": (_identity,),
    "cast": (_identity,), "transpose": (_identity,),
    "where": (_where_const,),
}


def fold(n: Node, b: Builder) -> Node | None:
    """A small node whose operands are all constants becomes a constant (any op)."""
    if (not n.inputs or n.types is not None or any(i.op != "constant" for i in n.inputs)
            or not isinstance(n.size, int) or n.size > FOLD_LIMIT):
        return None
    try:
        with np.errstate(all="ignore"):
            v = OPS[n.op].kernel(dict(n.attrs))(*[i.value for i in n.inputs])
        return b.constant(np.asarray(v), n.dtype)
    except Exception:  # leave it for evaluation to report, with the node named
        return None


class Rewriter:
    """Applies `rules` (op -> rules tried in order), then `fold`, to a fixed point."""

    def __init__(self, rules: dict[str, tuple[Rule, ...]] = RULES, folding: bool = True):
        self.rules = rules
        self.folding = folding

    def __call__(self, n: Node, b: Builder) -> Node:
        while True:
            new = self._once(n, b)
            if new is None or new is n:
                return n
            n = new

    def _once(self, n: Node, b: Builder) -> Node | None:
        for rule in self.rules.get(n.op, ()):
            new = rule(n, b)
            if new is not None:
                return new
        return fold(n, b) if self.folding else None
