"""Memoized values vs recomputation: count the node evaluations.

A graph shares values: in the ladder

    a[0] = x;   a[k+1] = a[k] * a[k] + a[k]        (K steps; the output is a[K])

every a[k] is used three times. A naive recursive evaluator, value(node) = op(value of
each operand), recomputes a shared node once per path to it: 3**K-fold work for the
ladder. adsvc's plan computes every node exactly once per run and frees a value after
its last use (`adsvc.runtime.plan`); so does a recursive evaluator with a cache.

The gradient graph shares even more: reverse mode's cotangent nodes reuse the primal
values (the values a forward sweep computed and kept, "cached for backprop"), so the
naive evaluator recomputes the primal values for every use by the backward sweep too.
This script counts the evaluations of computing nodes (not inputs, constants) of all
three evaluators on the ladder and on its gradient graph, checks they agree on the
values, and draws a short ladder and its gradient graph with every value.

    python examples/memoization.py [PICTURE_DIR]

Pictures go to PICTURE_DIR, else $ADSVC_PICTURES, else a new temporary directory; SVG
with Graphviz's `dot` installed, else DOT text (draw it with `dot -Tsvg`).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import adsvc
from adsvc.ir.dot import have_graphviz
from adsvc.ir.opdef import OPS
from adsvc.runtime.plan import Plan

K = 6  # the naive evaluator of the gradient graph does ~9x more work per step: keep it small
X = 0.5


def picture_dir() -> Path:
    """The first argument, else $ADSVC_PICTURES, else a new temporary directory."""
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ADSVC_PICTURES")
    path = Path(target) if target else Path(tempfile.mkdtemp(prefix="adsvc-pictures-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def ladder(k: int) -> adsvc.Graph:
    def f(x):
        a = x
        for _ in range(k):
            a = a * a + a
        return a
    return adsvc.trace(f, name=f"ladder{k}")


class Evaluator:
    """Evaluates a node recursively from its operands; with `memo`, each node once."""

    def __init__(self, feeds, memo: bool):
        self.feeds, self.memo, self.cache, self.evaluations = feeds, memo, {}, 0

    def value(self, node):
        if self.memo and node in self.cache:
            return self.cache[node]
        if node.op == "input":
            result = np.asarray(self.feeds[node.name], dtype=np.float64)
        elif node.op == "constant":
            result = node.value
        else:
            args = [self.value(i) for i in node.inputs]
            self.evaluations += 1
            result = OPS[node.op].kernel(dict(node.attrs))(*args)
        if self.memo:
            self.cache[node] = result
        return result


def count(graph: adsvc.Graph, feeds) -> dict:
    """{evaluator: (node evaluations, outputs, seconds)} for the three evaluators."""
    found = {}
    for name, memo in (("naive recursion", False), ("recursion + cache", True)):
        start = time.perf_counter()
        ev = Evaluator(feeds, memo)
        outs = {k: ev.value(n) for k, n in graph.outputs}  # every output on its own
        found[name] = (ev.evaluations, outs, time.perf_counter() - start)
    plan = Plan(graph)
    start = time.perf_counter()
    outs = plan.run(feeds)
    found["adsvc plan"] = (len(plan.steps), outs, time.perf_counter() - start)
    return found


def report(title: str, graph: adsvc.Graph, feeds) -> None:
    found = count(graph, feeds)
    print(f"{title}: {len(graph.nodes)} nodes")
    for name, (evaluations, outs, seconds) in found.items():
        shown = ", ".join(f"{k} = {float(v):.6g}" for k, v in outs.items())
        print(f"  {name:<18} {evaluations:>9,} node evaluations {seconds * 1e3:9.2f} ms"
              f"   {shown}")
    reference = found["adsvc plan"][1]
    for _, outs, _ in found.values():
        assert all(np.allclose(outs[k], reference[k], rtol=1e-12) for k in reference)
    naive, plan = found["naive recursion"][0], found["adsvc plan"][0]
    assert found["recursion + cache"][0] == plan < naive
    print(f"  recomputation costs {naive / plan:,.0f}x the memoized evaluations")


def main() -> None:
    g = ladder(K)
    report(f"the ladder, K = {K}", g, {"x": X})
    grad = adsvc.differentiate(g, "reverse", seed=True)
    report(f"its gradient graph (value and d a[{K}]/dx)", grad, {"x": X})
    out = picture_dir()
    ext = ".svg" if have_graphviz() else ".dot"
    small = ladder(3)
    paths = [out / f"ladder3{ext}", out / f"ladder3_gradient{ext}"]
    adsvc.explain(small, None, x=X).render(paths[0])
    adsvc.explain(small, "reverse", x=X).render(paths[1])
    print("pictures (K = 3): " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
