"""What evaluating a plan costs, known before it runs: the peak bytes of live values,
the largest single allocation, and an estimate of each step's seconds.

Memory follows the plan's liveness exactly: a step allocates its result (unless its op
returns a view of its operand, `OpDef.view`, which keeps that operand's memory alive
instead), and a value's memory is released when the last slot holding it (or a view
of it) is freed. Inputs and constants count for the whole run. Kernel temporaries are
covered by adding the largest single allocation once.

Time is estimated from operation counts (`OpDef.flops`, else one per element of the
result and the operands) times a per-process calibration of this machine (a
transcendental elementwise kernel and a matrix product, timed once): the deadline
checks use it to not start a step that cannot finish in time.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import cache

import numpy as np

from adsvc.interrupt import CHECK_EVERY
from adsvc.ir.opdef import OPS
from adsvc_protocol import dtypes

# Bounds on what a calibration may conclude (a loaded machine times one run 50x slow):
# no machine here is slower than these, nor faster than the lower ones.
SLOWEST = (1e-8, 2e-10)  # s per elementwise op, s per matmul flop
FASTEST = (1e-10, 1e-12)


@cache
def calibration() -> tuple[float, float]:
    """(seconds per elementwise operation, seconds per matmul flop) on this machine,
    measured once (some milliseconds): the best of several back-to-back runs after a
    warm-up (BLAS threads that went to sleep between products made single timings 20x
    slow), clamped to SLOWEST/FASTEST."""
    x = np.linspace(0.0, 1.0, 1 << 18)
    a = np.ones((512, 512))
    for _ in range(3):  # wake BLAS's threads
        a @ a
    best_m = math.inf
    for _ in range(7):  # back to back, so the threads stay awake
        t = time.perf_counter()
        a @ a
        best_m = min(best_m, (time.perf_counter() - t) / (2 * 512 ** 3))
    best_e = math.inf
    for _ in range(7):
        t = time.perf_counter()
        np.sin(x)
        best_e = min(best_e, (time.perf_counter() - t) / x.size)
    return (min(max(best_e, FASTEST[0]), SLOWEST[0]),
            min(max(best_m, FASTEST[1]), SLOWEST[1]))


_SPEED = [1.0]  # observed / calibrated seconds of expensive steps, this process, smoothed


def speed() -> float:
    """How much slower (>1) or faster (<1) than calibrated expensive steps ran lately."""
    return _SPEED[0]


def observe(estimated: float, actual: float) -> float:
    """Fold one expensive step's actual time into `speed()` (bounded to 1/20..20: a
    calibration taken at a busy moment corrects itself after a step or two)."""
    if estimated > 0:
        ratio = min(max(actual / estimated, 0.05), 20.0)
        _SPEED[0] = 0.5 * _SPEED[0] + 0.5 * ratio
    return _SPEED[0]


def memory_fraction(fraction: float, fallback: int = 4 << 30) -> int:
    """`fraction` of this machine's physical memory in bytes (`fallback` if unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return fallback
    return int(total * fraction) if total > 0 else fallback


def nbytes(node) -> int:
    """Bytes of `node`'s value."""
    return math.prod(node.shape) * np.dtype(dtypes.to_numpy(node.dtype)).itemsize


def operations(node) -> tuple[int, float]:
    """(operations, estimated seconds) of one step computing `node`."""
    per_elem, per_flop = calibration()
    op = OPS[node.op]
    if op.view:
        return 0, 0.0
    if op.flops is not None:
        n = op.flops(node)
        return n, n * per_flop
    n = node.size + sum(i.size for i in node.inputs)
    return n, n * per_elem


@dataclass(frozen=True)
class Cost:
    """The figures of a plan (see the module docstring)."""

    peak_bytes: int  # most bytes of values alive at once, plus the largest allocation
    largest_bytes: int  # the largest single result
    operations: int  # arithmetic operations (flops; one per element where not declared)
    seconds: float  # estimated total
    steps: tuple[float, ...]  # estimated seconds of each step


def _temporary_bytes(node) -> int:
    """Bytes the step's kernel allocates while it runs (`OpDef.temporaries` buffers as
    large as its largest operand or result)."""
    k = OPS[node.op].temporaries
    return int(k * max([nbytes(node), *(nbytes(i) for i in node.inputs)])) if k else 0


def plan_cost(nodes, steps, keep: set[int], check=None) -> Cost:
    """The Cost of `steps` [(operand slots, result slot, frees, node)] over slots of
    `nodes`; `keep` are the output slots (never freed); `check()` is called every
    CHECK_EVERY steps and may raise to stop."""
    owner = {}  # slot -> the slot whose memory it holds (itself, or a view's base)
    refs: dict[int, int] = {}
    live = 0
    for s, n in enumerate(nodes):
        if n.op in ("input", "constant"):
            owner[s], refs[s] = s, 1 << 60  # held for the whole run
            live += nbytes(n)
    peak, largest, ops = live, 0, 0
    secs = []
    for k, (ins, out, frees, node) in enumerate(steps):
        if check is not None and k % CHECK_EVERY == 0:
            check()
        if OPS[node.op].view and ins:
            owner[out] = owner[ins[0]]
            refs[owner[out]] += 1
        else:
            owner[out], refs[out] = out, 1
            live += nbytes(node)
            largest = max(largest, nbytes(node))
        peak = max(peak, live + _temporary_bytes(node))
        n, s = operations(node)
        ops += n
        secs.append(s)
        for s in frees:
            o = owner[s]
            refs[o] -= 1
            if refs[o] == 0 and o not in keep:
                live -= nbytes(nodes[o])
    return Cost(peak + largest, largest, ops, sum(secs), tuple(secs))
