"""Loops (issue 9): programs written with adsvc.scan / fori_loop / while_loop against the
same program unrolled (a Python for loop inside adsvc.trace) and run as a host loop
(Python calls a compiled one-step graph per step through adsvc.local(); the gradient is
chained by hand with the step's VJP, last step first), and against JAX (jit +
lax.scan) and PyTorch eager in the same process when they are importable.

1. graph size (top-level nodes of the traced graph and of its reverse derivative, and
   with the loop bodies counted) vs step count: constant for the loops, linear unrolled;
2. compile time (trace + differentiate + first call) and time per call (evaluate and
   value_and_grad) of an RK4 integrator of a nonlinear ODE over a small and a large
   vectorised state, and of an RNN over a sequence;
3. memory of a long scan's gradient with checkpoint=False / True / None: the plan's
   predicted peak, the measured peak RSS (a child process) and tracemalloc peak, the
   time ratio and what checkpointing costs in forward evaluations;
4. while_loop reverse vs fori_loop / unrolled / host loop with the same trip count.

Times are medians of repeated calls, the systems of one problem run round-robin (a
shared machine: expect noise; the spread is printed).

    python bench/loops.py [--quick] [--repeat 5] [--only 1234]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial

import numpy as np

import adsvc as ad
from adsvc.runtime.plan import Plan

H = 0.01  # the integrators' step
SIZES = {  # full run, then --quick
    "graph_steps": ((10, 100, 1000, 10_000), (10, 100, 300)),
    "rk4": ((100, (10, 100_000)), (50, (10, 1_000))),
    "rnn": ((200, 64, 32), (50, 16, 8)),
    "memory": ((4096, 20_000), (256, 2_000)),
    "while": ((10_000,), (100,)),
}


# -- the programs, written once for adsvc nodes, torch tensors and jax arrays ------------------
def ode_rhs(y, th, sin):
    """dy/dt = th·sin(y) − 0.1·y³ (elementwise, nonlinear)."""
    return th * sin(y) - 0.1 * y * y * y


def euler_step(y, th, sin):
    """One explicit Euler step of `ode_rhs`."""
    return y + H * ode_rhs(y, th, sin)


def cubic_step(y, th, sin=None):
    """A cheap nonlinear step (the memory benchmark's: no transcendental, whose numpy
    kernels are 50x slower than a product): y + H·(th·y − y³)."""
    return y + H * (th * y - y * y * y)


def rk4_step(y, th, sin):
    """One classical Runge-Kutta step of `ode_rhs`."""
    k1 = ode_rhs(y, th, sin)
    k2 = ode_rhs(y + (H / 2) * k1, th, sin)
    k3 = ode_rhs(y + (H / 2) * k2, th, sin)
    k4 = ode_rhs(y + H * k3, th, sin)
    return y + (H / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def rnn_step(h, x, W, U, b, tanh):
    """h' = tanh(W h + U x + b)."""
    return tanh(W @ h + U @ x + b)


def ode_program(step, n: int, kind: str, checkpoint=None) -> Callable:
    """loss(y, th) = sum(y_n²) after `n` steps, the loop written as `kind`: "scan",
    "fori_loop" or "unrolled"."""
    def loss(y, th):
        def body(c):
            return step(c, th, ad.sin)
        if kind == "scan":
            y, _ = ad.scan(lambda c, _: (body(c), None), y, length=n, checkpoint=checkpoint)
        elif kind == "fori_loop":
            y = ad.fori_loop(0, n, lambda i, c: body(c), y, checkpoint=checkpoint)
        else:
            for _ in range(n):
                y = body(y)
        return ad.sum(y * y)
    return loss


def rnn_program(n: int, kind: str) -> Callable:
    """loss(h0, xs, W, U, b) = Σ_t sum(h_t²) over the `n` steps, as "scan" or "unrolled"."""
    def loss(h0, xs, W, U, b):
        if kind == "scan":
            def body(h, x):
                h = rnn_step(h, x, W, U, b, ad.tanh)
                return h, ad.sum(h * h)
            _, ys = ad.scan(body, h0, xs)
            return ad.sum(ys)
        h, total = h0, 0.0
        for t in range(n):
            h = rnn_step(h, xs[t], W, U, b, ad.tanh)
            total = total + ad.sum(h * h)
        return total
    return loss


def fixed_point(x, th, cos):
    """The while-loop body: x ← cos(th·x)."""
    return cos(th * x)


TOL = 1e-10


def while_program(kind: str, trips: int, max_iters: int = 0, stop: bool = False) -> Callable:
    """loss(x, th) = sum(x*) for the fixed point x = cos(th·x), iterated while the step
    is over TOL ("while_loop", at most `max_iters`; `stop`: the step size carried under
    stop_gradient) or exactly `trips` times."""
    def loss(x, th):
        if kind == "while_loop":
            def body(c):
                xn = fixed_point(c[0], th, ad.cos)
                err = ad.max(ad.abs(xn - c[0]))
                return xn, ad.stop_gradient(err) if stop else err
            x, _ = ad.while_loop(lambda c: c[1] > TOL, body,
                                 (x, ad.constant(np.float64(1.0))), max_iters=max_iters)
        elif kind == "fori_loop":
            x = ad.fori_loop(0, trips, lambda i, c: fixed_point(c, th, ad.cos), x)
        else:
            for _ in range(trips):
                x = fixed_point(x, th, ad.cos)
        return ad.sum(x)
    return loss


def numpy_trips(x, th) -> int:
    """How many steps the while loop takes (the same float64 operations in numpy)."""
    for k in range(1, 100_000):
        xn = np.cos(th * x)
        if np.max(np.abs(xn - x)) <= TOL:
            return k
        x = xn
    raise RuntimeError("the fixed point iteration does not converge")


# -- measuring ---------------------------------------------------------------------------------
BUDGET = [1.5]  # seconds of rounds past `repeat` per measurement (--quick: 0.2)


def interleaved(fns: dict[str, Callable], repeat: int,
                warm: bool = False) -> tuple[dict[str, list[float]], dict]:
    """Seconds of calls of each function, round-robin (a noisy neighbour then slows every
    system alike): `repeat` rounds, more while the rounds so far took under BUDGET
    seconds (at most 8 x `repeat`), after one untimed call each if `warm`. Returns the
    times and each function's last result."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    last = {k: fn() for k, fn in fns.items()} if warm else {}
    budget = BUDGET[0]
    begin, rounds = time.perf_counter(), 0
    while rounds < repeat or (rounds < 8 * repeat
                              and time.perf_counter() - begin < budget):
        rounds += 1
        for k, fn in fns.items():
            start = time.perf_counter()
            last[k] = fn()
            times[k].append(time.perf_counter() - start)
    return times, last


def timed(fn):
    """(fn(), seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def med(ts) -> float:
    """Median of a list of seconds."""
    return statistics.median(ts)


def fmt(ts, unit: float = 1e-3) -> str:
    """'median (spread)' in ms (or `unit`), spread = (max − min) / median."""
    if ts is None:
        return "-"
    m = med(ts)
    spread = f" ({(max(ts) - min(ts)) / m:.0%})" if len(ts) > 1 and m > 0 else ""
    return f"{m / unit:.3g}{spread}"


def all_nodes(g, seen: set | None = None) -> int:
    """Nodes of `g` plus those of every distinct sub-graph (loop bodies), recursively."""
    seen = set() if seen is None else seen
    total = len(g.nodes)
    for n in g.nodes:
        for _, v in n.attrs:
            subs = [v] if isinstance(v, ad.Graph) else (
                [s for s in v if isinstance(s, ad.Graph)] if isinstance(v, tuple) else [])
            for s in subs:
                if id(s) not in seen:
                    seen.add(id(s))
                    total += all_nodes(s, seen)
    return total


def node_counts(g, seed: bool) -> Callable[[], tuple[int, int]]:
    """Later (not in the compile time): nodes of `g` and of its reverse derivative."""
    return lambda: (len(g.nodes), len(ad.differentiate(g, "reverse", seed=seed).nodes))


def rel_err(got: dict, ref: dict) -> float:
    """max |got − ref| / max |ref| over every gradient."""
    scale = max(float(np.max(np.abs(v))) for v in ref.values()) or 1.0
    return max(float(np.max(np.abs(np.asarray(got[k]) - v))) for k, v in ref.items()) / scale


# -- the systems: each setup returns (value_and_grad, evaluate, node counts) -------------------
def adsvc_system(fn: Callable, specs: dict, feeds: dict, client: Callable = ad.local):
    """A traced program: compile = trace + differentiate + first call (a fresh client)."""
    def setup():
        c = client()
        g = ad.trace(fn, **specs)
        c.value_and_grad(g, **feeds)
        return (lambda: c.value_and_grad(g, **feeds), lambda: c.evaluate(g, **feeds),
                node_counts(g, True))
    return setup


def host_system(step: Callable, specs: dict, carry: str, row: str | None, done: Callable,
                feeds: dict, loss: str):
    """The loop in Python over a compiled one-step graph (inputs `specs`, output the new
    `carry`; `row`, if any, is the input fed row t of feeds[row]) until `done(carries)`;
    `loss` is "sumsq_final", "sumsq_all" or "sum_final" of the carries. The gradient is
    chained by hand: the step's VJP (adsvc.local().vjp), last step first."""
    def setup():
        c = ad.local()
        g = ad.trace(step, **specs)
        consts = {k: v for k, v in feeds.items() if k not in (carry, row)}

        def step_feeds(t, cs):
            f = {carry: cs[t], **consts}
            if row is not None:
                f[row] = feeds[row][t]
            return f

        def forward():
            cs = [np.asarray(feeds[carry], float)]
            while not done(cs):
                cs.append(c.evaluate(g, step_feeds(len(cs) - 1, cs))["out"])
            return cs

        def value_and_grad():
            cs = forward()
            last = cs[-1]
            value = (sum(float(np.sum(v * v)) for v in cs[1:]) if loss == "sumsq_all"
                     else float(np.sum(last * last)) if loss == "sumsq_final"
                     else float(np.sum(last)))
            bar = np.ones_like(last) if loss == "sum_final" else 2 * last
            grads = {k: 0.0 for k in consts}
            rows = []
            for t in reversed(range(len(cs) - 1)):
                _, gr = c.vjp(g, step_feeds(t, cs), {"out": bar})
                for k in consts:
                    grads[k] = grads[k] + gr[k]
                if row is not None:
                    rows.append(gr[row])
                bar = gr[carry] + (2 * cs[t] if loss == "sumsq_all" and t > 0 else 0)
            grads[carry] = bar
            if row is not None:
                grads[row] = np.stack(rows[::-1])
            return value, grads
        value_and_grad()
        return value_and_grad, forward, node_counts(g, False)
    return setup


def fixed_steps(n: int) -> Callable:
    """A host-loop stop rule: after exactly `n` steps."""
    return lambda cs: len(cs) > n


def converged(cs) -> bool:
    """A host-loop stop rule: the while loop's (its condition computed in numpy)."""
    return len(cs) >= 2 and bool(np.max(np.abs(cs[-1] - cs[-2])) <= TOL)


def torch_system(program: Callable, feeds: dict):
    """PyTorch eager (float64): `program(torch, **tensors)` -> scalar loss; backward()."""
    import torch

    torch.set_num_threads(1)  # as numpy; 2 threads on a busy 2-core machine: up to 20x slow

    def value_and_grad():
        ts = {k: torch.tensor(np.asarray(v, float), requires_grad=True) for k, v in
              feeds.items()}
        loss = program(torch, **ts)
        loss.backward()
        return loss.item(), {k: t.grad.numpy() for k, t in ts.items()}

    def evaluate():
        with torch.no_grad():
            return program(torch, **{k: torch.tensor(np.asarray(v, float))
                                     for k, v in feeds.items()}).item()

    def setup():
        value_and_grad()
        return value_and_grad, evaluate, None
    return setup


def jax_system(program: Callable, feeds: dict):
    """JAX: jit(value_and_grad(program)) with float64; `program(jnp, lax, **arrays)`."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax import lax

    names = list(feeds)
    arrays = [jnp.asarray(np.asarray(feeds[k], float)) for k in names]

    def loss(*a):
        return program(jnp, lax, **dict(zip(names, a)))
    vg = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names)))))
    ev = jax.jit(loss)

    def value_and_grad():
        v, gs = jax.block_until_ready(vg(*arrays))
        return float(v), {k: np.asarray(x) for k, x in zip(names, gs)}

    def setup():
        value_and_grad()
        jax.block_until_ready(ev(*arrays))
        return value_and_grad, lambda: jax.block_until_ready(ev(*arrays)), None
    return setup


def peers(torch_program, jax_program, feeds: dict) -> dict:
    """The PyTorch and JAX systems that can be imported (a note for those that cannot)."""
    out = {}
    for label, make, program in (("PyTorch eager", torch_system, torch_program),
                                 ("JAX jit + lax.scan", jax_system, jax_program)):
        if program is None:
            continue
        try:
            out[label] = make(program, feeds)
        except ImportError as e:
            NOTES.add(f"{label}: not importable ({e.name}), no comparison")
        except Exception as e:  # an optional peer that fails is a note, not a crash
            NOTES.add(f"{label} failed to set up: {type(e).__name__}: {e}")
    return out


NOTES: set[str] = set()


def run_problem(problem: str, systems: dict, repeat: int, ref: str) -> list[dict]:
    """Compile each system (timed), then time evaluate and value_and_grad round-robin;
    each row also has the gradient's relative error against system `ref`."""
    built, rows = {}, []
    for name, setup in systems.items():
        try:
            built[name], compile_s = timed(setup)
        except Exception as e:  # an optional peer that fails is a note, not a crash
            if name.startswith(("JAX", "PyTorch")):
                NOTES.add(f"{name} failed on {problem}: {type(e).__name__}: {e}")
                continue
            raise
        rows.append(dict(problem=problem, system=name, compile=compile_s))
    vg, out = interleaved({k: b[0] for k, b in built.items()}, repeat)
    ev, _ = interleaved({k: b[1] for k, b in built.items()}, repeat, warm=True)
    for r in rows:
        name, nodes = r["system"], built[r["system"]][2]
        r.update(vg=vg[name], ev=ev[name], err=rel_err(out[name][1], out[ref][1]))
        if nodes is not None:
            r["nodes"] = nodes()
    return rows


def print_rows(title: str, rows: list[dict], base: str) -> None:
    """A markdown table of `run_problem` rows; ratios against system `base`."""
    print(f"\n### {title}\n")
    print("compile = trace + differentiate + the first value_and_grad on a fresh "
          "adsvc.local() (host loop: trace the step, first call compiles its forward and "
          "VJP; PyTorch: the first call; JAX: jit + first call). nodes: of the traced graph "
          "and of its reverse derivative (host loop: of the one-step graph and its VJP)\n")
    print("| problem | system | nodes g / ∇g | compile s | evaluate ms | value_and_grad ms "
          f"| v&g / eval | v&g vs {base} | grad rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for problem in dict.fromkeys(r["problem"] for r in rows):
        group = [r for r in rows if r["problem"] == problem]
        b = next((r for r in group if r["system"] == base), group[0])
        for r in group:
            nodes = "{} / {}".format(*r["nodes"]) if "nodes" in r else "-"
            print(f"| {problem} | {r['system']} | {nodes} | {r['compile']:.3g} | "
                  f"{fmt(r['ev'])} | {fmt(r['vg'])} | {med(r['vg']) / med(r['ev']):.1f} | "
                  f"{med(r['vg']) / med(b['vg']):.2f}x | {r['err']:.1e} |")


# -- 1. graph size vs step count --------------------------------------------------------------
def graph_sizes(steps, repeat: int) -> None:
    """Node counts and trace + differentiate time of the Euler loop (state 10) as scan,
    fori_loop and unrolled, and the time of one gradient evaluation (Plan.run of the
    differentiated graph; the host loop through adsvc.local())."""
    print("\n### 1. Graph size vs step count (Euler steps of the ODE, state of 10)\n")
    print("nodes: top-level nodes of the traced graph g and of differentiate(g, 'reverse', "
          "seed=True); '+bodies': with the loop bodies' nodes. times: ms, median (spread); "
          "v&g = Plan(∇g).run(feeds)\n")
    print("| n | scan g / ∇g (+bodies) | fori_loop ∇g (+bodies) | unrolled g / ∇g | "
          "trace+diff scan ms | trace+diff unrolled ms | v&g scan ms | v&g unrolled ms | "
          "v&g host loop ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    feeds = {"y": np.linspace(-1, 1, 10), "th": np.float64(0.5)}
    specs = {"y": ad.f64(10), "th": ad.f64()}
    for n in steps:
        cells, diff_t = {}, {}
        for kind in ("scan", "fori_loop", "unrolled"):
            def build(kind=kind, n=n):
                g = ad.trace(ode_program(euler_step, n, kind), **specs)
                return g, ad.differentiate(g, "reverse", seed=True)
            (g, d), t = timed(build)
            cells[kind], diff_t[kind] = (g, d), t
        reps = repeat if n <= 1000 else max(2, repeat // 2)
        built = {k: partial(Plan(cells[k][1]).run, feeds) for k in ("scan", "unrolled")}
        built["host"] = host_system(lambda y, th: euler_step(y, th, ad.sin), specs, "y", None,
                                    fixed_steps(n), feeds, "sumsq_final")()[0]
        vg, _ = interleaved(built, reps, warm=True)
        (gs, ds), (_, dfo), (gu, du) = cells["scan"], cells["fori_loop"], cells["unrolled"]
        print(f"| {n} | {len(gs.nodes)} / {len(ds.nodes)} ({all_nodes(ds)}) | "
              f"{len(dfo.nodes)} ({all_nodes(dfo)}) | {len(gu.nodes)} / {len(du.nodes)} | "
              f"{diff_t['scan'] * 1e3:.3g} | {diff_t['unrolled'] * 1e3:.3g} | "
              f"{fmt(vg['scan'])} | {fmt(vg['unrolled'])} | {fmt(vg['host'])} |")


# -- 2. RK4 and RNN: compile time and time per call ---------------------------------------------
def rk4_rows(n: int, sizes, repeat: int) -> list[dict]:
    """RK4 over `n` steps of the ODE for each state size: scan, fori_loop, unrolled, host
    loop, PyTorch, JAX."""
    rows = []
    for m in sizes:
        feeds = {"y": np.linspace(-1.0, 1.0, m), "th": np.float64(0.5)}
        specs = {"y": ad.f64(m), "th": ad.f64()}
        systems = {k: adsvc_system(ode_program(rk4_step, n, k), specs, feeds)
                   for k in ("scan", "fori_loop", "unrolled")}
        systems["host loop"] = host_system(lambda y, th: rk4_step(y, th, ad.sin), specs, "y",
                                           None, fixed_steps(n), feeds, "sumsq_final")

        def torch_ode(torch, y, th):
            for _ in range(n):
                y = rk4_step(y, th, torch.sin)
            return (y * y).sum()

        def jax_ode(jnp, lax, y, th):
            y, _ = lax.scan(lambda c, _: (rk4_step(c, th, jnp.sin), None), y, None, length=n)
            return jnp.sum(y * y)
        systems.update(peers(torch_ode, jax_ode, feeds))
        reps = repeat if m <= 10_000 else max(3, repeat // 2)
        rows += run_problem(f"RK4 {n} steps, state {m:,}", systems, reps, "unrolled")
    return rows


def rnn_rows(n: int, hidden: int, width: int, repeat: int) -> list[dict]:
    """An RNN h' = tanh(W h + U x_t + b) over `n` steps, loss Σ_t |h_t|²: scan (over xs),
    unrolled, host loop, PyTorch, JAX."""
    rng = np.random.default_rng(0)
    feeds = {"h0": rng.standard_normal(hidden) * 0.1,
             "xs": rng.standard_normal((n, width)),
             "W": rng.standard_normal((hidden, hidden)) * (0.9 / np.sqrt(hidden)),
             "U": rng.standard_normal((hidden, width)) / np.sqrt(width),
             "b": rng.standard_normal(hidden) * 0.1}
    specs = {k: ad.f64(*v.shape) for k, v in feeds.items()}
    systems = {k: adsvc_system(rnn_program(n, k), specs, feeds) for k in ("scan", "unrolled")}
    step_specs = {**specs, "xs": ad.f64(width)}
    systems["host loop"] = host_system(
        lambda h0, xs, W, U, b: rnn_step(h0, xs, W, U, b, ad.tanh), step_specs, "h0", "xs",
        fixed_steps(n), feeds, "sumsq_all")

    def torch_rnn(torch, h0, xs, W, U, b):
        h, total = h0, 0.0
        for t in range(n):
            h = rnn_step(h, xs[t], W, U, b, torch.tanh)
            total = total + (h * h).sum()
        return total

    def jax_rnn(jnp, lax, h0, xs, W, U, b):
        def body(h, x):
            h = rnn_step(h, x, W, U, b, jnp.tanh)
            return h, jnp.sum(h * h)
        return jnp.sum(lax.scan(body, h0, xs)[1])
    systems.update(peers(torch_rnn, jax_rnn, feeds))
    return run_problem(f"RNN {n} steps, hidden {hidden}, input {width}", systems, repeat,
                       "unrolled")


# -- 3. memory with checkpointing ------------------------------------------------------------
CHECKPOINTS = (("False (store all)", False, None), ("True (every ⌈√n⌉-th)", True, None),
               ("None, default budget", None, None), ("None, budget ½ store-all", None, 0.5))


def stored_rows(d) -> int:
    """Carries the forward scan of a differentiated graph stores (its `save` rows)."""
    return sum(-(-n.attr("length") // n.attr("save")) for n in d.nodes
               if n.op == "scan" and n.attr("save"))


def memory_child(spec: str) -> None:
    """In a child process: the peak RSS over the baseline and the tracemalloc peak of one
    gradient call (the same call) of the memory scan (compiled before either is measured)."""
    a = json.loads(spec)
    n, m = a["n"], a["m"]
    c = ad.local(max_eval_bytes=a["budget"])
    g = ad.trace(ode_program(cubic_step, n, "scan", a["checkpoint"]), y=ad.f64(m),
                 th=ad.f64())
    feeds = {"y": np.linspace(-1.0, 1.0, m), "th": np.float64(0.5)}
    c.differentiate(g, "reverse", seed=True)  # compiled and planned, nothing run
    rss0 = _status_bytes("VmRSS")
    tracemalloc.start()
    c.value_and_grad(g, **feeds)
    tm_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_peak = _status_bytes("VmHWM") - rss0
    print(json.dumps({"rss": rss_peak, "tracemalloc": tm_peak}))


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM (peak) of this process. Not ru_maxrss: a child started by vfork +
    exec inherits its parent's peak there."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def measured_memory(n: int, m: int, checkpoint, budget) -> dict:
    """`memory_child` in a fresh interpreter (so each peak RSS is its own)."""
    spec = json.dumps({"n": n, "m": m, "checkpoint": checkpoint, "budget": budget})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", spec],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_section(n: int, m: int, repeat: int) -> None:
    """A scan of `n` Euler steps over `m` float64: the gradient's memory and time for
    each checkpoint setting."""
    feeds = {"y": np.linspace(-1.0, 1.0, m), "th": np.float64(0.5)}
    specs = {"y": ad.f64(m), "th": ad.f64()}
    systems, info = {}, {}
    for label, ck, share in CHECKPOINTS:
        budget = None if share is None else int(share * n * m * 8)

        def client(budget=budget):
            return ad.local(max_eval_bytes=budget)
        fn = ode_program(cubic_step, n, "scan", ck)
        c = client()
        d = c.differentiate(ad.trace(fn, **specs), "reverse", seed=True)
        info[label] = dict(rows=stored_rows(d), peak=Plan(d).cost.peak_bytes,
                           **measured_memory(n, m, ck, budget))
        systems[label] = adsvc_system(fn, specs, feeds, client)
    rows = run_problem("memory", systems, repeat, "False (store all)")
    carry = m * 8
    print(f"\n### 3. Memory of a scan's gradient: {n} steps y + H·(th·y − y³) over {m:,} float64 "
          f"({carry / 2**10:.0f} KiB a carry, {n * carry / 2**20:.0f} MiB if all are "
          "stored)\n")
    print("predicted = Plan(differentiate(g)).cost.peak_bytes; RSS = peak RSS of one "
          "gradient call over the RSS before it (a child process); MiB\n")
    print("| checkpoint | carries stored | predicted peak | tracemalloc peak | RSS peak | "
          "compile s | evaluate ms | value_and_grad ms | v&g vs store-all | recompute "
          "(forwards) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        i, mib = info[r["system"]], 2**20
        extra = (med(r["vg"]) - med(base["vg"])) / med(r["ev"])
        print(f"| {r['system']} | {i['rows']} | {i['peak'] / mib:.0f} | "
              f"{i['tracemalloc'] / mib:.0f} | {i['rss'] / mib:.0f} | {r['compile']:.3g} | "
              f"{fmt(r['ev'])} | {fmt(r['vg'])} | {med(r['vg']) / med(base['vg']):.2f}x | "
              f"{extra:+.2f} |")


# -- 4. while_loop reverse vs the same trip count ------------------------------------------
def while_rows(m: int, repeat: int) -> tuple[list[dict], dict]:
    """The fixed point x = cos(th·x) over `m` elements: while_loop (max_iters 2x and 20x
    the trip count), fori_loop, unrolled and host loop with the trip count, PyTorch."""
    feeds = {"x": np.zeros(m), "th": np.linspace(0.2, 0.9, m)}
    specs = {"x": ad.f64(m), "th": ad.f64(m)}
    trips = numpy_trips(feeds["x"], feeds["th"])
    progs = {f"while_loop, max_iters {k}x": while_program("while_loop", trips, k * trips)
             for k in (2, 20)}
    progs["while_loop 2x, stop_gradient(step)"] = while_program("while_loop", trips,
                                                               2 * trips, stop=True)
    progs.update({k: while_program(k, trips) for k in ("fori_loop", "unrolled")})
    systems = {k: adsvc_system(p, specs, feeds) for k, p in progs.items()}
    systems["host loop"] = host_system(lambda x, th: fixed_point(x, th, ad.cos), specs, "x",
                                       None, converged, feeds, "sum_final")

    def torch_while(torch, x, th):
        for _ in range(100 * trips):
            xn = torch.cos(th * x)
            done = bool((xn - x).abs().max() <= TOL)
            x = xn
            if done:
                break
        return x.sum()
    systems.update(peers(torch_while, None, feeds))
    peaks = {k: Plan(ad.differentiate(ad.trace(p, **specs), "reverse", seed=True))
             .cost.peak_bytes for k, p in progs.items()}
    return run_problem(f"fixed point, {trips} trips, state {m:,}", systems, repeat,
                       "unrolled"), peaks


def while_section(m: int, repeat: int) -> None:
    """Section 4's table and the predicted peaks."""
    rows, peaks = while_rows(m, repeat)
    print_rows("4. while_loop reverse vs the same trip count", rows, "unrolled")
    print("\npredicted gradient peak (MiB): " + ", ".join(
        f"{k} {v / 2**20:.1f}" for k, v in peaks.items()))


# -- main ---------------------------------------------------------------------------------------
def machine() -> str:
    """Cores, Python, numpy (and peers) versions, load."""
    parts = [f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)",
             f"Python {platform.python_version()}", f"numpy {np.__version__}",
             f"adsvc {ad.__version__}"]
    for mod in ("torch", "jax"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} not installed")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "; ".join(parts) + f"; load average {load}"


def main() -> None:
    """Run the benchmark and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    p.add_argument("--repeat", type=int, default=None, help="calls per median (5; quick 3)")
    p.add_argument("--only", default="1234", help="sections to run, e.g. 23")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child)
    q = int(a.quick)
    repeat = a.repeat or (3 if a.quick else 5)
    BUDGET[0] = 0.2 if a.quick else BUDGET[0]
    size = {k: v[q] for k, v in SIZES.items()}
    start = time.perf_counter()
    print(f"## bench/loops.py{' --quick' if a.quick else ''}\n\nmachine: {machine()}\n")
    print("times: median over the repeats (spread = (max − min) / median); 'grad rel err' = "
          "max |∇ − ∇ unrolled| / max |∇ unrolled|")
    sections = {"1": lambda: graph_sizes(size["graph_steps"], repeat),
                "2": lambda: print_rows("2. Compile time and time per call",
                                        rk4_rows(*size["rk4"], repeat)
                                        + rnn_rows(*size["rnn"], repeat), "scan"),
                "3": lambda: memory_section(*size["memory"], repeat),
                "4": lambda: while_section(*size["while"], repeat)}
    for key in a.only:
        _, secs = timed(sections[key])
        print(f"\n(section {key}: {secs:.0f} s)")
    for note in sorted(NOTES):
        print(f"\nnote: {note}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average now "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
