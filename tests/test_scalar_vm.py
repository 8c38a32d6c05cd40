"""The native scalar VM (adsvc/runtime/_scalarvm.c) computes what the numpy interpreter
computes: every opcode against its op's numpy kernel on ordinary and awkward values
(NaN, ±inf, ±0, the zero rule of mul_or_zero), random scalar graphs and their
derivatives (gradient, Hessian) in both modes against the interpreter and against
finite differences, scalar loop bodies, and the graphs it must leave to numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from derivcheck import check_first_order, check_second_order
from hypothesis import given, settings
from hypothesis import strategies as st
from test_random_graphs import BINARY, UNARY

import adsvc as ad
from adsvc.ir.opdef import OPS
from adsvc.runtime import scalar_vm
from adsvc.runtime.plan import Plan
from adsvc.runtime.tape import TapePlan

pytestmark = pytest.mark.skipif(not scalar_vm.available(), reason="the VM is not built")

AWKWARD = [0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 3.0, 1e-300, -1e300, np.inf, -np.inf, np.nan, 40.0]


def _interpreted(plan: Plan):
    """The same plan on the numpy interpreter."""
    scalar_vm.ENABLED[0] = False
    try:
        return Plan(plan.graph)
    finally:
        scalar_vm.ENABLED[0] = True


def _same(a, b, rtol=4e-16 * 8):
    a, b = np.asarray(a, float), np.asarray(b, float)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=0, equal_nan=True)


# The VM calls the C library's exp/log/pow/tanh; numpy has its own (vectorized) ones,
# which differ from them by an ulp or two. One op is compared at 8 ulps; a derivative
# graph compounds a few such differences through its chain of products (seen: 4.6e-15
# on d/dx (1 + a^2)^tanh(b)), so whole graphs are compared at 1e-13.
GRAPH_RTOL = 1e-13


def test_every_opcode_names_an_op_of_the_table():
    assert set(scalar_vm.OPCODES) <= set(OPS)


@pytest.mark.parametrize("op", sorted(o for o in scalar_vm.OPCODES
                                      if o not in ("reshape", "broadcast_to", "transpose")))
def test_each_opcode_equals_the_numpy_kernel(op):
    arity = OPS[op].arity
    if op == "where":
        g = ad.trace(lambda c, a, b: ad.where(c, a, b), c=ad.boolean(), a=ad.f64(), b=ad.f64())
        cases = [{"c": c, "a": a, "b": b} for c in (True, False) for a, b in
                 itertools.product(AWKWARD[:6], AWKWARD[-3:])]
    else:
        names = [f"x{i}" for i in range(arity)]
        build = getattr(ad.ops.api, op)
        g = ad.trace(lambda **xs: build(*[xs[n] for n in names]), **{n: ad.f64() for n in names})
        cases = [dict(zip(names, v)) for v in itertools.product(AWKWARD, repeat=arity)]
    plan = Plan(g)
    assert plan.program is not None, f"{op} did not run on the VM"
    ref = _interpreted(plan)
    assert ref.program is None
    with np.errstate(all="ignore"):
        for feeds in cases:
            got, want = plan.run(feeds)["out"], ref.run(feeds)["out"]
            assert got.dtype == want.dtype and got.shape == want.shape == ()
            _same(got, want)


def test_mul_or_zero_keeps_the_zero_rule():
    g = ad.trace(lambda a, b: ad.mul_or_zero(a, b))
    plan = Plan(g)
    assert plan.program is not None
    assert float(plan.run({"a": 0.0, "b": np.inf})["out"]) == 0.0
    assert np.isnan(float(plan.run({"a": np.nan, "b": 2.0})["out"]))


program = st.fixed_dictionaries({
    "n_inputs": st.integers(1, 4),
    "steps": st.lists(st.tuples(st.booleans(), st.integers(0, 100), st.integers(0, 100),
                                st.integers(0, 100)), min_size=1, max_size=40),
})


def _build(p):
    names = [f"x{i}" for i in range(p["n_inputs"])]

    def fn(**xs):
        vals = [xs[n] for n in names]
        for is_unary, op, i, j in p["steps"]:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            vals.append(UNARY[op % len(UNARY)](a) if is_unary else BINARY[op % len(BINARY)](a, b))
        return vals[-1]
    return ad.trace(fn, **{n: ad.f64() for n in names}), names


@settings(max_examples=60, deadline=None)
@given(program, st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=4, max_size=4))
def test_random_scalar_graphs_and_their_derivatives_equal_the_interpreter(p, xs):
    g, names = _build(p)
    feeds = {n: xs[k] + np.sqrt(2.0) * (k + 1) / 7 for k, n in enumerate(names)}
    for modes in ((), ("reverse",), ("forward",), ("reverse", "forward")):
        d = ad.differentiate(g, list(modes)) if modes else g
        plan = Plan(d)
        assert plan.program is not None
        extra = {n.name: 1.0 for n in d.inputs if n.name not in feeds}  # seeds, cotangents
        got, want = plan.run({**feeds, **extra}), _interpreted(plan).run({**feeds, **extra})
        assert list(got) == list(want)
        for k in got:
            _same(got[k], want[k], GRAPH_RTOL)


def test_vm_derivatives_against_finite_differences():
    g, names = _build({"n_inputs": 3, "steps": [(i % 3 == 0, 7 * i + 1, 3 * i, 5 * i + 2)
                                                 for i in range(60)]})
    feeds = {n: 0.3 * (k + 1) for k, n in enumerate(names)}
    c = ad.local()
    # first order: the native tape (runtime.tape); second order: the derivative graph's
    # plan on the VM
    assert isinstance(c._compile(g, ("reverse",), None, True, None).handle, TapePlan)
    assert c._compile(g, ("reverse", "forward"), None, True, None).handle.program is not None
    check_first_order(c, g, feeds, np.random.default_rng(0))
    check_second_order(c, g, feeds, np.random.default_rng(1))


def test_scalar_loop_bodies_run_on_the_vm():
    g = ad.trace(lambda x: ad.scan(lambda c, _: (ad.sin(c) * x + 0.1, c), x, length=50)[0])
    d = ad.differentiate(g, "reverse", seed=True)
    plan = Plan(d)
    assert plan.program is None  # the top level has tuples: numpy steps
    bodies = [p for p in plan._plans.values()]
    assert bodies and all(b.program is not None for b in bodies)
    got, want = plan.run({"x": 0.7}), _interpreted(plan).run({"x": 0.7})
    for k in got:
        _same(got[k], want[k], GRAPH_RTOL)


@pytest.mark.parametrize("fn, specs", [
    (lambda x: ad.sum(x * x), {"x": ad.f64(3)}),           # a tensor
    (lambda x: x * x, {"x": ad.f32()}),                     # float32
    (lambda x: ad.cast(x, "int64"), {"x": ad.f64()}),       # an op with no opcode
    (lambda i: i * 2, {"i": ad.i64()}),                     # integers
])
def test_graphs_the_vm_leaves_to_numpy(fn, specs):
    assert Plan(ad.trace(fn, **specs)).program is None


def test_a_deadline_stops_a_long_vm_program():
    from adsvc_protocol.errors import DeadlineExceededError
    g, names = _build({"n_inputs": 1, "steps": [(True, i, i, i) for i in range(200_000)]})
    plan = Plan(g)
    assert plan.program is not None and plan.program.count > scalar_vm.CHUNK
    calls = []

    def interrupt(steps=0, upcoming=0.0):
        calls.append(steps)
        if len(calls) > 1:
            raise DeadlineExceededError("stop")
    with pytest.raises(DeadlineExceededError):
        plan.run({"x0": 0.1}, interrupt=interrupt)
    assert calls == [0, scalar_vm.CHUNK]
