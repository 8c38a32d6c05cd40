"""Local Jacobian patterns: which operand elements each output element of an op depends on.

An op declares one of these rules as `OpDef.sparsity`. A rule takes a node and returns
one pattern per operand: a boolean `scipy.sparse` CSR matrix of shape (node.size,
operand.size) — entry (i, j) set when output element i may depend on operand element j
(row-major flat indices) — or IDENTITY (element i on element i, same shape), or None (no
dependence: integer/bool operands such as indices and conditions). The sparsity pass
(`adsvc.passes.sparsity`) multiplies them along the graph. Patterns are structural and
conservative: a set entry may be zero at some point, an unset one is zero everywhere.

The rules, by name (the "sparsity" column of the op table in protos/README.md):
elementwise (numpy broadcasting), reduction (over `axes`), index_map (each output
element is a copy of at most one operand element, found by running the op's own kernel
on element positions: reshape, transpose, broadcast_to, slice, pad, concat), gather
(take: an index map when the indices are a constant, else every element along the axis),
scatter (scatter_add: gather's transpose), matmul, and dense, the conservative fallback
of an op that declares none (every output element on every operand element).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from adsvc.ir.opdef import get
from adsvc.ops.rules import broadcast_shapes, norm_axes, norm_axis, reduced_shape
from adsvc_protocol import dtypes

IDENTITY = "identity"  # the pattern of an operand that output element i takes element i of


def boolean(rows, cols, shape) -> sp.csr_matrix:
    """The boolean CSR matrix with entries at (rows[k], cols[k]) (duplicates merged)."""
    rows, cols = np.asarray(rows).ravel(), np.asarray(cols).ravel()
    return sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=shape)


def _positions(shape) -> np.ndarray:
    return np.arange(math.prod(shape), dtype=np.int64).reshape(shape)


def _float(x) -> bool:
    """A float value, or a node with several results (a loop: one element stands for
    all of them, so its users depend on everything it depends on)."""
    if x.types is not None:
        return any(dtypes.is_float(dt) for dt, _ in x.types)
    return dtypes.is_float(x.dtype)


def elementwise(node):
    """Output element i depends on the element of each float operand that numpy
    broadcasting takes for i."""
    out = []
    for x in node.inputs:
        if not _float(x):
            out.append(None)
        elif x.shape == node.shape:
            out.append(IDENTITY)
        else:
            cols = np.broadcast_to(_positions(x.shape), node.shape)
            out.append(boolean(np.arange(node.size), cols, (node.size, x.size)))
    return out


def reduction(node):
    """Output element i depends on every element reduced into it (attribute `axes`)."""
    x, = node.inputs
    axes = norm_axes(node.op, node.attr("axes"), x.ndim)
    rows = np.broadcast_to(_positions(reduced_shape(x.shape, axes, True)), x.shape)
    return [boolean(rows, np.arange(x.size), (node.size, x.size))]


def _source_map(node, k: int, others) -> np.ndarray:
    """1 + the flat index in operand k of the element each output element copies (0:
    none), from the op's kernel run on positions; `others` fill the other operands."""
    kernel = get(node.op).kernel(dict(node.attrs))
    args = [_positions(x.shape) + 1 if j == k else others(x) for j, x in enumerate(node.inputs)]
    return np.asarray(kernel(*args)).reshape(-1)


def _from_source_map(src: np.ndarray, node, x):
    if x.size == node.size and np.array_equal(src, np.arange(1, node.size + 1)):
        return IDENTITY
    rows = np.flatnonzero(src)
    return boolean(rows, src[rows] - 1, (node.size, x.size))


def index_map(node):
    """Output element i is a copy of at most one element of one operand (or zero), found
    by running the op's own kernel on the operands' element positions."""
    def zeros(x):
        return np.zeros(x.shape, dtype=np.int64)

    return [_from_source_map(_source_map(node, k, zeros), node, x) if _float(x) else None
            for k, x in enumerate(node.inputs)]


def _along_axis(out_shape, in_shape, axis, out_len, in_len):
    """Every (out[p, a, r], in[p, b, r]) pair: the pattern of a map that may move any
    element along `axis` to any position (out_len and in_len positions along it)."""
    pre = math.prod(in_shape[:axis])
    post = math.prod(out_shape) // max(pre * out_len, 1)
    rows = _positions((pre, out_len, post))[:, :, None, :]
    cols = _positions((pre, in_len, post))[:, None, :, :]
    full = (pre, out_len, in_len, post)
    return boolean(np.broadcast_to(rows, full), np.broadcast_to(cols, full),
                   (math.prod(out_shape), math.prod(in_shape)))


def _take_pattern(x_shape, idx, axis, out_shape):
    """The pattern of take(x, idx, axis) for a constant `idx` (None: any index)."""
    size = math.prod(x_shape)
    if idx is not None:
        try:
            src = np.take(_positions(x_shape) + 1, idx, axis=axis).reshape(-1)
        except IndexError:  # out of range: the evaluation fails; stay conservative
            src = None
        if src is not None:
            rows = np.arange(src.size)
            return boolean(rows, src - 1, (src.size, size))
    k = math.prod(out_shape) // max(math.prod(x_shape) // max(x_shape[axis], 1), 1)
    return _along_axis(out_shape, x_shape, axis, k, x_shape[axis])


def _constant(node):
    return node.value if node.op == "constant" else None


def gather(node):
    """take: output element i copies the element its index names — known when the
    indices are a constant; otherwise any element along the axis."""
    x, idx = node.inputs
    axis = norm_axis("take", node.attr("axis"), x.ndim)
    return [_take_pattern(x.shape, _constant(idx), axis, node.shape), None]


def scatter(node):
    """scatter_add: each update element goes to the position its index names (known when
    the indices are a constant; otherwise any position along the axis): the transpose of
    the gather pattern."""
    u, idx = node.inputs
    axis = node.attr("axis")
    return [_take_pattern(node.shape, _constant(idx), axis, u.shape).T.tocsr(), None]


def matmul(node):
    """out[..., i, j] depends on row i of a and column j of b (batch dimensions
    broadcast; a 1-D operand is a single row or column)."""
    a, b = node.inputs
    a2 = (1,) + a.shape if a.ndim == 1 else a.shape
    b2 = b.shape + (1,) if b.ndim == 1 else b.shape
    batch = broadcast_shapes("matmul", a2[:-2], b2[:-2])
    (m, k), n = a2[-2:], b2[-1]
    full = batch + (m, n, k)
    rows = np.broadcast_to(_positions(batch + (m, n))[..., None], full)
    pa = np.broadcast_to(_positions(a2), batch + (m, k))[..., :, None, :]
    pb = np.swapaxes(np.broadcast_to(_positions(b2), batch + (k, n)), -1, -2)[..., None, :, :]
    return [boolean(rows, np.broadcast_to(pa, full), (node.size, a.size)),
            boolean(rows, np.broadcast_to(pb, full), (node.size, b.size))]


def dense(node):
    """The conservative fallback: every output element on every element of every float
    operand."""
    return [boolean(*np.divmod(np.arange(node.size * x.size), x.size), (node.size, x.size))
            if _float(x) else None for x in node.inputs]
