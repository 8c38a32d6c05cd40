"""Scalar graphs on the native register VM (`_scalarvm.c`), not one Python call per node.

A graph whose every value is a float64 (or bool) scalar and whose every op has an
opcode here — the scalar graphs of W1/W2: chains of arithmetic and elementary
functions and their derivatives — becomes a `Program`: five int32s per node (opcode,
result register, operand registers) over one float64 register per node, built once
per plan. Running it is one C call (in chunks, so deadlines are checked between them);
each node is computed once, as in the numpy plan. The opcodes follow the op table's
kernels exactly (IEEE results, NaN propagation, the zero rule of mul_or_zero); ops
without an opcode keep the graph on the numpy interpreter. Without the compiled module
(no C compiler at install) every graph runs on the interpreter.
"""

from __future__ import annotations

import os

import numpy as np

from adsvc.runtime.cost import Cost
from adsvc_protocol import dtypes

try:  # built at install time (setup.py); optional
    from adsvc.runtime import _scalarvm
except ImportError:  # pragma: no cover - exercised only without a compiler
    _scalarvm = None

# op -> opcode of _scalarvm.c (views and identities are copies of their operand)
OPCODES = {
    "reshape": 0, "broadcast_to": 0, "transpose": 0,
    "add": 1, "sub": 2, "mul": 3, "div": 4, "neg": 5, "exp": 6, "log": 7, "sin": 8,
    "cos": 9, "tan": 10, "tanh": 11, "sqrt": 12, "square": 13, "reciprocal": 14, "abs": 15,
    "sign": 16, "sigmoid": 17, "softplus": 18, "log1p": 19, "expm1": 20, "pow": 21,
    "maximum": 22, "minimum": 23, "mul_or_zero": 24, "where": 25,
    "lt": 26, "le": 27, "gt": 28, "ge": 29, "eq": 30, "ne": 31, "stop_gradient": 32,
}
CHUNK = 1 << 16  # instructions between deadline checks (about a millisecond)
# ADSVC_SCALAR_VM=0 keeps every plan on the numpy interpreter (tests compare the two)
ENABLED = [os.environ.get("ADSVC_SCALAR_VM", "1") != "0"]


def available() -> bool:
    """Is the compiled VM installed (and not switched off)?"""
    return _scalarvm is not None and ENABLED[0]


def _scalar(n) -> bool:
    return n.shape == () and n.types is None and n.dtype in (dtypes.FLOAT64, dtypes.BOOL)


def eligible(nodes) -> bool:
    """Can the VM run every node of a graph (in `Graph.nodes` order)?"""
    if not available() or len(nodes) >= 2**31:
        return False
    for n in nodes:
        if not _scalar(n):
            return False
        if n.op in ("input", "constant"):
            continue
        if n.op not in OPCODES or not all(_scalar(i) for i in n.inputs):
            return False
        if n.dtype == dtypes.BOOL and not 26 <= OPCODES[n.op] <= 31:  # bools: comparisons
            return False
    return True


class Program:
    """The register program of a scalar graph: `run(inputs)` -> the output values."""

    def __init__(self, nodes, input_slots, output_slots):
        slot = {id(n): i for i, n in enumerate(nodes)}
        code = []
        self.template = np.zeros(len(nodes))
        for i, n in enumerate(nodes):
            if n.op == "constant":
                self.template[i] = float(n.value)
            elif n.op != "input":
                ops = [slot[id(x)] for x in n.inputs] + [i, i, i]
                code.append((OPCODES[n.op], i, ops[0], ops[1], ops[2]))
        self.code = np.array(code, dtype=np.int32).reshape(-1, 5)  # (none: empty, as a tape's)
        self.count = len(code)
        self.max_reg = max(len(nodes) - 1, 0)
        self.input_slots = input_slots
        self.output_slots = output_slots
        self.bool_out = [nodes[s].dtype == dtypes.BOOL for s in output_slots]

    def cost(self) -> Cost:
        """What a run costs: two register files (the template and its copy), one
        operation per instruction."""
        regs = 8 * len(self.template)
        return Cost(2 * regs + 8, 8, [(self.count, 0, 0)])

    def run(self, inputs, interrupt=None) -> list[np.ndarray]:
        """The outputs (0-d arrays of the declared dtypes) at the input values (checked
        arrays, in input order); `interrupt()` is called between chunks and may raise."""
        regs = self.template.copy()
        for s, v in zip(self.input_slots, inputs):
            regs[s] = float(v)
        run_chunks(self.code, regs, self.count, interrupt)
        return [np.array(regs[s] != 0.0) if b else np.array(regs[s])
                for s, b in zip(self.output_slots, self.bool_out)]


def run_chunks(code: np.ndarray, regs: np.ndarray, count: int, interrupt=None) -> None:
    """Run the `count` instructions of `code` on `regs` in place, in chunks of CHUNK with
    `interrupt(steps=k)` (if given; it may raise) between them."""
    for start in range(0, count, CHUNK):
        if interrupt is not None:
            interrupt(steps=start)
        _scalarvm.run(code, regs, start, min(start + CHUNK, count), len(regs) - 1)


def flatten(graph) -> tuple | None:
    """(program bytes, register template bytes, register count, output registers) of
    `graph` built by one C walk over its nodes (inputs in registers 0..), or None when
    the VM cannot run it (see _vmflatten.c)."""
    if not available():
        return None
    return _scalarvm.flatten(tuple(graph.inputs), tuple(n for _, n in graph.outputs),
                             OPCODES, dtypes.FLOAT64, dtypes.BOOL)


def activity(code: np.ndarray, n_regs: int, wrt: list[int], targets: list[int]):
    """(flags bytes, reached bytes): per instruction, which operands carry derivatives
    from the `wrt` registers to the `targets`; per wrt register, whether any does."""
    return _scalarvm.activity(code, n_regs, np.array(wrt or [0], np.int32)[:len(wrt)],
                              np.array(targets or [0], np.int32)[:len(targets)])


def reverse(code, regs, adj, flags, start: int, stop: int) -> None:
    """The adjoint sweep over instructions stop-1 .. start (adjoints in `adj`, in place)."""
    _scalarvm.reverse(code, regs, adj, flags, start, stop)


def tangent(code, regs, dot, flags, start: int, stop: int) -> None:
    """The tangent sweep over instructions start .. stop-1 (tangents in `dot`, in place)."""
    _scalarvm.tangent(code, regs, dot, flags, start, stop)


def whole(arrays: tuple, inputs, seeds, backward: bool) -> tuple[list, list]:
    """(values, derivatives) of a small tape in one C call (see `_vmsweeps.c`: whole);
    `arrays` = (program, flags, template, value registers, target registers, wrt
    registers, reached), as `tape.TapePlan` keeps them."""
    code, flags, template, values, targets, wrt, reached = arrays
    return _scalarvm.whole(code, flags, template, inputs, values, targets, seeds, wrt,
                           reached, backward)


# small_call(tape, request, in_offsets, response, out_offsets, out_sources, data): a
# small tape from request bytes to response bytes, or None when the bytes are not laid
# out as `request` (`_vmsweeps.c`; the server's small-call path, `TapePlan.native`)
small_call = _scalarvm.small_call if _scalarvm is not None else None  # (no VM: no tapes)


def blocks(program: bytes, leaves: tuple, out: np.ndarray, temps: int) -> None:
    """A fused elementwise region (`runtime.fusion`) into `out` (float64 or float32),
    block by block (`_vmblocks.c`): leaves are arrays of out's type or bool, of out's
    size (any strides) or of one element."""
    _scalarvm.blocks(program, leaves, out, temps)
