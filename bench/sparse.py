"""Sparse derivatives (issue 13): the chained Rosenbrock Hessian and a banded residual
Jacobian at n = 10^5 — colors, one-time setup (pattern + coloring + compile), the time
of one sparse derivative, and its ratio to one gradient / one function evaluation; the
same problems in CasADi (SX and MX) in the same process when `casadi` is installed
(`pip install casadi`); peak memory of one sparse Hessian at n/10 and n (linear in n?).
Prints medians of repeated runs (a shared machine: expect noise).

    python bench/sparse.py [--n 100000] [--repeat 7] [--no-sdk]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from functools import partial

import numpy as np

import adsvc as ad


def rosenbrock(x):
    """Chained Rosenbrock: sum of 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2 (tridiagonal H)."""
    return ad.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def banded(x, zeros=None, half=2):
    """A banded residual, 2·half + 1 = 5 diagonals: r_i = x[i-2]·x[i+2] + sum over k of
    (k + 1)·sin(x[i-2+k]) (zero padding at the ends). Works on adsvc nodes; with `zeros`
    (a function of a length) on CasADi symbols."""
    n = x.shape[0]
    xp = ad.pad(x, (half,), (half,)) if zeros is None else _vcat(zeros(half), x, zeros(half))
    sin = ad.sin if zeros is None else _casadi().sin
    r = xp[0:n] * xp[2 * half:2 * half + n]
    for k in range(1, 2 * half):
        r = r + sin(xp[k:k + n]) * (k + 1.0)
    return r


def _casadi():
    import casadi

    return casadi


def _vcat(*parts):
    return _casadi().vertcat(*parts)


def median(fn, repeat: int) -> float:
    """Median wall-clock seconds of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def adsvc_rows(c, label: str, n: int, repeat: int) -> list[dict]:
    """The two problems with client `c`."""
    x = np.random.default_rng(0).standard_normal(n)
    g = ad.trace(rosenbrock, x=ad.f64(n))
    s, setup = timed(lambda: (c.sparsity(g, hessian=True),
                              c.hessian(g, sparse=True, x=x))[0])
    h = median(lambda: c.hessian(g, sparse=True, x=x), repeat)
    grad = median(lambda: c.grad(g, x=x), repeat)
    diag = median(lambda: c.hessian_diag(g, x=x), repeat)
    rows = [dict(problem="Rosenbrock Hessian", system=label, colors=s.colors()["star"],
                 setup=setup, time=h, base=grad, base_name="gradient"),
            dict(problem="Rosenbrock diag(H)", system=label, colors=s.colors()["diagonal"],
                 setup=None, time=diag, base=grad, base_name="gradient")]
    b = ad.trace(banded, x=ad.f64(n))
    s, setup = timed(lambda: (c.sparsity(b), c.jacobian(b, sparse=True, x=x))[0])
    j = median(lambda: c.jacobian(b, sparse=True, x=x), repeat)
    f = median(lambda: c.evaluate(b, x=x), repeat)
    rows.append(dict(problem="banded Jacobian", system=label, colors=s.colors()[s.mode],
                     setup=setup, time=j, base=f, base_name="f eval"))
    return rows


def casadi_rows(n: int, repeat: int) -> list[dict]:
    """The same problems in CasADi, SX and MX graphs (setup = building the symbolic
    derivative and its Function, which computes the pattern and coloring)."""
    ca = _casadi()
    x0 = np.random.default_rng(0).standard_normal(n)
    rows = []
    for kind in ("SX", "MX"):
        sym = getattr(ca, kind)

        def build_h(sym=sym):
            x = sym.sym("x", n)
            f = ca.sum1(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
            hess, grad = ca.hessian(f, x)
            return (ca.Function("H", [x], [hess]), ca.Function("g", [x], [grad]),
                    hess.sparsity().star_coloring().size2())

        (fh, fg, colors), setup = timed(build_h)
        rows.append(dict(problem="Rosenbrock Hessian", system=f"CasADi {kind}", colors=colors,
                         setup=setup, time=median(partial(fh, x0), repeat),
                         base=median(partial(fg, x0), repeat), base_name="gradient"))

        def build_j(sym=sym):
            x = sym.sym("x", n)
            r = banded(x, zeros=lambda k, sym=sym: sym(k, 1))
            jac = ca.jacobian(r, x)
            return (ca.Function("J", [x], [jac]), ca.Function("r", [x], [r]),
                    jac.sparsity().uni_coloring().size2())

        (fj, fr, colors), setup = timed(build_j)
        rows.append(dict(problem="banded Jacobian", system=f"CasADi {kind}", colors=colors,
                         setup=setup, time=median(partial(fj, x0), repeat),
                         base=median(partial(fr, x0), repeat), base_name="f eval"))
    return rows


def peak_memory(n: int) -> int:
    """Peak bytes traced while computing one sparse Hessian of Rosenbrock (cached)."""
    c = ad.local()
    g = ad.trace(rosenbrock, x=ad.f64(n))
    x = np.random.default_rng(0).standard_normal(n)
    c.hessian(g, sparse=True, x=x)
    tracemalloc.start()
    c.hessian(g, sparse=True, x=x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def sdk_rows(n: int, repeat: int) -> list[dict]:
    """The adsvc problems through the SDK against an in-process server on 127.0.0.1."""
    from adsvc.server.app import create_server
    from adsvc.server.config import ServerConfig

    server, port = create_server("127.0.0.1:0", ServerConfig())
    server.start()
    try:
        with ad.connect(f"127.0.0.1:{port}", timeout=300) as c:
            return adsvc_rows(c, "adsvc SDK", n, repeat)
    finally:
        server.stop(0).wait()


def print_table(rows: list[dict], n: int) -> None:
    print(f"\nn = {n}; times are medians; 'ratio' = sparse derivative / one {{gradient | f "
          "eval}} of the same system; 'per color' = ratio / colors")
    print("| problem | system | colors | setup s | time ms | base ms | ratio | per color |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["time"] / r["base"]
        setup = "-" if r["setup"] is None else f"{r['setup']:.2f}"
        print(f"| {r['problem']} | {r['system']} | {r['colors']} | {setup} | "
              f"{r['time'] * 1e3:.2f} | {r['base'] * 1e3:.2f} ({r['base_name']}) | "
              f"{ratio:.1f}x | {ratio / max(r['colors'], 1):.2f}x |")


def main() -> None:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--no-sdk", action="store_true", help="skip the SDK-through-server rows")
    args = p.parse_args()
    rows = adsvc_rows(ad.local(), "adsvc local", args.n, args.repeat)
    if not args.no_sdk:
        rows += sdk_rows(args.n, args.repeat)
    try:
        rows += casadi_rows(args.n, args.repeat)
    except ImportError:
        print("CasADi is not installed (pip install casadi): no comparison")
    print_table(rows, args.n)
    small, big = peak_memory(args.n // 10), peak_memory(args.n)
    print(f"\npeak traced memory of one sparse Hessian: n={args.n // 10}: {small / 2**20:.1f} "
          f"MiB, n={args.n}: {big / 2**20:.1f} MiB (x{big / small:.1f} for 10x n)")


if __name__ == "__main__":
    main()
