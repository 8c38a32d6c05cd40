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
import time
from functools import cache, cached_property

import numpy as np

from adsvc.interrupt import CHECK_EVERY
from adsvc.ir.graph import subgraphs
from adsvc.ir.opdef import OPS
from adsvc.machine import memory_fraction  # noqa: F401  (the runtime's budgets use it)
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


# What running one plan step costs beyond its arithmetic (the interpreter's dispatch,
# measured 0.3-1 us): negligible for a tensor step, but a loop runs its body's steps
# once per iteration, so the steps inside loops are counted at this much each.
STEP_SECONDS = 1e-6

NODE_BYTES = 800  # a compiled node with its plan step and bound kernel (measured ~730)


def held_bytes(graph) -> int:
    """Bytes a compiled, planned graph holds: NODE_BYTES per node (node, plan step,
    kernel) plus constants' data and names/labels — what caches weigh it by."""
    return sum(NODE_BYTES + (nbytes(n) if n.op == "constant"
                             else len(n.label) + len(n.name or ""))
               + sum(held_bytes(g) for _, gs in subgraphs(n) for g in gs)
               for n in graph.nodes)


def nbytes(node) -> int:
    """Bytes of `node`'s value (a node with several results: all of them)."""
    if node.types is not None:
        return sum(math.prod(sh) * np.dtype(dtypes.to_numpy(dt)).itemsize
                   for dt, sh in node.types)
    return math.prod(node.shape) * np.dtype(dtypes.to_numpy(node.dtype)).itemsize


def operations(node, sub_cost=None) -> tuple[int, int, int]:
    """(elementwise operations, matmul flops, steps run inside it) of one step computing
    `node` (a view: none; an op with sub-graphs: each sub-graph's figures times its
    trips, the costliest of alternatives such as branches; `sub_cost(graph)` gives a
    sub-graph's Cost)."""
    op = OPS[node.op]
    if op.trips is not None and sub_cost is not None:
        trips = op.trips(node)
        ops = steps = 0
        for k, graphs in subgraphs(node):
            costs = [sub_cost(g) for g in graphs]
            ops += trips.get(k, 1) * max(c.operations for c in costs)
            steps += trips.get(k, 1) * max(c.count for c in costs)
        return ops + nbytes(node) // 8, 0, steps
    if op.view:
        return 0, 0, 0
    if op.flops is not None:
        return 0, op.flops(node), 0
    return node.size + sum(i.size for i in node.inputs), 0, 0


class Cost:
    """The figures of a plan (see the module docstring). The seconds are worked out on
    first use: only deadline checks and log lines need the machine's calibration."""

    def __init__(self, peak_bytes: int, largest_bytes: int,
                 per_step: list[tuple[int, int, int]]):
        self.peak_bytes = peak_bytes  # bytes alive at once at most, + the largest value
        self.largest_bytes = largest_bytes  # the largest single result
        self._per_step = per_step  # (elementwise operations, flops, inner steps) per step
        self.operations = sum(e + f for e, f, _ in per_step)  # arithmetic operations
        self.count = len(per_step) + sum(o for _, _, o in per_step)  # steps run, loops' too

    @cached_property
    def steps(self) -> tuple[float, ...]:
        """Estimated seconds of each step."""
        per_elem, per_flop = calibration()
        return tuple(e * per_elem + f * per_flop + o * STEP_SECONDS
                     for e, f, o in self._per_step)

    @cached_property
    def seconds(self) -> float:
        """Estimated seconds of the whole evaluation."""
        return sum(self.steps)

    @cached_property
    def log_fields(self) -> str:
        """The figures as a call's log line gives them (` ops=... est_ms=... peak_mb=...`)."""
        return (f" ops={self.operations} est_ms={self.seconds * 1000:.1f} "
                f"peak_mb={self.peak_bytes / 2**20:.1f}")


def _temporary_bytes(node) -> int:
    """Bytes the step's kernel allocates while it runs (`OpDef.temporaries` buffers as
    large as its largest operand or result)."""
    k = OPS[node.op].temporaries
    return int(k * max([nbytes(node), *(nbytes(i) for i in node.inputs)])) if k else 0


def _largest_single(node) -> int:
    """The largest single allocation a step makes: its result, or for a node with
    several results (a loop's stored carries, say) the largest of them."""
    if node.types is not None:
        return max((math.prod(sh) * np.dtype(dtypes.to_numpy(dt)).itemsize
                    for dt, sh in node.types), default=0)
    return nbytes(node)


def plan_cost(nodes, steps, keep: set[int], check=None, sub_cost=None) -> Cost:
    """The Cost of `steps` [(operand slots, result slot, frees, node)] over slots of
    `nodes`; `keep` are the output slots (never freed); `check()` is called every
    CHECK_EVERY steps and may raise to stop; `sub_cost(graph)` gives the Cost of a
    sub-graph (a loop body's peak counts while its loop runs)."""
    owner = {}  # slot -> the slot whose memory it holds (itself, or a view's base)
    refs: dict[int, int] = {}
    live = 0
    for slot, n in enumerate(nodes):
        if n.op in ("input", "constant"):
            owner[slot], refs[slot] = slot, 1 << 60  # held for the whole run
            live += nbytes(n)
    peak, largest, per_step = live, 0, []
    for k, (ins, out, frees, node) in enumerate(steps):
        if check is not None and k % CHECK_EVERY == 0:
            check()
        if OPS[node.op].view and ins:
            owner[out] = owner[ins[0]]
            refs[owner[out]] += 1
        else:
            owner[out], refs[out] = out, 1
            live += nbytes(node)
            largest = max(largest, _largest_single(node))
        inner = max((sub_cost(g).peak_bytes for _, gs in subgraphs(node) for g in gs),
                    default=0) if sub_cost is not None and OPS[node.op].trips else 0
        peak = max(peak, live + _temporary_bytes(node) + inner)
        per_step.append(operations(node, sub_cost))
        for slot in frees:
            o = owner[slot]
            refs[o] -= 1
            if refs[o] == 0 and o not in keep:
                live -= nbytes(nodes[o])
    return Cost(peak + largest, largest, per_step)
