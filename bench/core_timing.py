"""Time to differentiate and to evaluate the gradient, both modes: the seed example and
a random scalar graph of N nodes. Prints medians of repeated runs.

    python bench/core_timing.py [--nodes 10000] [--inputs 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np

import adsvc as ad
from adsvc.passes.pipeline import compile_graph
from adsvc.runtime.plan import Plan


def random_scalar_graph(n_nodes: int, n_inputs: int, seed: int = 0):
    """A traced random scalar DAG of about `n_nodes` nodes over `n_inputs` float64
    scalars x0, x1, ... ending in one scalar output; returns (graph, input names)."""
    rng = np.random.default_rng(seed)
    names = [f"x{i}" for i in range(n_inputs)]
    unary = [ad.sin, ad.cos, ad.tanh, lambda a: a * 0.5]
    binary = [ad.add, ad.sub, ad.mul]

    def fn(**xs):
        vals = [xs[n] for n in names]
        # each new node uses the previous one, so every node reaches the output
        while len(vals) < n_nodes:
            j = rng.integers(max(0, len(vals) - 50), len(vals))
            if rng.random() < 0.5:
                vals.append(unary[rng.integers(len(unary))](vals[-1]))
            else:
                vals.append(binary[rng.integers(len(binary))](vals[-1], vals[j]))
        return ad.tanh(vals[-1])

    return ad.trace(fn, **{n: ad.f64() for n in names}), names


def run_all(plan, runs):
    for feeds in runs:
        plan.run(feeds)


def median_time(fn, repeat):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def report(label, g, feeds, repeat):
    n = len(g.nodes)
    plan = Plan(g)
    t_eval = median_time(lambda: plan.run(feeds), repeat)
    print(f"{label}: {n} nodes; evaluate f: {t_eval * 1e3:.2f} ms")
    for mode in ("reverse", "forward"):
        modes, seed = (mode,), mode == "reverse"
        t_diff = median_time(partial(compile_graph, g, modes, None, seed), repeat)
        d = compile_graph(g, modes, None, seed)
        if mode == "reverse":
            runs = [feeds]
        else:  # one sweep per input direction
            zero = {f"tangent:{k}": 0.0 for k in feeds}
            runs = [{**feeds, **zero, f"tangent:{k}": 1.0} for k in feeds]
        t_grad = median_time(partial(run_all, Plan(d), runs), repeat)
        note = f"{len(runs)} sweep(s)"
        print(f"  {mode:8s}: differentiate {t_diff * 1e3:8.2f} ms -> {len(d.nodes)} nodes; "
              f"gradient evaluation {t_grad * 1e3:8.2f} ms ({note}; "
              f"{t_grad / t_eval:.1f}x f)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--inputs", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    seed = ad.trace(lambda x, y: x * x + x * y + 2)
    report("seed example", seed, {"x": 3.0, "y": 4.0}, a.repeat)
    g, names = random_scalar_graph(a.nodes, a.inputs)
    report("random scalar graph", g, {n: 0.1 * (i + 1) for i, n in enumerate(names)},
           a.repeat)


if __name__ == "__main__":
    main()
