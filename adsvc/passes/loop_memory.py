"""What a differentiated graph's loops store for the backward sweep, and what they
recompute instead: `loop_memory(graph)` (exported as `adsvc.loop_memory`).

A saving loop (the VJP of a loop makes one) stores the carry entering every step
(`save` = 1), or every k-th step (`save` = k > 1: checkpoints, the other carries are
recomputed segment by segment in the backward sweep). A while loop stores up to
`max_iters` carries: the bound is what the memory budget is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from adsvc.ir.graph import Graph, subgraphs
from adsvc.passes.loops import saved_rows, scan_parts
from adsvc_protocol import dtypes


@dataclass(frozen=True)
class LoopMemory:
    """One saving loop: `steps` it runs (a while loop: at most), carries `stored` of them
    (`interval`: every how many steps), `stored_bytes` they take, and `recomputed`
    steps the backward sweep runs again to rebuild the others (the body once per step
    of every segment, the padded tail of the last one included)."""

    op: str
    steps: int
    interval: int
    stored: int
    stored_bytes: int
    recomputed: int
    depth: int  # 0: in the graph itself; 1: inside a loop body or branch; ...


def _bytes(nodes) -> int:
    return sum(math.prod(n.shape) * np.dtype(dtypes.to_numpy(n.dtype)).itemsize for n in nodes)


def loop_memory(graph: Graph, depth: int = 0) -> list[LoopMemory]:
    """The saving loops of `graph` and of its sub-graphs, outermost first."""
    found: list[LoopMemory] = []
    for n in graph.nodes:
        if n.op == "scan" and n.attr("save"):
            p = scan_parts(n.inputs, dict(n.attrs))
            rows = saved_rows(p.length, p.save)
            found.append(LoopMemory("scan", p.length, p.save, rows, rows * _bytes(p.carries),
                                    rows * p.save if p.save > 1 else 0, depth))
        elif n.op == "while_loop" and n.attr("save"):
            m, carries = n.attr("max_iters"), n.inputs[:n.attr("carries")]
            found.append(LoopMemory("while_loop", m, 1, m, m * _bytes(carries), 0, depth))
        for _, gs in subgraphs(n):
            for g in gs:
                found.extend(loop_memory(g, depth + 1))
    return found
