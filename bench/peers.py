"""adsvc against its peers (issue 11, item 7): W1-W5, the Gaussian mixture and W2 at 1M
nodes, every peer in this one process (the W5 servers and the 1M child excepted), one
markdown table of ratios (peer time / adsvc time: > 1 means adsvc is faster).

- W1 the seed `x*x + x*y + 2`, value + gradient, steady state: `adsvc.local()` cached
  call and the bare `Plan.run` of the compiled gradient vs PyTorch eager, JAX `jit` of
  `value_and_grad`, CasADi SX `Function`, autograd, Python floats with a hand gradient.
- W2 the all-live random scalar DAG of bench/core_timing.py (100k nodes; the peers build
  the same DAG from the same RNG calls): value + gradient (adsvc's native scalar VM, and
  its numpy interpreter for reference) vs CasADi SX (gradient + Function), PyTorch eager
  on 0-d tensors, autograd, Python floats (f alone) and a hand-written tape; building
  the graph and compile (differentiate + plan) on new DAGs (first times: nodes are
  interned and keep their rewrites) vs CasADi's SX build and gradient + Function.
  With --big also at 1M nodes (compile, run, peak RSS) in a child process (off by
  default: about 2 minutes and 4 GiB).
- W3 an MLP 256x784 -> 512 tanh -> 10, softmax cross-entropy, gradient of the four
  parameters, float32 and float64, vs PyTorch eager and hand-written numpy.
- W4 Rosenbrock n = 1e6: gradient and Hessian-vector product vs scipy `rosen_der` /
  `rosen_hess_prod`, JAX jit, PyTorch eager (double backward for the HVP).
- GMM: log-likelihood of a diagonal Gaussian mixture (d=32, k=25, n=1000), gradient
  of logits, means and log-scales vs PyTorch eager.
- W5 the service (bench/_server.py: `python -m adsvc.server` on 127.0.0.1 port 0):
  the SDK's seed gradient call p50 and an 8 MB Rosenbrock gradient, against a bare
  grpcio server (another subprocess) that answers the same request bytes with the same
  response bytes, no protobuf on either side. Seed calls are timed one by one, in runs
  of SEED_BLOCK calls to each server in turn (a server sees a stream of calls); a note
  gives the p50s when every call follows one to the other server (both processes then
  start each call with cold caches, which costs the one running more Python more).
  8 client threads at once give the throughput row.

Every peer's answer is compared with adsvc's before it is timed (max abs difference
over the max abs value of each result: <= 1e-10 in float64, 1e-4 in float32); a
disagreeing peer is still timed and marked ✗. The W2 gradient at 100k nodes is
ill-conditioned (one-ulp differences between libm's, numpy's and torch's tanh/sin/cos
grow to O(1) relative differences; adsvc's own VM and interpreter differ that much):
a peer that fails against the VM (libm, like CasADi and Python's math) is checked
against adsvc's numpy interpreter (numpy's functions, like autograd), else on the
10k-node prefix of the same DAG, and the answer cell says which check it passed.
Times are per call: each sample runs a calibrated number of calls (about 20 ms), the
peers of a row group take their samples round robin (same machine noise), and each
group is bounded by a time budget and a sample count. The garbage collector's heap is
frozen during a group so that one workload's objects do not slow another's
collections. Cells: median and half the interquartile range in percent; ratio
(quartile bounds). Peers that are not installed
(`pip install '.[bench]'`) are listed as missing. Nothing is asserted about times.

    python bench/peers.py [--quick] [--big] [--threads N] [--only W1,W2,W3,W4,GMM,W5]

--threads 1 gives every library (and the servers) one thread: on a shared 2-core
machine, multi-threaded BLAS/OpenMP calls wait for a busy core (W3 ran 20x slower
while another process ran), so single-threaded ratios are the steadier ones.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import math
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path


def _early_threads() -> int | None:
    """--threads N, read before numpy and the peers load their thread pools: every
    library (OpenBLAS, OpenMP, torch, XLA) and the server subprocesses get N threads."""
    for i, arg in enumerate(sys.argv):
        if arg.startswith("--threads"):
            value = arg.split("=", 1)[1] if "=" in arg else sys.argv[i + 1]
            n = int(value)
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(n)
            if n == 1:
                os.environ["XLA_FLAGS"] = ("--xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")
            return n
    return None


THREADS = _early_threads()
# subprocess's fork+exec after JAX loaded: exec follows at once, the warning is noise
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
# autograd's tanh VJP divides by cosh(x)**2, which overflows to inf (giving 0) on the DAG
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"autograd")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from core_timing import random_scalar_graph  # noqa: E402 (the W2 DAG)

import adsvc as ad  # noqa: E402
from adsvc.passes.pipeline import compile_graph  # noqa: E402
from adsvc.runtime import scalar_vm  # noqa: E402
from adsvc.runtime.plan import Plan, compile_plan  # noqa: E402

HERE = Path(__file__).resolve().parent
MAX_INNER = 20_000  # calls per sample, at most
TOL64, TOL32 = 1e-10, 1e-4
QUICK = dict(w2=10_000, rosen=100_000, gmm_n=200, seed_calls=300, big_calls=5,
             throughput_calls=10, throughput_windows=3,
             budget=1.5, target=0.005)
FULL = dict(w2=100_000, rosen=1_000_000, gmm_n=1000, seed_calls=2000, big_calls=25,
            throughput_calls=40, throughput_windows=5,
            budget=8.0, target=0.02)
BIG_NODES = 1_000_000
BIG_TIMEOUT = 600.0  # seconds for the --big child


# ---------------------------------------------------------------------------- peers
SKIP = set(os.environ.get("PEERS_SKIP", "").split(","))  # the --big child skips some


def optional(name: str):
    """The module, or None when it is not installed (the row says so)."""
    if name in SKIP:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


torch = optional("torch")
casadi = optional("casadi")
autograd = optional("autograd")
jax = optional("jax")
if jax is not None:
    jax.config.update("jax_enable_x64", True)
if torch is not None and THREADS:
    torch.set_num_threads(THREADS)
if autograd is not None:
    import autograd.numpy as anp


def versions() -> str:
    """The versions of python, numpy and every peer."""
    names = ["adsvc", "numpy", "scipy", "torch", "jax", "jaxlib", "casadi", "autograd",
             "grpcio"]
    out = [f"Python {platform.python_version()}"]
    for n in names:
        try:
            out.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{n} missing")
    return ", ".join(out)


def machine() -> str:
    """Cores, CPU model (/proc/cpuinfo), memory, versions, git commit."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    vm = "native scalar VM" if scalar_vm.available() else "no scalar VM"
    threads = f"{THREADS} thread(s) per library" if THREADS else "default library threads"
    return (f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {model}, "
            f"{mem:.0f} GiB; Linux {platform.release()}; {versions()}; adsvc commit "
            f"{commit or '?'}, {vm}; {threads}")


# --------------------------------------------------------------------------- timing
def first_call(fn):
    """(result, seconds) of one call."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def calibrate(fn, t_first: float, target: float) -> int:
    """Calls per sample so that a sample takes about `target` seconds."""
    dt = t_first
    if dt < 1.0:  # the first call may have compiled (JAX): time a second one
        dt = first_call(fn)[1]
    return max(1, min(MAX_INNER, int(target / max(dt, 1e-9))))


def measure(fns: dict, budget: float, target: float, min_rep: int = 3,
            max_rep: int = 30, inner: int | None = None,
            block: int = 1) -> dict[str, list[float]]:
    """Per-call seconds of each {label: (fn, first-call seconds)}, samples taken round
    robin until `budget` seconds have passed (at least `min_rep`, at most `max_rep`
    rounds); `inner` fixes the calls per sample; `block` samples of one fn are taken in
    a row at each turn (the W5 seed calls: a server sees a stream of calls, not one
    call after each of another process's)."""
    calls = {k: inner or calibrate(f, t0, target) for k, (f, t0) in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    gc.collect()
    gc.freeze()
    try:
        start = time.perf_counter()
        for r in range(max_rep):
            if r >= min_rep and time.perf_counter() - start > budget:
                break
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                fn, m = fns[k][0], calls[k]
                for _ in range(block):
                    t = time.perf_counter()
                    for _ in range(m):
                        fn()
                    times[k].append((time.perf_counter() - t) / m)
    finally:
        gc.unfreeze()
    return times


def quartiles(ts: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3)."""
    if len(ts) < 2:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return q[0], statistics.median(ts), q[2]


def fmt_s(s: float) -> str:
    """Seconds with a unit (ns .. s), three significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def cell(ts: list[float] | None) -> str:
    """'median ±half-IQR%' (one sample: just the time)."""
    if not ts:
        return "—"
    q1, med, q3 = quartiles(ts)
    if len(ts) < 3:
        return fmt_s(med)
    return f"{fmt_s(med)} ±{50 * (q3 - q1) / med:.0f}%"


# ------------------------------------------------------------------------- answers
def _arrays(x) -> list[np.ndarray]:
    """A nest of results (tensors, DMs, tuples, dicts) as float64 arrays, in order."""
    if isinstance(x, dict):
        return [a for k in x for a in _arrays(x[k])]
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in _arrays(v)]
    if torch is not None and isinstance(x, torch.Tensor):
        return [x.detach().double().numpy()]
    if casadi is not None and isinstance(x, casadi.DM):
        return [np.asarray(x.full(), dtype=np.float64).ravel()]
    return [np.asarray(x, dtype=np.float64)]


def rel_err(ref, got) -> float:
    """The worst over the results of max |ref - got| / max |ref| (inf if shapes or counts
    differ)."""
    a, b = _arrays(ref), _arrays(got)
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for r, g in zip(a, b):
        if r.size != g.size:
            return math.inf
        r, g = r.ravel(), g.ravel()
        if not (np.isfinite(r).all() and np.isfinite(g).all()):
            if not np.array_equal(r, g, equal_nan=True):
                return math.inf
            continue
        scale = max(float(np.max(np.abs(r), initial=0.0)), 1e-300)
        worst = max(worst, float(np.max(np.abs(r - g), initial=0.0)) / scale)
    return worst


def verdict(err: float, tol: float) -> str:
    """'✓ 3e-16' or '✗ 2e-03' (printed in the table)."""
    mark = "✓" if err <= tol else "✗"
    return f"{mark} {err:.0e}"


# ---------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One table row: a workload, adsvc's times, one peer's times and its check."""

    workload: str
    adsvc: str
    a_times: list[float]
    peer: str
    p_times: list[float] | None
    check: str = ""
    comparable: bool = True  # False: the peer did different work (no ratio shown)

    def ratio(self) -> str:
        """Peer median / adsvc median, with (peer q1 / adsvc q3 – peer q3 / adsvc q1)."""
        if not self.p_times or not self.a_times:
            return "—"
        if not self.comparable:
            return "n/a"
        a1, am, a3 = quartiles(self.a_times)
        p1, pm, p3 = quartiles(self.p_times)
        if len(self.a_times) < 3 or len(self.p_times) < 3:
            return f"{pm / am:.3g}"
        return f"{pm / am:.3g} ({p1 / a3:.3g}–{p3 / a1:.3g})"


@dataclass
class Group:
    """Row groups of one workload: adsvc fns and peer fns timed together."""

    workload: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compare(workload: str, adsvc_fns: dict, peer_fns: dict, ref, budget: float,
            target: float, tol: float = TOL64, **kw) -> list[Row]:
    """Check every peer against adsvc's answer `ref`, time adsvc's fns and the peers'
    round robin, one row per (first adsvc fn, other fn). `peer_fns`: {label: fn, (fn, its
    own reference answer or a function of its answer giving the answer cell) or a string
    saying why the peer is missing}; `ref` None: no answer to check (compile times)."""
    fns, checks, missing = {}, {}, {}
    for label, fn in adsvc_fns.items():
        out, t0 = first_call(fn)
        checks[label] = "—" if ref is None else verdict(rel_err(ref, out), tol)
        fns[label] = (fn, t0)
    for label, fn in peer_fns.items():
        pref = ref
        if isinstance(fn, tuple):  # (fn, its own reference answer)
            fn, pref = fn
        if isinstance(fn, str):
            missing[label] = fn
            continue
        try:
            out, t0 = first_call(fn)
        except Exception as e:  # a peer that cannot run this workload
            missing[label] = f"failed: {type(e).__name__}: {str(e)[:80]}"
            continue
        if callable(pref):  # the peer's own checker: out -> answer cell
            checks[label] = pref(out)
        else:
            checks[label] = "—" if pref is None else verdict(rel_err(pref, out), tol)
        if checks[label].startswith("✗"):
            print(f"  {workload}: {label} disagrees with adsvc ({checks[label]})",
                  file=sys.stderr)
        fns[label] = (fn, t0)
    times = measure(fns, budget, target, **kw)
    main, *others = list(adsvc_fns)
    rows = [Row(workload, main, times[main], label, times[label], checks[label])
            for label in [*others, *peer_fns] if label in times]
    rows += [Row(workload, main, times[main], f"{label} ({why})", None)
             for label, why in missing.items()]
    return rows


def need(mod, name: str):
    """`None` when the peer is importable, else the reason to print."""
    return None if mod is not None else f"{name} not installed"


def peers_or_missing(pairs) -> dict:
    """{label: fn} from (label, module, builder) triples; a missing module gives a
    string instead of calling its builder."""
    out = {}
    for label, mod, build in pairs:
        why = need(mod, label.split()[0])
        out[label] = why if why else build()
    return out


# ---------------------------------------------------------------------- W1 seed
def seed_fn(x, y):
    """The seed example."""
    return x * x + x * y + 2


def w1(cfg) -> Group:
    """The seed example's value and gradient, steady state."""
    g = ad.trace(seed_fn)
    c = ad.local()
    plan = compile_plan(g, ("reverse",), None, True)  # what clients run: the native tape
    feeds = {"x": 3.0, "y": 4.0}
    ref = c.value_and_grad(g, **feeds)
    ref = (ref[0], [ref[1]["x"], ref[1]["y"]])

    def local_call():
        v, gr = c.value_and_grad(g, x=3.0, y=4.0)
        return v, [gr["x"], gr["y"]]

    def plan_call():
        r = plan.run(feeds)
        return r["out"], [r["grad:x"], r["grad:y"]]

    def python_floats():
        x, y = 3.0, 4.0
        return x * x + x * y + 2, [2 * x + y, x]

    peers = peers_or_missing([
        ("PyTorch eager", torch, _w1_torch), ("JAX jit", jax, _w1_jax),
        ("CasADi SX Function", casadi, _w1_casadi), ("autograd", autograd, _w1_autograd)])
    peers["Python floats, hand gradient"] = python_floats
    grp = Group("W1 seed value+grad")
    grp.rows = compare("W1 seed `x*x + x*y + 2` value+grad", {
        "adsvc.local() cached call": local_call, "adsvc Plan.run": plan_call},
        peers, ref, cfg["budget"], cfg["target"])
    plan_peers = {k: v for k, v in peers.items() if k in ("PyTorch eager", "JAX jit",
                                                           "CasADi SX Function")}
    grp.rows += compare("W1 seed, bare Plan.run", {"adsvc Plan.run": plan_call},
                        plan_peers, ref, cfg["budget"], cfg["target"])
    return grp


def _w1_torch():
    def call():
        x = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        y = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        f = seed_fn(x, y)
        gx, gy = torch.autograd.grad(f, (x, y))
        return f.detach(), [gx, gy]
    return call


def _w1_jax():
    vg = jax.jit(jax.value_and_grad(seed_fn, argnums=(0, 1)))

    def call():
        v, (gx, gy) = vg(3.0, 4.0)
        jax.block_until_ready((v, gx, gy))
        return v, [gx, gy]
    return call


def _w1_casadi():
    x, y = casadi.SX.sym("x"), casadi.SX.sym("y")
    f = seed_fn(x, y)
    fn = casadi.Function("f", [x, y], [f, casadi.gradient(f, casadi.vertcat(x, y))])

    def call():
        v, gr = fn(3.0, 4.0)
        return v, [gr[0], gr[1]]
    return call


def _w1_autograd():
    vg = autograd.value_and_grad(lambda p: seed_fn(p[0], p[1]))

    def call():
        v, gr = vg((3.0, 4.0))
        return v, list(gr)
    return call


# ------------------------------------------------------------------- W2 scalar DAG
def dag_recipe(n_nodes: int, n_inputs: int, seed: int = 0) -> list[tuple[int, int]]:
    """The ops of core_timing.random_scalar_graph from the same RNG calls: one (kind, j)
    per node after the inputs; kinds 0-3 are sin, cos, tanh, *0.5 of the previous
    value, 4-6 are add, sub, mul of the previous value and value j; the output is the
    tanh of the last value."""
    rng = np.random.default_rng(seed)
    recipe, size = [], n_inputs
    while size < n_nodes:
        j = int(rng.integers(max(0, size - 50), size))
        if rng.random() < 0.5:
            recipe.append((int(rng.integers(4)), j))
        else:
            recipe.append((4 + int(rng.integers(3)), j))
        size += 1
    return recipe


def replay(recipe, xs, sin, cos, tanh):
    """The DAG's output built with any scalar type's operators and these functions."""
    vals = list(xs)
    for kind, j in recipe:
        a = vals[-1]
        if kind == 0:
            v = sin(a)
        elif kind == 1:
            v = cos(a)
        elif kind == 2:
            v = tanh(a)
        elif kind == 3:
            v = a * 0.5
        elif kind == 4:
            v = a + vals[j]
        elif kind == 5:
            v = a - vals[j]
        else:
            v = a * vals[j]
        vals.append(v)
    return tanh(vals[-1])


def tape_value_and_grad(recipe, x):
    """A hand-written tape on Python floats: the forward sweep stores every value, the
    reverse sweep accumulates adjoints (the recipe is the tape)."""
    sin, cos, tanh = math.sin, math.cos, math.tanh
    vals, n0 = list(x), len(x)
    for kind, j in recipe:
        a = vals[-1]
        vals.append(sin(a) if kind == 0 else cos(a) if kind == 1 else tanh(a) if kind == 2
                    else a * 0.5 if kind == 3 else a + vals[j] if kind == 4
                    else a - vals[j] if kind == 5 else a * vals[j])
    out = tanh(vals[-1])
    adj = [0.0] * len(vals)
    adj[-1] = 1.0 - out * out
    for i in range(len(recipe) - 1, -1, -1):
        kind, j = recipe[i]
        k = n0 + i
        b, p = adj[k], k - 1
        if kind == 0:
            adj[p] += b * cos(vals[p])
        elif kind == 1:
            adj[p] -= b * sin(vals[p])
        elif kind == 2:
            adj[p] += b * (1.0 - vals[k] * vals[k])
        elif kind == 3:
            adj[p] += 0.5 * b
        elif kind == 4:
            adj[p] += b
            adj[j] += b
        elif kind == 5:
            adj[p] += b
            adj[j] -= b
        else:
            adj[p] += b * vals[j]
            adj[j] += b * vals[p]
    return out, adj[:n0]


def _w2_torch(recipe, x0):
    def call():
        xs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in x0]
        out = replay(recipe, xs, torch.sin, torch.cos, torch.tanh)
        grads = torch.autograd.grad(out, xs, allow_unused=True)  # an input may be unused
        return out.detach(), [torch.zeros(()) if d is None else d for d in grads]
    return call


def _w2_autograd(recipe, x0):
    vg = autograd.value_and_grad(
        lambda x: replay(recipe, [x[i] for i in range(len(x0))], anp.sin, anp.cos, anp.tanh))
    x = np.array(x0)

    def call():
        v, gr = vg(x)
        return v, list(gr)
    return call


def casadi_dag(recipe, n_inputs):
    """(symbols, output) of the DAG in CasADi SX."""
    xs = casadi.SX.sym("x", n_inputs)
    return xs, replay(recipe, [xs[i] for i in range(n_inputs)], casadi.sin, casadi.cos,
                      casadi.tanh)


def casadi_construct(xs, f):
    """CasADi's compile: the gradient expression and a Function of value and gradient."""
    return casadi.Function("vg", [xs], [f, casadi.gradient(f, xs)])


def _casadi_call(fn, x0):
    x = np.array(x0)

    def call():
        v, gr = fn(x)
        gr = np.asarray(gr.full()).ravel()
        return v, list(gr)
    return call


def _compile(g):
    """adsvc's compile of a gradient, as its clients compile it (`compile_plan`: a
    scalar graph's gradient is a native tape, no derivative graph)."""
    return compile_plan(g, ("reverse",), None, True)


def _interpreter_plan(d) -> Plan:
    """The plan of `d` on the numpy interpreter (the VM switched off while planning)."""
    scalar_vm.ENABLED[0] = False
    try:
        p = Plan(d)
    finally:
        scalar_vm.ENABLED[0] = True
    assert p.program is None
    return p


class DagCase:
    """The W2 DAG of `n` nodes traced, its gradient compiled and planned twice (the VM
    and the numpy interpreter), the peers' recipe, the inputs and adsvc's answers."""

    def __init__(self, n: int, n_in: int = 10):
        (self.g, self.names), self.t_trace = first_call(lambda: random_scalar_graph(n, n_in))
        self.n = n
        self.x0 = [0.1 * (i + 1) for i in range(n_in)]
        self.feeds = dict(zip(self.names, self.x0))
        self.recipe = dag_recipe(n, n_in)
        self.tape, self.t_tape = first_call(lambda: _compile(self.g))
        self.jvp_tape = compile_plan(self.g, ("forward",), None, False)
        # the derivative graph (what the general path builds) and its plan, for reference
        self.d, self.t_diff = first_call(
            lambda: compile_graph(self.g, ("reverse",), None, True))
        self.plan, self.t_plan = first_call(lambda: Plan(self.d))
        assert self.plan.program is not None, "the W2 gradient should run on the VM"
        self.interp = _interpreter_plan(self.d)
        self.ref = self.run(self.plan)
        self.ref_interp = self.run(self.interp)

    def run(self, p: Plan):
        """(value, [gradient of each input]) from plan `p`."""
        r = p.run(self.feeds)
        return r["out"], [r[f"grad:{k}"] for k in self.names]


W2_CHECK_NODES = QUICK["w2"]  # a prefix of the DAG where every evaluator agrees
W2_PEERS = [  # label, peer module (None: always there), maker(case) -> timed fn
    ("CasADi SX Function (value + gradient)", "casadi",
     lambda c: _casadi_call(casadi_construct(*casadi_dag(c.recipe, len(c.x0))), c.x0)),
    ("PyTorch eager (0-d tensors)", "torch", lambda c: _w2_torch(c.recipe, c.x0)),
    ("autograd", "autograd", lambda c: _w2_autograd(c.recipe, c.x0)),
    ("hand-written tape (Python floats)", None,
     lambda c: partial(tape_value_and_grad, c.recipe, c.x0)),
    ("adsvc numpy interpreter (ADSVC_SCALAR_VM=0)", None, lambda c: partial(c.run, c.interp)),
]


def _w2_checker(case: DagCase, small: dict, maker, is_interp: bool, tol: float = TOL64):
    """The answer cell of a W2 peer: against adsvc's VM (libm's sin/cos/tanh); if that
    fails, against adsvc's numpy interpreter (numpy's), then on a W2_CHECK_NODES-node
    prefix of the same DAG (a large DAG's gradient is ill-conditioned: one-ulp
    differences between libm and numpy or torch grow, see the notes)."""
    def check(out) -> str:
        e = rel_err(case.ref, out)
        if e <= tol or case.n <= W2_CHECK_NODES:
            return verdict(e, tol)
        e_np = math.inf if is_interp else rel_err(case.ref_interp, out)
        if e_np <= tol:
            return f"✓ {e_np:.0e} vs adsvc's numpy interpreter ({e:.0e} vs the VM)"
        if "case" not in small:
            small["case"] = DagCase(W2_CHECK_NODES)
        e_small = rel_err(small["case"].ref, maker(small["case"])())
        mark = "✓" if e_small <= tol else "✗"
        return (f"{mark} {e_small:.0e} at {W2_CHECK_NODES // 1000}k nodes "
                f"({e:.0e} at {case.n // 1000}k: ill-conditioned)")
    return check


def w2(cfg) -> Group:
    """The random scalar DAG: build, compile, value+grad, f alone."""
    case = DagCase(cfg["w2"])
    g, n = case.g, case.n
    grp = Group(f"W2 {n // 1000}k")
    grp.notes.append(
        f"W2 {n:,} nodes: traced graph {len(g.nodes):,} nodes (trace {case.t_trace:.2f} s), "
        f"gradient graph {len(case.d.nodes):,} nodes "
        f"({len(case.d.nodes) / len(g.nodes):.2f} per primal node); first compile: "
        f"the native tape (what clients run) {case.t_tape:.3f} s, {case.tape.count:,} "
        f"forward + {case.tape.active_instructions:,} adjoint instructions; the "
        f"derivative graph: differentiate {case.t_diff:.2f} s + plan {case.t_plan:.2f} s, "
        f"VM program {case.plan.program.count:,} instructions; adsvc's two evaluators "
        f"(VM: libm, interpreter: numpy's sin/cos/tanh) differ by "
        f"{rel_err(case.ref, case.ref_interp):.0e}")
    label = f"W2 {n // 1000}k-node scalar DAG"
    grp.rows += _w2_eval_rows(cfg, label, case, grp)
    grp.rows += _w2_jvp_rows(cfg, label, case)
    grp.rows += _w2_f_rows(cfg, label, g, case.feeds, case.recipe, case.x0)
    grp.rows += _w2_cold_rows(label, case, grp)
    return grp


def _w2_eval_rows(cfg, label, case: DagCase, grp) -> list[Row]:
    c = ad.local()
    _, t_first = first_call(lambda: c.value_and_grad(case.g, **case.feeds))
    grp.notes.append(f"{label}: first adsvc.local() value_and_grad call (compiles) "
                     f"{t_first:.2f} s")

    def local_call():
        v, gr = c.value_and_grad(case.g, **case.feeds)
        return v, [gr[k] for k in case.names]

    small: dict = {}
    peers: dict = {}
    for name, mod, maker in W2_PEERS:
        if mod is not None and globals()[mod] is None:
            peers[name] = f"{mod} not installed"
            continue
        peers[name] = (maker(case), _w2_checker(case, small, maker, mod is None and
                                                "interpreter" in name))
    if casadi is not None:
        fn = casadi_construct(*casadi_dag(case.recipe, len(case.x0)))
        grp.notes.append(f"{label}: CasADi's value+gradient Function has "
                         f"{fn.n_instructions():,} instructions")
    peers["Python floats, f alone (no gradient)"] = (
        partial(replay, case.recipe, case.x0, math.sin, math.cos, math.tanh), case.ref[0])
    return compare(f"{label}: value+grad", {
        "adsvc native tape, run": partial(case.run, case.tape),
        "adsvc derivative graph on the VM, Plan.run": partial(case.run, case.plan),
        "adsvc.local() value_and_grad": local_call}, peers, case.ref, cfg["budget"],
        cfg["target"], min_rep=3, max_rep=25)


def _w2_jvp_rows(cfg, label, case: DagCase) -> list[Row]:
    """A JVP along one direction: adsvc's tangent tape vs CasADi's `jtimes` Function."""
    v = [1.0 / (i + 1) for i in range(len(case.x0))]
    feeds = {**case.feeds, **{f"tangent:{k}": d for k, d in zip(case.names, v)}}

    def tape():
        r = case.jvp_tape.run(feeds)
        return r["out"], r["tangent:out"]
    peers = {}
    if casadi is None:
        peers["CasADi SX Function (value + jtimes)"] = "casadi not installed"
    else:
        xs, f = casadi_dag(case.recipe, len(case.x0))
        dv = casadi.SX.sym("v", len(case.x0))
        fn = casadi.Function("jv", [xs, dv], [f, casadi.jtimes(f, xs, dv)])
        x, vv = np.array(case.x0), np.array(v)
        peers["CasADi SX Function (value + jtimes)"] = lambda: tuple(
            float(o) for o in fn(x, vv))
    ref = tape()
    return compare(f"{label}: JVP (one direction)", {"adsvc native tape (forward), run": tape},
                   peers, ref, cfg["budget"], cfg["target"], min_rep=3, max_rep=25)


def _w2_f_rows(cfg, label, g, feeds, recipe, x0) -> list[Row]:
    plan = Plan(compile_graph(g, (), None, False))
    ref = plan.run(feeds)["out"]

    def casadi_f():
        xs, f = casadi_dag(recipe, len(x0))
        fn, x = casadi.Function("f", [xs], [f]), np.array(x0)
        return lambda: fn(x)

    peers = peers_or_missing([("CasADi SX Function (f)", casadi, casadi_f)])
    peers["Python floats"] = lambda: replay(recipe, x0, math.sin, math.cos, math.tanh)
    return compare(f"{label}: f alone", {"adsvc scalar VM, Plan.run":
                                         lambda: plan.run(feeds)["out"]},
                   peers, ref, cfg["budget"], cfg["target"])


COLD_SEEDS = (1, 2, 3)  # fresh DAGs for the build and compile rows


def _w2_cold_rows(label, case: DagCase, grp) -> list[Row]:
    """Build and compile on fresh DAGs of the same size (other seeds), once each: nodes
    are interned and keep their rewrites, so tracing or compiling a live graph again is
    faster than the first time, which is the time a new graph costs. CasADi builds and
    constructs the same DAGs."""
    n, n_in = case.n, len(case.x0)
    times: dict[str, list[float]] = {k: [] for k in ("trace", "compile", "sx", "construct")}
    for seed in COLD_SEEDS:
        gc.collect()
        (g, _), t = first_call(partial(random_scalar_graph, n, n_in, seed))
        times["trace"].append(t)
        times["compile"].append(first_call(partial(_compile, g))[1])
        del g
        if casadi is not None:
            (xs, f), t = first_call(partial(casadi_dag, dag_recipe(n, n_in, seed), n_in))
            times["sx"].append(t)
            times["construct"].append(first_call(partial(casadi_construct, xs, f))[1])
    _, warm = first_call(partial(_compile, case.g))
    grp.notes.append(f"{label}: compiling a graph compiled before (live nodes keep their "
                     f"rewrites) takes {warm:.2f} s; the table's compile and build rows "
                     f"are first times, on DAGs of seeds {COLD_SEEDS}")
    missing = "casadi not installed"
    return [Row(f"{label}: compile (differentiate + plan), new graph",
                "adsvc compile_plan (native tape)", times["compile"],
                "CasADi gradient + Function" if casadi else f"CasADi ({missing})",
                times["construct"] or None, "—"),
            Row(f"{label}: build the graph, new graph", "adsvc.trace", times["trace"],
                "CasADi SX (same DAG)" if casadi else f"CasADi ({missing})",
                times["sx"] or None, "—")]


# -------------------------------------------------------------------------- W3 MLP
MLP = dict(batch=256, inp=784, hidden=512, classes=10)
PARAMS = ("W1", "b1", "W2", "b2")


def mlp_loss(X, Y, W1, b1, W2, b2):
    """Mean softmax cross-entropy of a tanh MLP (one-hot labels Y)."""
    z = ad.tanh(X @ W1 + b1) @ W2 + b2
    return -ad.sum(Y * ad.log_softmax(z, axis=-1)) / X.shape[0]


def mlp_data(dtype):
    """Inputs, one-hot labels, integer labels and parameters of the MLP."""
    m = MLP
    rng = np.random.default_rng(3)
    X = rng.standard_normal((m["batch"], m["inp"])).astype(dtype)
    labels = rng.integers(m["classes"], size=m["batch"])
    Y = np.eye(m["classes"], dtype=dtype)[labels]
    params = dict(
        W1=(rng.standard_normal((m["inp"], m["hidden"])) / math.sqrt(m["inp"])).astype(dtype),
        b1=(0.1 * rng.standard_normal(m["hidden"])).astype(dtype),
        W2=(rng.standard_normal((m["hidden"], m["classes"])) / math.sqrt(m["hidden"]))
        .astype(dtype),
        b2=(0.1 * rng.standard_normal(m["classes"])).astype(dtype))
    return X, Y, labels, params


def mlp_numpy(X, Y, W1, b1, W2, b2):
    """Hand-written numpy: loss and the four gradients."""
    h = np.tanh(X @ W1 + b1)
    z = h @ W2 + b2
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    n = X.shape[0]
    loss = -(Y * (z - np.log(s))).sum() / n
    dz = (e / s - Y) / n
    dh = (dz @ W2.T) * (1 - h * h)
    return loss, [X.T @ dh, dh.sum(axis=0), h.T @ dz, dz.sum(axis=0)]


def _mlp_torch(X, labels, params):
    tX = torch.from_numpy(X)
    tl = torch.from_numpy(labels)
    tp = [torch.from_numpy(params[k].copy()).requires_grad_() for k in PARAMS]

    def call():
        W1, b1, W2, b2 = tp
        z = torch.tanh(tX @ W1 + b1) @ W2 + b2
        loss = torch.nn.functional.cross_entropy(z, tl)
        return loss.detach(), list(torch.autograd.grad(loss, tp))
    return call


def w3(cfg) -> Group:
    """MLP gradient, float32 and float64."""
    grp = Group("W3 MLP")
    m = MLP
    for dtype, tname in ((np.float32, "f32"), (np.float64, "f64")):
        X, Y, labels, params = mlp_data(dtype)
        types = dict(X=(m["batch"], m["inp"]), Y=(m["batch"], m["classes"]),
                     W1=(m["inp"], m["hidden"]), b1=(m["hidden"],),
                     W2=(m["hidden"], m["classes"]), b2=(m["classes"],))
        mk = ad.f32 if dtype == np.float32 else ad.f64
        g = ad.trace(mlp_loss, **{k: mk(*s) for k, s in types.items()})
        c = ad.local()
        feeds = dict(X=X, Y=Y, **params)

        def call(c=c, g=g, feeds=feeds):
            v, gr = c.value_and_grad(g, wrt=list(PARAMS), **feeds)
            return v, [gr[k] for k in PARAMS]

        v, gr = call()
        peers = peers_or_missing([("PyTorch eager", torch,
                                   partial(_mlp_torch, X, labels, params))])
        peers["hand-written numpy"] = partial(mlp_numpy, X, Y, *[params[k] for k in PARAMS])
        grp.rows += compare(f"W3 MLP 256×784→512 tanh→10 softmax CE, grad {tname}",
                            {"adsvc.local() value_and_grad": call}, peers, (v, gr),
                            cfg["budget"], cfg["target"],
                            tol=TOL32 if dtype == np.float32 else TOL64)
    return grp


# -------------------------------------------------------------------- W4 Rosenbrock
def rosen(x):
    """scipy's Rosenbrock, written for adsvc, PyTorch and JAX arrays alike."""
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def rosen_ad(x):
    """Rosenbrock for adsvc (ad.sum)."""
    return ad.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def _rosen_torch(x, v):
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tv = torch.from_numpy(v)

    def grad():
        return torch.autograd.grad(rosen(tx), tx)[0]

    def hvp():  # double backward
        (gr,) = torch.autograd.grad(rosen(tx), tx, create_graph=True)
        return torch.autograd.grad(gr, tx, grad_outputs=tv)[0]
    return grad, hvp


def _rosen_jax(x, v):
    jx, jv = jax.device_put(x), jax.device_put(v)
    grad = jax.jit(jax.grad(rosen))
    hvp = jax.jit(lambda a, b: jax.jvp(jax.grad(rosen), (a,), (b,))[1])
    return (lambda: grad(jx).block_until_ready(),
            lambda: hvp(jx, jv).block_until_ready())


def w4(cfg) -> Group:
    """Rosenbrock gradient and Hessian-vector product."""
    from scipy.optimize import rosen_der, rosen_hess_prod

    n = cfg["rosen"]
    rng = np.random.default_rng(4)
    x, v = rng.standard_normal(n), rng.standard_normal(n)
    c = ad.local()
    g = ad.trace(rosen_ad, x=ad.f64(n))
    h = ad.trace(lambda x, v: ad.jvp(ad.grad(rosen_ad), (x,), (v,))[1],
                 x=ad.f64(n), v=ad.f64(n))
    tp = _rosen_torch(x, v) if torch is not None else ("torch not installed",) * 2
    jp = _rosen_jax(x, v) if jax is not None else ("jax not installed",) * 2
    grp = Group("W4 Rosenbrock")
    label = f"W4 Rosenbrock n={n:,}"
    grp.rows += compare(f"{label} gradient", {"adsvc.local() grad": lambda: c.grad(g, x=x)["x"]},
                        {"scipy rosen_der": lambda: rosen_der(x), "JAX jit": jp[0],
                         "PyTorch eager": tp[0]}, rosen_der(x), cfg["budget"], cfg["target"])
    grp.rows += compare(f"{label} Hessian-vector product",
                        {"adsvc.local() evaluate of jvp(grad)":
                         lambda: c.evaluate(h, x=x, v=v)["out"]},
                        {"scipy rosen_hess_prod": lambda: rosen_hess_prod(x, v),
                         "JAX jit (jvp of grad)": jp[1],
                         "PyTorch eager (double backward)": tp[1]},
                        rosen_hess_prod(x, v), cfg["budget"], cfg["target"])
    return grp


# ------------------------------------------------------------------ Gaussian mixture
GMM = dict(d=32, k=25)


def gmm_ll(X, w, mu, ls, lib=None):
    """Log-likelihood (without the 2π constant) of a diagonal Gaussian mixture: logits
    w[k], means mu[k, d], log-scales ls[k, d]; X[n, d]. adsvc, or torch with lib=torch."""
    n, d = X.shape
    k = mu.shape[0]
    if lib is None:
        z = (ad.reshape(X, (n, 1, d)) - ad.reshape(mu, (1, k, d))) * ad.reshape(
            ad.exp(-ls), (1, k, d))
        comp = -0.5 * ad.sum(z * z, axes=(2,)) - ad.reshape(ad.sum(ls, axes=(1,)), (1, k))
        return ad.sum(ad.logsumexp(comp + ad.reshape(ad.log_softmax(w), (1, k)), axes=(1,)))
    z = (X[:, None, :] - mu[None]) * torch.exp(-ls)[None]
    comp = -0.5 * (z * z).sum(2) - ls.sum(1)[None]
    return torch.logsumexp(comp + torch.log_softmax(w, 0)[None], 1).sum()


def w_gmm(cfg) -> Group:
    """Gaussian-mixture log-likelihood gradient."""
    n, d, k = cfg["gmm_n"], GMM["d"], GMM["k"]
    rng = np.random.default_rng(5)
    X = rng.standard_normal((n, d))
    p = dict(w=rng.standard_normal(k), mu=rng.standard_normal((k, d)),
             ls=0.1 * rng.standard_normal((k, d)))
    g = ad.trace(gmm_ll, X=ad.f64(n, d), w=ad.f64(k), mu=ad.f64(k, d), ls=ad.f64(k, d))
    c = ad.local()
    keys = ("w", "mu", "ls")

    def call():
        v, gr = c.value_and_grad(g, wrt=list(keys), X=X, **p)
        return v, [gr[q] for q in keys]

    def torch_peer():
        tX = torch.from_numpy(X)
        tp = [torch.from_numpy(p[q].copy()).requires_grad_() for q in keys]

        def run():
            ll = gmm_ll(tX, *tp, lib=torch)
            return ll.detach(), list(torch.autograd.grad(ll, tp))
        return run

    grp = Group("GMM")
    grp.rows += compare(f"Gaussian mixture log-lik d={d} k={k} n={n}, gradient",
                        {"adsvc.local() value_and_grad": call},
                        peers_or_missing([("PyTorch eager", torch, torch_peer)]), call(),
                        cfg["budget"], cfg["target"])
    return grp


# ------------------------------------------------------------------------ W5 service
EVALUATE = "/adsvc.v1.AutodiffService/Evaluate"
ECHO_SERVICE = "bench.Echo"
ROSEN_WIRE_N = 1_000_000  # 8 MB of float64


def echo_server_main(path: str) -> int:
    """`--echo-server FILE`: a bare grpcio server (8 threads, like adsvc's) answering
    /bench.Echo/<name> with the stored response bytes of <name> (a pickled dict), no
    protobuf; prints its address; stops on SIGTERM or after an hour."""
    from concurrent import futures

    import grpc

    replies = pickle.loads(Path(path).read_bytes())
    handlers = {name: grpc.unary_unary_rpc_method_handler(lambda req, ctx, b=b: b)
                for name, b in replies.items()}
    server = grpc.server(futures.ThreadPoolExecutor(8),
                         options=[("grpc.max_receive_message_length", -1),
                                  ("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination(timeout=3600)
    return 0


class EchoServer:
    """The echo server in a subprocess (its own process group, stopped by pid)."""

    def __init__(self, replies: dict[str, bytes], timeout: float = 60.0):
        import grpc
        from _server import CHANNEL_OPTIONS

        self._file = tempfile.NamedTemporaryFile(suffix=".pkl", delete=False)
        self._file.write(pickle.dumps(replies))
        self._file.close()
        self.proc = subprocess.Popen([sys.executable, __file__, "--echo-server",
                                      self._file.name], stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line: list[str] = []
        reader = __import__("threading").Thread(
            target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or "serving on" not in line[0]:
            self.stop()
            raise RuntimeError("the echo server did not start")
        self.target = line[0].split()[-1]
        self.channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    def method(self, name: str):
        """A bytes -> bytes callable for /bench.Echo/<name>."""
        return self.channel.unary_unary(f"/{ECHO_SERVICE}/{name}")

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 20 s), close the channel, remove the replies file."""
        if hasattr(self, "channel"):
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        os.unlink(self._file.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _request_bytes(srv, g, feeds) -> tuple[bytes, bytes]:
    """(the SDK's Evaluate-by-handle request for `feeds`, serialized; the server's
    response bytes to it)."""
    from adsvc_protocol.proto import service_pb2 as S
    from adsvc_protocol.tensors import to_tensor

    diff = srv.stub.Differentiate(S.DifferentiateRequest(
        graph=ad.to_proto(g), differentiation=S.Differentiation(
            modes=[S.MODE_REVERSE], seed=True), omit_graph=True), timeout=300)
    req = S.EvaluateRequest(handle=diff.handle, inputs={
        k: to_tensor(np.asarray(v, dtype=np.float64), "float64") for k, v in feeds.items()})
    raw = srv.channel.unary_unary(EVALUATE)  # bytes in, bytes out
    data = req.SerializeToString()
    return data, raw(data, timeout=300)


def w5(cfg) -> Group:
    """The service: seed gradient p50 and an 8 MB gradient, against a bare echo."""
    from _server import BenchServer

    seed_g = ad.trace(seed_fn)
    x = np.random.default_rng(6).standard_normal(ROSEN_WIRE_N)
    rg = ad.trace(rosen_ad, x=ad.f64(ROSEN_WIRE_N))
    local = ad.local()
    ref_seed = local.value_and_grad(seed_g, x=3.0, y=4.0)
    ref_seed = (ref_seed[0], [ref_seed[1]["x"], ref_seed[1]["y"]])
    ref_big = local.grad(rg, x=x)["x"]
    grp = Group("W5 service")
    with BenchServer() as srv:
        client = ad.connect(srv.target, timeout=300)
        try:
            seed_req, seed_resp = _request_bytes(srv, seed_g, {"x": 3.0, "y": 4.0})
            big_req, big_resp = _request_bytes(srv, rg, {"x": x})
            grp.notes.append(f"W5 message sizes: seed request {len(seed_req)} B, response "
                             f"{len(seed_resp)} B; Rosenbrock request {len(big_req):,} B, "
                             f"response {len(big_resp):,} B")
            with EchoServer({"seed": seed_resp, "big": big_resp}) as echo:
                grp.rows += _w5_rows(cfg, grp, client, local, echo, seed_g, rg, x,
                                     (seed_req, big_req), (ref_seed, ref_big))
        finally:
            client.close()
        bad = srv.tracebacks()
        if bad:
            grp.notes.append(f"W5: the server logged {len(bad)} traceback/error lines")
    return grp


def _w5_rows(cfg, grp, client, local, echo, seed_g, rg, x, reqs, refs) -> list[Row]:
    seed_echo, big_echo = echo.method("seed"), echo.method("big")

    def sdk_seed():
        v, gr = client.value_and_grad(seed_g, x=3.0, y=4.0)
        return v, [gr["x"], gr["y"]]

    n = cfg["seed_calls"]
    rows = compare("W5 seed grad through the server, per call (p50)",
                   {"adsvc.connect() value_and_grad": sdk_seed},
                   {"bare grpcio echo of the same bytes": (
                       lambda: seed_echo(reqs[0], timeout=60), None)},
                   refs[0], math.inf, 0.0, min_rep=n // SEED_BLOCK,
                   max_rep=n // SEED_BLOCK, inner=1, block=SEED_BLOCK)
    strict = measure({"adsvc": (sdk_seed, 0.0), "echo": (
        lambda: seed_echo(reqs[0], timeout=60), 0.0)}, math.inf, 0.0, min_rep=n // 4,
        max_rep=n // 4, inner=1)
    grp.notes.append(
        f"W5 seed p50 with the two servers' calls strictly alternating ({n // 4} each; "
        f"each call follows one to the other server): adsvc "
        f"{fmt_s(statistics.median(strict['adsvc']))}, echo "
        f"{fmt_s(statistics.median(strict['echo']))} = "
        f"{statistics.median(strict['adsvc']) / statistics.median(strict['echo']):.2f}x")
    m = cfg["big_calls"]
    rows += compare("W5 8 MB Rosenbrock gradient over gRPC (p50)",
                    {"adsvc.connect() grad": lambda: client.grad(rg, x=x)["x"]},
                    {"bare grpcio echo of the same bytes": (
                        lambda: big_echo(reqs[1], timeout=120), None),
                     "adsvc.local() grad (in-process, no wire)": lambda: local.grad(rg, x=x)["x"]},
                    refs[1], math.inf, 0.0, min_rep=m, max_rep=m, inner=1)
    if rows[-2].p_times and rows[-1].p_times:
        remote, echo_t = statistics.median(rows[-2].a_times), statistics.median(
            rows[-2].p_times)
        inproc = statistics.median(rows[-1].p_times)
        grp.notes.append(
            f"W5 8 MB: remote {fmt_s(remote)} = in-process {fmt_s(inproc)} + echo "
            f"{fmt_s(echo_t)} + {fmt_s(remote - inproc - echo_t)} of adsvc's own wire "
            f"path (target: remote <= in-process + 1.5 x echo = "
            f"{fmt_s(inproc + 1.5 * echo_t)})")
    rows.append(_throughput_row(cfg, sdk_seed, lambda: seed_echo(reqs[0], timeout=60)))
    for r in rows[:1]:
        grp.notes.append(f"W5 seed per-call latency p90/p99: adsvc "
                         f"{_pct(r.a_times, 90)}/{_pct(r.a_times, 99)}, echo "
                         f"{_pct(r.p_times, 90)}/{_pct(r.p_times, 99)}")
    return rows


THROUGHPUT_THREADS = 8
SEED_BLOCK = 20  # W5 seed calls timed in a row per server, alternating servers


def _throughput_row(cfg, sdk_call, echo_call) -> Row:
    """Seed calls from THROUGHPUT_THREADS client threads at once, in alternating windows
    of adsvc and echo; each window's seconds per call (elapsed / calls), so the ratio is
    adsvc's throughput / echo's (target >= 0.7). Bounded: `throughput_windows` windows
    of `throughput_calls` calls per thread."""
    from concurrent.futures import ThreadPoolExecutor

    per = cfg["throughput_calls"]
    times: dict[str, list[float]] = {"adsvc": [], "echo": []}
    with ThreadPoolExecutor(THROUGHPUT_THREADS) as pool:
        for _ in range(cfg["throughput_windows"]):
            for label, fn in (("adsvc", sdk_call), ("echo", echo_call)):
                t0 = time.perf_counter()
                list(pool.map(lambda _, fn=fn: [fn() for _ in range(per)],
                              range(THROUGHPUT_THREADS)))
                times[label].append((time.perf_counter() - t0) / (per * THROUGHPUT_THREADS))
    return Row(f"W5 seed grad, {THROUGHPUT_THREADS} client threads: seconds per call "
               "(1 / throughput)", "adsvc.connect() value_and_grad", times["adsvc"],
               "bare grpcio echo of the same bytes", times["echo"], "—")


def _pct(ts, q) -> str:
    from _server import percentile

    return fmt_s(percentile(ts, q))


# ------------------------------------------------------------------------ W2 at 1M
def _status_bytes(key: str) -> int:
    """A /proc/self/status memory line (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def big_child_main(n: int, budget: float) -> int:
    """`--big-child N`: W2 at N nodes in this (fresh) process: adsvc's trace, compile,
    run and peak RSS first, then CasADi and the hand tape; one JSON line on stdout."""
    n_in = 10
    base = _status_bytes("VmRSS")
    (g, names), t_trace = first_call(lambda: random_scalar_graph(n, n_in))
    plan, t_compile = first_call(lambda: _compile(g))  # the native tape
    x0 = [0.1 * (i + 1) for i in range(n_in)]
    feeds = dict(zip(names, x0))

    def run():
        r = plan.run(feeds)
        return r["out"], [r[f"grad:{k}"] for k in names]

    ref = run()
    peak = _status_bytes("VmHWM")
    out = dict(n=n, nodes=n, compiled=plan.total_nodes, trace=t_trace, compile=t_compile,
               base=base, peak=peak)
    recipe = dag_recipe(n, n_in)
    fns = {"adsvc": (run, 0.0),
           "tape": (lambda: tape_value_and_grad(recipe, x0), 0.0)}
    out["check"] = {"tape": verdict(rel_err(ref, fns["tape"][0]()), TOL64)}
    if casadi is not None:
        xs, f = casadi_dag(recipe, n_in)
        fn, out["casadi_construct"] = first_call(lambda: casadi_construct(xs, f))
        out["casadi_instructions"] = fn.n_instructions()
        out["vm_instructions"] = plan.count + plan.active_instructions
        fns["casadi"] = (_casadi_call(fn, x0), 0.0)
        out["check"]["casadi"] = verdict(rel_err(ref, fns["casadi"][0]()), TOL64)
    out["times"] = measure(fns, budget, 0.02, min_rep=3, max_rep=15)
    print(json.dumps(out), flush=True)
    return 0


def w2_big(cfg) -> Group:
    """W2 at 1M nodes in a child process (its peak RSS is adsvc's alone)."""
    env = {**os.environ, "PEERS_SKIP": "torch,jax,autograd"}
    grp = Group("W2 1M")
    label = f"W2 {BIG_NODES // 10**6}M-node scalar DAG"
    try:
        p = subprocess.run([sys.executable, __file__, "--big-child", str(BIG_NODES)],
                           capture_output=True, text=True, timeout=BIG_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        grp.notes.append(f"{label}: the child took more than {BIG_TIMEOUT:.0f} s")
        return grp
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        grp.notes.append(f"{label}: the child failed (exit {p.returncode}): "
                         f"{p.stderr[-800:]}")
        return grp
    t = r["times"]
    chk = r["check"]
    rows = [Row(f"{label}: value+grad", "adsvc native tape, run", t["adsvc"],
                "hand-written tape (Python floats)", t["tape"], chk["tape"])]
    if "casadi" in t:
        folded = r["casadi_instructions"] < r["compiled"] / 10
        why = (f" — folded to {r['casadi_instructions']:,} instructions, not comparable"
               if folded else "")
        rows.insert(0, Row(rows[0].workload, rows[0].adsvc, t["adsvc"],
                           f"CasADi SX Function (value + gradient){why}", t["casadi"],
                           chk["casadi"], not folded))
        rows.append(Row(f"{label}: compile (differentiate + plan)",
                        "adsvc compile_plan (native tape)", [r["compile"]],
                        f"CasADi gradient + Function{why}", [r["casadi_construct"]], "—",
                        not folded))
        grp.notes.append(
            f"{label}: CasADi's Function has {r['casadi_instructions']:,} instructions, "
            f"adsvc's VM program {r['vm_instructions']:,}"
            + (" — the DAG is structurally constant: one of its a - a nodes (exactly 0 "
               "in CasADi, which folds x - x) starts a run of constants covering the "
               "50-value window every later node reads, so CasADi evaluates a constant "
               "while adsvc (which keeps x - x: it is NaN at ±inf) runs every node for "
               "an exactly zero gradient" if folded else ""))
    grp.rows = rows
    per = (r["peak"] - r["base"]) / r["compiled"]
    grp.notes.append(
        f"{label} (child process): traced {r['nodes']:,} nodes in {r['trace']:.1f} s; "
        f"native tape compiled in {r['compile']:.2f} s ({r['compiled']:,} registers + "
        f"adjoint instructions); peak RSS {r['peak'] / 2**30:.2f} GiB (baseline "
        f"{r['base'] / 2**20:.0f} MiB: {per:.0f} B per compiled node, the traced graph "
        f"included)")
    return grp


# -------------------------------------------------------------------------- output
def markdown(groups: list[Group]) -> str:
    """One markdown table of every group's rows (workload and adsvc cells only where
    they change)."""
    head = ["workload", "adsvc", "adsvc time", "peer", "peer time", "peer ÷ adsvc",
            "answer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    prev = None
    for grp in groups:
        for r in grp.rows:
            key = (r.workload, r.adsvc, id(r.a_times))
            left = [r.workload, r.adsvc, cell(r.a_times)] if key != prev else ["", "", ""]
            prev = key
            lines.append("| " + " | ".join(left + [r.peer, cell(r.p_times), r.ratio(),
                                                   r.check]) + " |")
    return "\n".join(lines)


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "GMM": w_gmm, "W5": w5}


def main() -> int:
    """Run the selected workloads; print the machine, the table and the notes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (< 1 minute)")
    ap.add_argument("--big", action="store_true", help="also W2 at 1M nodes (child)")
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help="comma-separated workloads (default: all)")
    ap.add_argument("--threads", type=int, help="threads of every library and server "
                    "(default: each library's own; 1 steadies a shared machine)")
    ap.add_argument("--echo-server", help=argparse.SUPPRESS)
    ap.add_argument("--big-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.echo_server:
        return echo_server_main(a.echo_server)
    if a.big_child:
        return big_child_main(a.big_child, FULL["budget"])
    chosen = [w.strip() for w in a.only.split(",") if w.strip()]
    unknown = set(chosen) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    cfg = QUICK if a.quick else FULL
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    groups = []
    for name in chosen:
        t = time.perf_counter()
        groups.append(WORKLOADS[name](cfg))
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    if a.big and "W2" in chosen:
        t = time.perf_counter()
        groups.append(w2_big(cfg))
        print(f"[W2 1M: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    print(f"Machine: {machine()}; load average {load0:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end\n")
    print(markdown(groups))
    print(f"\nCells: per-call median ±half the interquartile range; ratio = peer median ÷ "
          f"adsvc median (quartile bounds); answer: max |peer - adsvc| / max |adsvc| per "
          f"result (✓ <= {TOL64:g} in float64, {TOL32:g} in float32). "
          f"{'--quick sizes. ' if a.quick else ''}Total {time.perf_counter() - start:.0f} s.")
    for grp in groups:
        for note in grp.notes:
            print(f"- {note}")
    bad = [r for grp in groups for r in grp.rows if r.check.startswith("✗")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
