"""Fusing chains of elementwise steps into one pass over memory (the block VM).

An elementwise op on large arrays makes numpy read its operands and write a full new
array, so a chain of k ops streams about 3k arrays through memory and allocates k
temporaries. A plan fuses maximal regions of large float64 (or float32: a region
computes in one type) elementwise steps where every inner value has a single user and
is not an output; the region's leaves (inputs, constants, other steps' results: any
shape that broadcasts to the region's, any strides) are the registers of a small
program that `_vmblocks.c` runs block by block (512 elements per register, in the
cache): the leaves and the result pass through memory once. A single op is run so too:
it skips numpy's temporary, and mul_or_zero's separate NaN pass.

Only ops whose C form is bit-identical to the numpy kernel are fused: +, -, *, /,
negation, square (x*x), reciprocal (1/x), abs, sqrt (IEEE-exact), comparisons, where,
and mul_or_zero (x*y, 0 where a factor is 0 and the product is NaN — the scalar VM's
per-element form of the zero rule). Transcendental functions (C's libm and numpy's own
SIMD versions differ in the last bit) are left to numpy, so fusion never changes a
number. The program is opcodes and register numbers, built from the op table's names:
nothing a client sends becomes code. Without the compiled VM nothing is fused.

Measured on this project's 2-core machine (1M float64): numpy 0.8-1.1 ms per op with
`out=` buffers; numexpr (tried first) 1.7 ms for one multiply and 8 ms for five ops
with a mul_or_zero (it has no common subexpressions, so that form repeated its
operands four times); the block VM 3.3-4.5 ms for the same five ops.
"""

from __future__ import annotations

import math

import numpy as np

from adsvc.ops.shape import pad_index
from adsvc.runtime import scalar_vm

MIN_ELEMENTS = 1 << 15  # smaller arrays stay in cache anyway: numpy's per-op cost wins
MIN_OPS = 1  # one op too: no numpy temporary, no separate NaN pass of mul_or_zero
FUSABLE = ("add", "sub", "mul", "div", "neg", "square", "reciprocal", "abs", "sqrt",
           "lt", "le", "gt", "ge", "eq", "ne", "where", "mul_or_zero")
COMPARISONS = ("lt", "le", "gt", "ge", "eq", "ne")
FLOATS = ("float64", "float32")  # a region computes in its root's type
TYPES = (*FLOATS, "bool")
MAX_OPS = 64  # instructions per region: its scratch registers stay in the cache


def _users(steps: list) -> dict[int, int]:
    """How many steps read each slot."""
    users: dict[int, int] = {}
    for _, ins, _, _ in steps:
        for s in set(ins):
            users[s] = users.get(s, 0) + 1
    return users


def _fusable(node) -> bool:
    if node.op not in FUSABLE or node.types is not None or node.dtype not in TYPES:
        return False
    shape = node.shape
    if not all(isinstance(d, int) for d in shape) or math.prod(shape) < MIN_ELEMENTS:
        return False
    if node.op == "where" or node.op in COMPARISONS:
        return all(i.dtype in TYPES for i in node.inputs)
    return node.dtype in FLOATS and all(i.dtype == node.dtype for i in node.inputs)


def _leaf_ok(leaf, shape) -> bool:
    """Can `leaf` be a register of a region of `shape` (its shape broadcasts to it)?"""
    if leaf.types is not None or leaf.dtype not in TYPES or \
            not all(isinstance(d, int) for d in leaf.shape):
        return False
    try:
        return np.broadcast_shapes(tuple(leaf.shape), tuple(shape)) == tuple(shape)
    except ValueError:
        return False


def fuse(steps: list, nodes: list, keep: set[int]) -> list:
    """`steps` [(kernel, operand slots, result slot, node)] with fusable regions replaced
    by one step each (kernel: the region's block program; operands: its leaves)."""
    if not scalar_vm.available():
        return steps
    users = _users(steps)
    region: dict[int, int] = {}  # slot -> index of the region (in `groups`) it belongs to
    groups: list[list[int]] = []  # step indices per region
    for k, (_, ins, out, node) in enumerate(steps):
        if not _fusable(node):
            continue
        joins = [s for s in ins if s in region and users.get(s) == 1
                 and s not in keep and tuple(nodes[s].shape) == tuple(node.shape)]
        inner = {region[s] for s in joins}
        if 1 + sum(len(groups[r]) for r in inner) > MAX_OPS:
            inner = set()
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
    cannot be a register, a bool root, values of two float types)."""
    root = steps[group[-1]]
    kind = root[3].dtype
    if kind not in FLOATS or any(
            n.dtype not in (kind, "bool") or any(i.dtype not in (kind, "bool") for i in n.inputs)
            for n in (steps[k][3] for k in group)):
        return None
    made, leaves = {steps[k][2] for k in group}, []
    for k in group:
        for s in steps[k][1]:
            if s not in leaves and s not in made:
                if not _leaf_ok(nodes[s], root[3].shape):
                    return None
                leaves.append(s)
    program, temps = _program(steps, group, leaves)
    return (FusedKernel(program, temps, root[3].shape, np.dtype(kind)), tuple(leaves), root[2],
            root[3])


def _program(steps: list, group: list[int], leaves: list[int]) -> tuple[bytes, int]:
    """The block VM's instructions of a region (opcode, result, operands a, b, c) and its
    number of scratch registers: leaves are registers 0..L-1, a step's result takes a
    free scratch register (freed after its last use in the region), the root its own."""
    reg = {s: r for r, s in enumerate(leaves)}
    last = {s: j for j, k in enumerate(group) for s in steps[k][1]}
    free: list[int] = []
    top = len(leaves)
    code = []
    for j, k in enumerate(group):
        _, ins, out, node = steps[k]
        operands = [reg[s] for s in ins]
        for s in set(ins):
            if last[s] == j and s not in leaves:
                free.append(reg[s])
        if j == len(group) - 1 or not free:
            dst, top = top, top + 1
        else:
            dst = free.pop()
        reg[out] = dst
        operands += [operands[-1]] * (3 - len(operands))
        code.append([scalar_vm.OPCODES[node.op], dst, *operands])
    return np.array(code, np.int32).tobytes(), top - len(leaves)


def _leaf(v, shape: tuple) -> np.ndarray:
    """Operand `v` as the VM reads it: in this machine's byte order, and of the region's
    shape (a broadcast view: the VM follows its strides) unless it is one value."""
    a = np.asarray(v)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a if a.size == 1 or a.shape == shape else np.broadcast_to(a, shape)


class FusedKernel:
    """A region's block program called like a kernel (operands in leaf order)."""

    accepts_out = True

    def __init__(self, program: bytes, temps: int, shape, dtype=np.float64):
        self.program, self.temps, self.shape = program, temps, tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ops = len(program) // 20

    def __call__(self, *operands, out=None):
        if out is None:
            out = np.empty(self.shape, self.dtype)
        shape = self.shape
        leaves = tuple(v if type(v) is np.ndarray and v.dtype.isnative and
                       (v.shape == shape or v.size == 1) else _leaf(v, shape)
                       for v in operands)
        scalar_vm.blocks(self.program, leaves, out, self.temps)
        return out


def fuse_pad_sums(steps: list, nodes: list, keep: set[int]) -> list:
    """add(pad(a), pad(b)) — the cotangent of a value read through two slices, as
    reverse mode builds it — as one step that writes a into a zeroed array and adds b
    in place: one full-size array instead of three. The same values: where only one pad
    covers, that value (the sum added an exact 0, which also turned a -0.0 into +0.0);
    where both cover, a + b."""
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
