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
    "mul": (_times_one,), "mul_or_zero": (_times_one,),
    "add": (_plus_zero,), "sub": (_minus_zero,), "div": (_over_one,),
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
