"""Fusing chains of elementwise steps into one pass over memory (numexpr).

An elementwise op on large arrays is memory-bound: numpy reads its operands and writes
a full new array for every op, so a chain of k ops streams about 3k arrays through
memory. numexpr evaluates a whole expression block by block in cache, one pass. A plan
fuses maximal regions of large float64 elementwise steps where every inner value has
a single user and is not an output; the region's leaves (inputs, constants, other
steps' results: same shape or scalars) are the expression's variables.

Only ops whose numexpr form is bit-identical to the numpy kernel are fused: +, -, *,
/, negation, square (x*x), reciprocal (1/x), abs, sqrt (IEEE-exact), comparisons,
where, and mul_or_zero (x*y, 0 where a factor is 0 and the product is NaN — the VM's
per-element form of the zero rule). Transcendental functions (numexpr calls the C
library's, numpy its own SIMD ones) are left to numpy, so fusion never changes a
number. The expression is generated from the op table's names and slot numbers only:
nothing a client sends becomes expression text (constants are variables, not literals).
Without numexpr installed nothing is fused.
"""

from __future__ import annotations

import math

import numpy as np

from adsvc.ops.shape import pad_index

try:  # optional: without it plans run every step through numpy
    import numexpr
except ImportError:  # pragma: no cover
    numexpr = None

MIN_ELEMENTS = 1 << 15  # smaller arrays stay in cache anyway: numpy's per-op cost wins
MIN_OPS = 2  # a region of one op is that op

# op -> its numexpr form over operand expressions
FORMS = {
    "add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "div": "({} / {})",
    "neg": "(-{})", "square": "({0} * {0})", "reciprocal": "(1.0 / {})", "abs": "abs({})",
    "sqrt": "sqrt({})", "lt": "({} < {})", "le": "({} <= {})", "gt": "({} > {})",
    "ge": "({} >= {})", "eq": "({} == {})", "ne": "({} != {})",
    "where": "where({}, {}, {})",
    "mul_or_zero": "where((({0} == 0.0) | ({1} == 0.0)) & (({0} * {1}) != ({0} * {1})), "
                   "0.0, ({0} * {1}))",
}
NUMEXPR_TYPE = {"float64": np.float64, "bool": bool}  # numexpr names types by class
# numexpr has no common subexpressions: a form that names an operand twice repeats its
# expression, so a region stops growing where its text would pass MAX_OPS operations
MAX_OPS = 32


def _users(steps: list) -> dict[int, int]:
    """How many times the steps read each slot."""
    users: dict[int, int] = {}
    for _, ins, _, _ in steps:
        for s in ins:
            users[s] = users.get(s, 0) + 1
    return users


def _fusable(node) -> bool:
    if node.op not in FORMS or node.types is not None or node.dtype not in NUMEXPR_TYPE:
        return False
    shape = node.shape
    if not all(isinstance(d, int) for d in shape) or math.prod(shape) < MIN_ELEMENTS:
        return False
    if node.op in ("where", "lt", "le", "gt", "ge", "eq", "ne"):
        return all(i.dtype in NUMEXPR_TYPE for i in node.inputs)
    return node.dtype == "float64" and all(i.dtype == "float64" for i in node.inputs)


def _leaf_ok(leaf, shape) -> bool:
    """Can `leaf` be a variable of a region of `shape` (same shape, or a scalar)?"""
    return leaf.types is None and leaf.dtype in NUMEXPR_TYPE and \
        (tuple(leaf.shape) == tuple(shape) or leaf.shape == ())


def fuse(steps: list, nodes: list, keep: set[int]) -> list:
    """`steps` [(kernel, operand slots, result slot, node)] with fusable regions replaced
    by one step each (kernel: the compiled expression; operands: the region's leaves)."""
    if numexpr is None:
        return steps
    users = _users(steps)
    region: dict[int, int] = {}  # slot -> index of the region (in `groups`) it belongs to
    groups: list[list[int]] = []  # step indices per region
    size: dict[int, int] = {}  # slot -> operations of its expression text
    for k, (_, ins, out, node) in enumerate(steps):
        if not _fusable(node):
            continue
        joins = [s for s in ins if s in region and users.get(s) == 1
                 and s not in keep and tuple(nodes[s].shape) == tuple(node.shape)]
        form = FORMS[node.op]
        ops = 1 + sum(form.count(f"{{{j}}}") * size[s] for j, s in enumerate(ins)
                      if s in joins) if "{0}" in form else \
            1 + sum(size[s] for s in joins)
        if ops > MAX_OPS:
            joins, ops = [], 1
        size[out] = ops
        inner = {region[s] for s in joins}
        g = min(inner) if inner else len(groups)
        if not inner:
            groups.append([])
        for other in inner - {g}:  # two regions meet here: one region
            groups[g] += groups[other]
            for j in groups[other]:
                region[steps[j][2]] = g
            groups[other] = []
        groups[g].append(k)
        region[out] = g
    return _rewrite(steps, nodes, [sorted(g) for g in groups if len(g) >= MIN_OPS])


def _rewrite(steps: list, nodes: list, groups: list[list[int]]) -> list:
    replaced: dict[int, tuple] = {}
    for g in groups:
        step = _compile(steps, nodes, g)
        if step is not None:
            replaced[g[-1]] = step
            replaced.update({k: None for k in g[:-1]})
    out = []
    for k, step in enumerate(steps):
        if k not in replaced:
            out.append(step)
        elif replaced[k] is not None:
            out.append(replaced[k])
    return out


def _compile(steps: list, nodes: list, group: list[int]) -> tuple | None:
    """(kernel, leaf slots, root slot, root node) of one region, or None (a leaf that
    cannot be a variable)."""
    made = {steps[k][2] for k in group}
    root = steps[group[-1]]
    shape = root[3].shape
    text: dict[int, str] = {}
    leaves: list[int] = []
    for k in group:
        _, ins, out, node = steps[k]
        args = []
        for s in ins:
            if s in made:
                args.append(text[s])
                continue
            if not _leaf_ok(nodes[s], shape):
                return None
            if s not in leaves:
                leaves.append(s)
            args.append(f"v{s}")
        text[out] = FORMS[node.op].format(*args)
    signature = [(f"v{s}", NUMEXPR_TYPE[nodes[s].dtype]) for s in leaves]
    try:
        expr = numexpr.NumExpr(text[root[2]], signature)
    except Exception:  # numexpr refuses the expression (too many operands, ...)
        return None
    return FusedKernel(expr, len(group)), tuple(leaves), root[2], root[3]


class FusedKernel:
    """A compiled numexpr expression called like a kernel (operands in leaf order)."""

    accepts_out = True

    def __init__(self, expr, ops: int):
        self.expr, self.ops = expr, ops

    def __call__(self, *operands, out=None):
        # (numexpr's own evaluate passes these; no fused op is a VML function)
        return self.expr(*operands, out=out, order="K", casting="safe", ex_uses_vml=False)


def fuse_pad_sums(steps: list, nodes: list, keep: set[int]) -> list:
    """add(pad(a), pad(b)) — the cotangent of a value read through two slices, as
    reverse mode builds it — as one step that writes a into a zeroed array and adds b
    in place: one full-size array instead of three. Bit-identical: where only one pad
    covers, the sum was that value plus an exact 0; where both cover, a + b."""
    users = _users(steps)
    made = {out: k for k, (_, _, out, _) in enumerate(steps)}
    drop, new = set(), {}
    for k, (_, ins, out, node) in enumerate(steps):
        pads = [made.get(s) for s in ins]
        if node.op != "add" or len(ins) != 2 or ins[0] == ins[1] or None in pads:
            continue
        pad_nodes = [steps[j][3] for j in pads]
        if not all(p.op == "pad" and users.get(s) == 1 and s not in keep
                   and p.shape == node.shape and p.dtype == node.dtype
                   and all(isinstance(d, int) for d in p.shape)
                   for p, s in zip(pad_nodes, ins)):
            continue
        kernel = PadSum(node, pad_nodes)
        new[k] = (kernel, tuple(steps[j][1][0] for j in pads), out, node)
        drop.update(pads)
    return [new.get(k, s) for k, s in enumerate(steps) if k not in drop]


class PadSum:
    """The kernel of `fuse_pad_sums`: (a, b) -> pad(a) + pad(b)."""

    accepts_out = True

    def __init__(self, node, pads):
        self.shape, self.dtype = tuple(node.shape), np.dtype(node.dtype)
        self.index = [pad_index(p) for p in pads]

    def __call__(self, a, b, out=None):
        if out is None:
            out = np.zeros(self.shape, self.dtype)
        else:
            out.fill(0)
        out[self.index[0]] = a
        out[self.index[1]] += b
        return out
