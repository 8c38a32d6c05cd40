"""Fused elementwise chains (adsvc/runtime/fusion.py) and reused buffers
(adsvc/runtime/buffers.py) change no number: plans with them equal plans without them
exactly (NaN, ±inf and the zero rule of mul_or_zero included; see `_identical` on the
sign of zeros), on random
elementwise graphs and their derivatives, on the slice cotangents fused by
`fuse_pad_sums`; a reused buffer is never one something else can still see (views,
outputs the caller keeps and modifies, inputs); graphs stay correct against finite
differences."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from derivcheck import check_first_order

import adsvc as ad
from adsvc.passes.pipeline import compile_graph
from adsvc.runtime import buffers, scalar_vm
from adsvc.runtime.fusion import FusedKernel, PadSum
from adsvc.runtime.plan import Plan

plan_module = importlib.import_module("adsvc.runtime.plan")
N = 1 << 16  # above fusion.MIN_ELEMENTS and buffers.MIN_BYTES
pytestmark = pytest.mark.skipif(not scalar_vm.available(), reason="the VM is not built")


def _plain(graph, monkeypatch) -> Plan:
    """The plan of `graph` with neither fusion nor buffer reuse."""
    with monkeypatch.context() as m:
        m.setattr(plan_module, "fuse", lambda steps, nodes, keep: steps)
        m.setattr(plan_module, "fuse_pad_sums", lambda steps, nodes, keep: steps)
        m.setattr(plan_module, "out_key", lambda fn, node: None)
        p = Plan(graph)
        p.steps  # noqa: B018  (built while patched)
    return p


def _identical(a, b, what=""):
    """Same shape, dtype, NaN positions and values elsewhere, exactly (array_equal: a
    zero's sign is not compared, but 1/x of it would show)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), what


def _awkward(rng, n, dtype=np.float64):
    x = rng.standard_normal(n)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e308, -1e-308, 1.0])
    x[rng.integers(0, n, 200)] = rng.choice(special, 200)
    with np.errstate(over="ignore"):  # 1e308 is inf in float32
        return x.astype(dtype)


def _random_fn(seed):
    rng = np.random.default_rng(seed)
    ops = [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / b,
           lambda a, b: -a, lambda a, b: ad.square(a), lambda a, b: ad.reciprocal(a),
           lambda a, b: ad.abs(a), lambda a, b: ad.sqrt(ad.abs(a)),
           lambda a, b: ad.where(a > b, a, b * 2.0), lambda a, b: ad.mul_or_zero(a, b),
           lambda a, b: ad.sin(a) * b]
    picks = [(int(rng.integers(len(ops))), int(rng.integers(0, 100)), int(rng.integers(0, 100)))
             for _ in range(int(rng.integers(4, 25)))]

    def fn(x, y):
        vals = [x, y]
        for op, i, j in picks:
            vals.append(ops[op](vals[i % len(vals)], vals[j % len(vals)]))
        return {"out": ad.sum(vals[-1] * vals[-2]), "last": vals[-1]}
    return fn


@pytest.mark.parametrize(("seed", "dtype"), [(s, np.float64) for s in range(12)] +
                         [(s, np.float32) for s in range(12, 18)])
def test_fused_plans_equal_unfused_plans_exactly(seed, dtype, monkeypatch):
    spec = ad.f64 if dtype == np.float64 else ad.f32
    g = ad.trace(_random_fn(seed), x=spec(N), y=spec(N))
    rng = np.random.default_rng(100 + seed)
    feeds = {"x": _awkward(rng, N, dtype), "y": _awkward(rng, N, dtype)}
    for graph in (g, compile_graph(g, ("reverse",), None, False)):
        full = {**feeds, **{k: _awkward(rng, N, dtype) if s else dtype(rng.standard_normal())
                            for k, (_, s) in Plan(graph).inputs.items() if k not in feeds}}
        fused, plain = Plan(graph), _plain(graph, monkeypatch)
        assert any(isinstance(step[0], FusedKernel) for step in fused.steps)
        for _ in range(2):  # the second run reuses buffers the first one freed
            got, want = fused.run(full), plain.run(full)
            for k in want:
                _identical(got[k], want[k], f"seed {seed} output {k}")


def test_rosenbrock_gradient_fuses_and_is_exact(monkeypatch):
    def rosen(x):
        return ad.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
    g = ad.trace(rosen, x=ad.f64(N))
    d = compile_graph(g, ("reverse",), None, True)
    p = Plan(d)
    kinds = [type(fn) for fn, *_ in p.steps]
    assert FusedKernel in kinds and PadSum in kinds
    assert len(p.steps) < len(_plain(d, monkeypatch).steps) - 5
    x = _awkward(np.random.default_rng(3), N)
    for k, v in _plain(d, monkeypatch).run({"x": x}).items():
        _identical(p.run({"x": x})[k], v, k)
    x = np.random.default_rng(4).standard_normal(N)  # against scipy's hand-written rule
    from scipy.optimize import rosen_der
    np.testing.assert_allclose(p.run({"x": x})["grad:x"], rosen_der(x), rtol=1e-13,
                               atol=1e-12)


def test_reused_buffers_are_never_visible_elsewhere():
    def fn(x):
        a = x * 2.0 + 1.0
        b = ad.reshape(a, (N // 2, 2))  # a view of a, an output: a must not be reused
        c = (x - 3.0) * (x + 3.0)
        return {"b": b, "c": c, "d": ad.sum(c * c), "e": x * 1.0 + 0.0}
    g = ad.trace(fn, x=ad.f64(N))
    p = Plan(g)
    x = np.random.default_rng(5).standard_normal(N)
    x_before = x.copy()
    first = p.run({"x": x})
    keep = {k: v.copy() for k, v in first.items()}
    first["c"][:] = 7.0  # the caller owns its outputs
    second = p.run({"x": x})
    for k in keep:
        _identical(second[k], keep[k], k)
    _identical(x, x_before, "the input")
    assert all(second[k] is not first[k] for k in first)
    assert not np.shares_memory(second["b"], first["b"])


def test_without_the_vm_nothing_is_fused(monkeypatch):
    monkeypatch.setattr(scalar_vm, "ENABLED", [False])
    g = ad.trace(lambda x: ad.sum((x * 2.0 + 1.0) * x), x=ad.f64(N))
    p = Plan(g)
    assert not any(isinstance(fn, FusedKernel) for fn, *_ in p.steps)
    x = np.arange(N, dtype=float)
    assert float(p.run({"x": x})["out"]) == float(np.sum((x * 2.0 + 1.0) * x))


def test_fused_graphs_against_finite_differences():
    c = ad.local()
    rng = np.random.default_rng(9)
    g = ad.trace(lambda x, y: ad.sum(ad.where(x > 0.0, x * y, -y) / (1.0 + x * x)),
                 x=ad.f64(N), y=ad.f64(N))
    feeds = {"x": rng.standard_normal(N), "y": rng.standard_normal(N)}
    check_first_order(c, g, feeds, rng)


def _code(*instructions) -> bytes:
    return np.array(instructions, np.int32).tobytes()


def test_block_vm_checks_its_program_and_leaves():
    a, out = np.ones(N), np.empty(N)
    mul = scalar_vm.OPCODES["mul"]
    bad = {
        "an op without a block form": (_code([scalar_vm.OPCODES["exp"], 1, 0, 0, 0]), (a,), 1),
        "a register past the last": (_code([mul, 1, 0, 5, 0]), (a,), 1),
        "a result in a leaf": (_code([mul, 0, 0, 0, 0]), (a,), 1),
        "a last instruction reading its result": (_code([mul, 1, 0, 0, 0],
                                                        [mul, 1, 1, 0, 0]), (a,), 1),
        "a leaf of another size": (_code([mul, 1, 0, 0, 0]), (np.ones(N - 1),), 1),
        "a float32 leaf": (_code([mul, 1, 0, 0, 0]), (np.ones(N, np.float32),), 1),
        "an empty program": (b"", (a,), 1),
    }
    for what, (code, leaves, temps) in bad.items():
        with pytest.raises(ValueError):
            scalar_vm.blocks(code, leaves, out, temps)
            pytest.fail(what)


def test_fused_kernel_reads_every_leaf_form():
    """Bool conditions, single values of shape (1,) and (), non-contiguous views and
    big-endian arrays: each read as numpy reads it."""
    rng = np.random.default_rng(11)
    x = _awkward(rng, 2 * N)
    cond = rng.standard_normal(N) > 0
    b = _awkward(rng, N)

    def fn(x, c, b, k):
        return ad.where(c, x * k - b, ad.sqrt(ad.abs(x)) / (b + 2.0))
    g = ad.trace(fn, x=ad.f64(N), c=ad.boolean(N), b=ad.f64(N), k=ad.f64(1))
    p = Plan(g)
    with np.errstate(all="ignore"):
        want = np.where(cond, x[::2] * 3.0 - b, np.sqrt(np.abs(x[::2])) / (b + 2.0))
    _identical(p.run({"x": x[::2], "c": cond, "b": b, "k": np.array([3.0])})["out"], want)
    [(kernel, leaves)] = [(fn, ins) for fn, ins, *_ in p.steps if isinstance(fn, FusedKernel)]
    forms = {"x": x[::2], "c": cond, "b": b.astype(">f8"), "k": np.array([3.0])}
    slot = {n.name: p._slot[id(n)] for n in g.inputs}
    values = {s: forms[name] for name, s in slot.items()}
    values.update({s: v for s, v in enumerate(p.template) if v is not None})
    assert not values[slot["x"]].flags.c_contiguous and not values[slot["b"]].dtype.isnative
    _identical(kernel(*[values[s] for s in leaves]), want)


def test_spares_are_bounded_and_never_outputs():
    """Arrays a run leaves in its pool are kept for later runs (newest first, at most
    PER_KEY per shape and `limit` bytes in all); outputs and inputs never are."""
    spares = buffers.Spares(limit=3 * N * 8)
    key = ((N,), np.dtype(np.float64))
    spares.keep(key, [np.empty(N) for _ in range(buffers.PER_KEY + 2)])
    assert spares.bytes == buffers.PER_KEY * N * 8
    spares.keep(((4 * N,), np.dtype(np.float64)), [np.empty(4 * N)])
    assert spares.bytes == buffers.PER_KEY * N * 8  # over the limit on its own: not kept
    assert spares.take(key) is not None and spares.bytes == (buffers.PER_KEY - 1) * N * 8
    newer = ((N, 2), np.dtype(np.float64))
    spares.keep(newer, [np.empty((N, 2))])  # room made by the older shape's
    assert spares.bytes <= spares.limit and spares.take(newer) is not None
    spares.clear()
    assert spares.bytes == 0 and spares.take(key) is None

    buffers.SPARES.clear()
    g = ad.trace(lambda x: {"y": (x * 2.0 + 1.0) * x, "s": ad.sum(x * x - 3.0)}, x=ad.f64(N))
    p = Plan(g)
    x = np.random.default_rng(8).standard_normal(N)
    first = p.run({"x": x})
    held = [a for arrays in buffers.SPARES._arrays.values() for a in arrays]
    assert held and all(not np.shares_memory(a, v) for a in held for v in (*first.values(), x))
    second = p.run({"x": x})  # takes the spares
    for k in first:
        _identical(second[k], first[k], k)
        assert not np.shares_memory(second[k], first[k])
    ad.local().close()  # a client's close drops them
    assert buffers.SPARES.bytes == 0


def test_grad_runs_without_the_value():
    """`grad` evaluates the gradient graph cut to the gradients (the value's own steps
    are not run), equal to value_and_grad's gradient exactly."""
    c = ad.local()
    g = ad.trace(lambda x: ad.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2),
                 x=ad.f64(N))
    x = np.random.default_rng(6).standard_normal(N)
    value, want = c.value_and_grad(g, x=x)
    got = c.grad(g, x=x)
    _identical(got["x"], want["x"])
    plan = c._compile(g, ("reverse",), None, True, None).handle
    cut = plan.only(("grad:x",))
    assert cut is plan.only(("grad:x",)) and plan.only(("out", "grad:x")) is plan
    assert [n for n, _ in cut.outputs] == ["grad:x"] and len(cut.steps) < len(plan.steps)
    assert "sum" not in {node.op for *_, node in cut.steps}
    assert plan.only(("grad:x", "grad:x")) is cut  # one selection, however it is written
    g3 = ad.trace(lambda x: {f"o{i}": x * float(i) for i in range(8)}, x=ad.f64(N))
    p3 = Plan(g3)
    for i in range(8):  # a client asking for ever new selections: at most CUTS kept
        assert [n for n, _ in p3.only((f"o{i}", "o0")).outputs] == sorted({"o0", f"o{i}"})
    assert len(p3._cut._items) == Plan.CUTS
    s = ad.trace(lambda x, y: x * y + ad.sin(x), x=ad.f64(), y=ad.f64())  # a tape
    assert c.grad(s, x=0.5, y=2.0) == c.value_and_grad(s, x=0.5, y=2.0)[1]


def test_broadcast_regions_equal_unfused_plans_exactly(monkeypatch):
    """Regions whose leaves broadcast ((64,1,32) against (1,40,32) and (40,1)), as the
    Gaussian mixture's, and their reverse-mode graph: fused equals unfused exactly."""
    def fn(a, b, s):
        z = (a - b) * s
        return ad.sum(ad.where(z > 0.0, z * z, -z) / (1.0 + ad.abs(b)))
    g = ad.trace(fn, a=ad.f64(64, 1, 32), b=ad.f64(1, 40, 32), s=ad.f64(40, 1))
    rng = np.random.default_rng(12)
    feeds = {"a": _awkward(rng, 64 * 32).reshape(64, 1, 32),
             "b": _awkward(rng, 40 * 32).reshape(1, 40, 32), "s": rng.standard_normal((40, 1))}
    for graph in (g, compile_graph(g, ("reverse",), None, True)):
        fused, plain = Plan(graph), _plain(graph, monkeypatch)
        assert any(isinstance(step[0], FusedKernel) and len({nodes.shape for nodes in
                   (graph.nodes[s] for s in step[1])}) > 1 for step in fused.steps)
        for _ in range(2):
            got, want = fused.run(feeds), plain.run(feeds)
            for k in want:
                _identical(got[k], want[k], k)


@pytest.mark.parametrize("cmp", ["lt", "le", "gt", "ge", "eq", "ne"])
def test_each_comparison_fuses_exactly(cmp, monkeypatch):
    """Every comparison of the block VM inside a where (the random graphs use only >),
    against the unfused plan, with ties, NaN, ±inf and ±0."""
    op = getattr(ad, cmp)
    g = ad.trace(lambda x, y: ad.where(op(x, y), x * y, y - x), x=ad.f64(N), y=ad.f64(N))
    rng = np.random.default_rng(21)
    x = _awkward(rng, N)
    y = np.where(rng.random(N) < 0.2, x, _awkward(rng, N))  # ties too
    fused, plain = Plan(g), _plain(g, monkeypatch)
    [kernel] = [fn for fn, *_ in fused.steps if isinstance(fn, FusedKernel)]
    assert scalar_vm.OPCODES[cmp] in np.frombuffer(kernel.program, np.int32)[::5]
    _identical(fused.run({"x": x, "y": y})["out"], plain.run({"x": x, "y": y})["out"], cmp)
