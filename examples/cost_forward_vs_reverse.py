"""The cost argument: a gradient of n inputs takes n forward sweeps, or one reverse sweep.

    s = 0;  for i in 0..n-1:  s = tanh(s * x[i] + x[(i+1) % n]);   f = s * s

(a Python loop, unrolled into the graph by tracing). Forward mode gets ∂f/∂x[i] from the
sweep that seeds x[i]'s tangent with 1: n sweeps of the forward-mode graph for the whole
gradient. Reverse mode gets every ∂f/∂x[i] from one backward sweep of the gradient
graph. This script counts the node evaluations of both and times them (compiled once,
then evaluated), for n = 200, and checks the two gradients agree. It draws both graphs
for n = 3, with values: in the forward picture each tangent node carries one value per
sweep (three), in the reverse picture each node one value.

    python examples/cost_forward_vs_reverse.py [PICTURE_DIR]

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

N = 200


def picture_dir() -> Path:
    """The first argument, else $ADSVC_PICTURES, else a new temporary directory."""
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ADSVC_PICTURES")
    path = Path(target) if target else Path(tempfile.mkdtemp(prefix="adsvc-pictures-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def chain(n: int) -> adsvc.Graph:
    """The traced loop of the module docstring, with inputs x0 ... x{n-1}."""
    def f(**x):
        s = 0.0
        for i in range(n):
            s = adsvc.tanh(s * x[f"x{i}"] + x[f"x{(i + 1) % n}"])
        return s * s
    return adsvc.trace(f, name=f"chain{n}", **{f"x{i}": adsvc.f64() for i in range(n)})


def steps(graph: adsvc.Graph) -> int:
    """Node evaluations of one sweep: the nodes that compute (not inputs, constants)."""
    return sum(1 for n in graph.nodes if n.op not in ("input", "constant"))


def best_time(fn, repeat: int = 3) -> float:
    fn()  # compile (cached) and warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(c, g, xs) -> None:
    per_fwd = steps(c.differentiate(g, "forward"))
    per_rev = steps(c.differentiate(g, "reverse", seed=True))
    t_f = best_time(lambda: c.evaluate(g, xs))
    t_fwd = best_time(lambda: c.grad(g, mode="forward", inputs=xs))
    t_rev = best_time(lambda: c.grad(g, mode="reverse", inputs=xs))
    fwd = c.grad(g, mode="forward", inputs=xs)
    rev = c.grad(g, mode="reverse", inputs=xs)
    assert all(np.allclose(fwd[k], rev[k], rtol=1e-12, atol=0) for k in xs)
    n = len(xs)
    print(f"f of n = {n} inputs: {steps(g):,} computing nodes, evaluated in "
          f"{t_f * 1e3:.2f} ms")
    print(f"{'':10}{'sweeps':>8}{'nodes per sweep':>17}{'node evaluations':>18}"
          f"{'time':>11}{'x f':>8}")
    for name, sweeps, per, t in (("forward", n, per_fwd, t_fwd),
                                 ("reverse", 1, per_rev, t_rev)):
        print(f"{name:10}{sweeps:>8}{per:>17,}{sweeps * per:>18,}{t * 1e3:>8.2f} ms"
              f"{t / t_f:>8.1f}")
    print(f"reverse mode does {n * per_fwd / per_rev:.0f}x fewer node evaluations and is "
          f"{t_fwd / t_rev:.0f}x faster here; the gradients agree "
          f"(∂f/∂x0 = {float(rev['x0']):.6g})")
    assert n * per_fwd > 10 * per_rev


def main() -> None:
    rng = np.random.default_rng(0)
    g = chain(N)
    xs = {f"x{i}": float(v) for i, v in enumerate(rng.uniform(-1, 1, N))}
    with adsvc.local() as c:
        measure(c, g, xs)
    out = picture_dir()
    ext = ".svg" if have_graphviz() else ".dot"
    small = chain(3)
    at = {"x0": 0.5, "x1": -0.25, "x2": 1.0}
    for mode in ("forward", "reverse"):
        path = out / f"chain3_{mode}{ext}"
        adsvc.explain(small, mode, inputs=at).render(path)
        print(f"picture ({mode}, n = 3): {path}")


if __name__ == "__main__":
    main()
