"""The native tape (adsvc/runtime/tape.py, _vmflatten.c, _vmsweeps.c) gives what the
derivative graph gives: every opcode's gradient and JVP on ordinary and awkward values
(NaN, ±inf, ±0, the zero rule of mul_or_zero, ties of maximum/minimum, pow at 0) bit
for bit against the derivative graph's plan on the VM and to 8 ulps against it on the
numpy interpreter; random scalar graphs against both and against finite differences and
the inner-product identity (numbers that do not come from our rules); VJPs with several
outputs, outputs that are inputs or constants, unreached inputs; the same signature and
the same typed errors as the general path; graphs it must leave to that path; deadlines;
graphs a million nodes deep; the server and the clients using it."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
from derivcheck import check_first_order
from hypothesis import given, settings
from hypothesis import strategies as st
from service_fixtures import running_server
from test_scalar_vm import AWKWARD, GRAPH_RTOL, _build, _same, program

import adsvc as ad
from adsvc.ir.graph import Graph
from adsvc.ir.opdef import OPS
from adsvc.passes.pipeline import compile_graph, signature
from adsvc.runtime import scalar_vm
from adsvc.runtime.plan import Plan, compile_plan
from adsvc.runtime.tape import TapePlan, tape_plan
from adsvc_protocol.errors import DeadlineExceededError, InputError, InvalidRequestError

tape_module = importlib.import_module("adsvc.runtime.tape")
pytestmark = pytest.mark.skipif(not scalar_vm.available(), reason="the VM is not built")

MODES = [(("reverse",), True), (("reverse",), False), (("forward",), False)]


def _general(g, modes, seed, vm=True) -> Plan:
    """The derivative graph's plan (on the VM or on the numpy interpreter)."""
    scalar_vm.ENABLED[0] = vm
    try:
        return Plan(compile_graph(g, modes, None, seed))
    finally:
        scalar_vm.ENABLED[0] = True


def _tape(g, modes, seed, wrt=None) -> TapePlan:
    t = tape_plan(g, modes, wrt, seed, lambda: compile_graph(g, modes, wrt, seed))
    assert isinstance(t, TapePlan)
    return t


def _with_seeds(plan, feeds, rng=None):
    """`feeds` plus a value for every tangent / cotangent input of `plan`."""
    out = dict(feeds)
    for k, v in enumerate(n for n in plan.inputs if n not in feeds):
        out[v] = 1.0 + 0.5 * k if rng is None else float(rng.standard_normal())
    return out


def _exact(a, b, what):
    a, b = float(a), float(b)
    assert (a == b and np.signbit(a) == np.signbit(b)) or (np.isnan(a) and np.isnan(b)), \
        f"{what}: tape {a!r}, derivative graph {b!r}"


def _op_graph(op):
    if op == "where":
        return (ad.trace(lambda c, a, b: ad.where(c, a, b), c=ad.boolean(), a=ad.f64(),
                         b=ad.f64()),
                [{"c": c, "a": a, "b": b} for c in (True, False)
                 for a, b in itertools.product(AWKWARD[:6], AWKWARD[-3:])])
    names = [f"x{i}" for i in range(OPS[op].arity)]
    build = getattr(ad.ops.api, op)
    g = ad.trace(lambda **xs: build(*[xs[n] for n in names]), **{n: ad.f64() for n in names})
    return g, [dict(zip(names, v)) for v in itertools.product(AWKWARD, repeat=len(names))]


DIFFERENTIABLE = sorted(o for o in scalar_vm.OPCODES
                        if o not in ("reshape", "broadcast_to", "transpose")
                        and OPS[o].vjp is not None)


@pytest.mark.parametrize("op", DIFFERENTIABLE)
@pytest.mark.parametrize("modes,seed", MODES)
def test_each_op_derivative_equals_the_derivative_graph_bit_for_bit(op, modes, seed):
    g, cases = _op_graph(op)
    tape, vm, interp = _tape(g, modes, seed), _general(g, modes, seed), \
        _general(g, modes, seed, vm=False)
    assert tape.signature == signature(vm.graph)
    with np.errstate(all="ignore"):
        for feeds in cases:
            feeds = _with_seeds(tape, feeds)
            got, want, ref = tape.run(feeds), vm.run(feeds), interp.run(feeds)
            assert list(got) == list(want)
            for k in got:
                assert got[k].dtype == want[k].dtype and got[k].shape == ()
                _exact(got[k], want[k], f"{op} {modes} {k} at {feeds}")
                _same(got[k], ref[k])


def test_the_zero_rule_and_awkward_points():
    # where's untaken side gets exactly 0 (not nan * 0); sqrt'(0) = inf; abs'(0) = 0;
    # maximum at a tie splits 1/2 - 1/2; d/db a**b at a == 0 is 0
    cases = [
        (lambda x: ad.where(x > 0.0, ad.sqrt(x), 0.0), {"x": -1.0}, {"grad:x": 0.0}),
        (lambda x: ad.sqrt(x), {"x": 0.0}, {"grad:x": np.inf}),
        (lambda x: ad.abs(x), {"x": 0.0}, {"grad:x": 0.0}),
        (lambda x, y: ad.maximum(x, y), {"x": 2.0, "y": 2.0}, {"grad:x": 0.5, "grad:y": 0.5}),
        (lambda x, y: x ** y, {"x": 0.0, "y": 2.0}, {"grad:x": 0.0, "grad:y": 0.0}),
        (lambda x: ad.stop_gradient(x) * x, {"x": 3.0}, {"grad:x": 3.0}),
        (lambda x: ad.sign(x) * x, {"x": -2.0}, {"grad:x": -1.0}),
    ]
    for fn, feeds, want in cases:
        g = ad.trace(fn, **{k: ad.f64() for k in feeds})
        got = _tape(g, ("reverse",), True).run(feeds)
        for k, v in want.items():
            assert float(got[k]) == v, (k, float(got[k]), v)


@settings(max_examples=80, deadline=None)
@given(program, st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=4, max_size=4),
       st.sampled_from(MODES))
def test_random_scalar_graphs_equal_the_derivative_graph(p, xs, mode_seed):
    modes, seed = mode_seed
    g, names = _build(p)
    feeds = _with_seeds(_tape(g, modes, seed), dict(zip(names, xs)))
    got = _tape(g, modes, seed).run(feeds)
    with np.errstate(all="ignore"):
        for plan in (_general(g, modes, seed), _general(g, modes, seed, vm=False)):
            want = plan.run(feeds)
            assert list(got) == list(want)
            for k in got:  # only the order of summed contributions may differ
                _same(got[k], want[k], GRAPH_RTOL)


def test_random_graphs_against_finite_differences_and_the_inner_product():
    rng = np.random.default_rng(7)
    c = ad.local()
    for _ in range(20):
        steps = [(bool(rng.random() < 0.5), *map(int, rng.integers(0, 100, 3)))
                 for _ in range(int(rng.integers(5, 60)))]
        g, names = _build({"n_inputs": 3, "steps": steps})
        feeds = {n: float(rng.uniform(0.3, 1.2)) for n in names}
        assert isinstance(c._compile(g, ("reverse",), None, False, None).handle, TapePlan)
        assert isinstance(c._compile(g, ("forward",), None, False, None).handle, TapePlan)
        with np.errstate(all="ignore"):
            if np.isfinite(float(c.evaluate(g, feeds)["out"])):
                check_first_order(c, g, feeds, rng)


def test_vjp_of_several_outputs_sharing_nodes_and_odd_outputs():
    def fn(x, y, z):
        s = ad.sin(x * y)
        return {"a": s + y, "b": s * s, "x_itself": x, "const": ad.stop_gradient(x) + 2.0,
                "flag": x > y}
    g = ad.trace(fn, x=ad.f64(), y=ad.f64(), z=ad.f64())  # z reaches nothing
    feeds = {"x": 0.7, "y": -1.3, "z": 5.0}
    for modes, seed in MODES[1:]:
        tape, want_plan = _tape(g, modes, seed), _general(g, modes, seed)
        assert tape.signature == signature(want_plan.graph)
        feeds_all = _with_seeds(tape, feeds)
        got, want = tape.run(feeds_all), want_plan.run(feeds_all)
        assert list(got) == list(want)
        for k in got:
            assert got[k].dtype == want[k].dtype
            _same(got[k], want[k], GRAPH_RTOL)
        if modes == ("reverse",):
            assert float(got["grad:z"]) == 0.0 and not np.signbit(float(got["grad:z"]))


def test_a_tape_without_instructions():
    """Outputs that are inputs (here one through neg(neg(x)), which simplifies to x): no
    instruction at all. The empty program's placeholder once was a copy r0 = r0, and the
    adjoint sweep doubled the seed through it (a VJP of 2 for y = x; found by
    test_random_graphs)."""
    g = ad.trace(lambda x, y: {"out": ad.neg(ad.neg(x)), "y": y}, x=ad.f64(), y=ad.f64())
    feeds = {"x": 0.25, "y": -4.0}
    for modes, seed in MODES[1:]:
        tape, want_plan = _tape(g, modes, seed), _general(g, modes, seed)
        assert tape.count == 0
        feeds_all = _with_seeds(tape, feeds)
        got, want = tape.run(feeds_all), want_plan.run(feeds_all)
        assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}
    c = ad.local()
    assert c.vjp(g, feeds, {"out": 3.0, "y": 0.5})[1] == {"x": 3.0, "y": 0.5}
    assert c.jvp(g, feeds, {"x": 2.0, "y": 1.0})[1] == {"out": 2.0, "y": 1.0}
    one = ad.trace(lambda x: ad.neg(ad.neg(x)), x=ad.f64())
    assert c.value_and_grad(one, x=1.5) == (1.5, {"x": 1.0})


def test_wrt_subset_and_errors_are_those_of_the_general_path():
    g = ad.trace(lambda x, y: x * y + ad.sin(x), x=ad.f64(), y=ad.f64())
    t = _tape(g, ("reverse",), True, wrt=("y",))
    assert list(t.run({"x": 2.0, "y": 3.0})) == ["out", "grad:y"]
    assert float(t.run({"x": 2.0, "y": 3.0})["grad:y"]) == 2.0
    for wrt in (("nope",), ("x", "x")):
        with pytest.raises(InvalidRequestError) as a:
            tape_plan(g, ("reverse",), wrt, True, None)
        with pytest.raises(InvalidRequestError) as b:
            compile_graph(g, ("reverse",), wrt, True)
        assert (a.value.field, a.value.description) == (b.value.field, b.value.description)
    two = ad.trace(lambda x: {"a": x * 2.0, "b": x * 3.0}, x=ad.f64())
    with pytest.raises(InvalidRequestError, match="exactly one scalar float output"):
        tape_plan(two, ("reverse",), None, True, None)
    base = ad.trace(lambda x: x * 2.0, x=ad.f64())  # a graph not traced (a proto's) may
    clash = Graph(base.inputs, [("out", base.outputs[0][1]), ("grad:x", base.inputs[0])])
    with pytest.raises(InvalidRequestError, match="grad:x"):
        tape_plan(clash, ("reverse",), None, True, None)
    for bad, field in (({"x": 1.0}, "inputs.y"), ({"x": 1.0, "y": "a"}, "inputs.y"),
                       ({"x": 1.0, "y": 2.0, "w": 1.0}, "inputs.w")):
        with pytest.raises(InputError) as e:
            _tape(g, ("reverse",), True).run(bad)
        assert e.value.field == field


def test_graphs_the_tape_leaves_to_the_general_path():
    cases = [
        ad.trace(lambda x: ad.sum(x * x), x=ad.f64(3)),  # a tensor
        ad.trace(lambda x: ad.fori_loop(0, 3, lambda i, c: c * x, x), x=ad.f64()),  # a loop
        ad.trace(lambda x, n: x * ad.cast(n, "float64"), x=ad.f64(), n=ad.i64()),  # an int
    ]
    for g in cases:
        assert tape_plan(g, ("reverse",), None, True, None) is None
        assert not isinstance(compile_plan(g, ("reverse",), None, True), TapePlan)
    seed = ad.trace(lambda x: x * x, x=ad.f64())
    assert tape_plan(seed, ("reverse", "forward"), None, True, None) is None  # order 2
    assert tape_plan(seed, (), None, False, None) is None


def test_the_differentiated_graph_is_built_only_when_asked_for():
    g = ad.trace(lambda x, y: x * x + x * y + 2.0, x=ad.f64(), y=ad.f64())
    t = compile_plan(g, ("reverse",), None, True)
    assert isinstance(t, TapePlan) and not t.graph_built
    assert float(t.run({"x": 3.0, "y": 4.0})["grad:x"]) == 10.0
    assert not t.graph_built
    assert t.graph.key == compile_graph(g, ("reverse",), None, True).key
    assert t.graph_built


def test_deadlines_stop_the_sweeps_between_chunks(monkeypatch):
    chunk = 1000
    monkeypatch.setattr(scalar_vm, "CHUNK", chunk)
    monkeypatch.setattr(tape_module, "CHUNK", chunk)
    g = ad.trace(lambda x: _chain(x, 3 * chunk), x=ad.f64())
    t = _tape(g, ("reverse",), True)
    calls = []

    def interrupt(steps, upcoming=0.0):
        calls.append(steps)
        if steps > 3 * chunk:  # in the reverse sweep
            raise DeadlineExceededError("deadline")
    with pytest.raises(DeadlineExceededError):
        t.run({"x": 0.5}, interrupt)
    assert calls == [0, chunk, 2 * chunk, 3 * chunk, 4 * chunk]


def _chain(x, n):
    for k in range(n):
        x = ad.sin(x) if k % 2 else -x
    return x


def test_a_graph_hundreds_of_thousands_of_nodes_deep():
    # the C walk is iterative (a recursive one overflows the C stack long before this)
    n = 200_000
    g = ad.trace(lambda x: _chain(x, n), x=ad.f64())
    t = _tape(g, ("reverse",), True)
    assert t.count == n
    v, dv = 0.5, 1.0
    for k in range(n):  # the same chain and its derivative on Python floats
        v, dv = (math.sin(v), dv * math.cos(v)) if k % 2 else (-v, -dv)
    got = t.run({"x": 0.5})
    assert float(got["out"]) == v
    assert float(got["grad:x"]) == pytest.approx(dv, rel=1e-12)


def test_clients_use_the_tape_and_answer_as_before():
    g = ad.trace(lambda x, y: x * x + x * y + 2.0, x=ad.f64(), y=ad.f64())
    local = ad.local()
    assert isinstance(local._compile(g, ("reverse",), None, True, None).handle, TapePlan)
    with running_server() as (srv, target), ad.connect(target, timeout=60) as remote:
        for c in (local, remote):
            value, grads = c.value_and_grad(g, x=3.0, y=4.0)
            assert float(value) == 23.0 and float(grads["x"]) == 10.0 and float(grads["y"]) == 3.0
            out, tangent = c.jvp(g, {"x": 3.0, "y": 4.0}, {"x": 1.0, "y": 0.0})
            assert float(tangent["out"]) == 10.0
        d = remote.differentiate(g, mode="reverse", seed=True)  # the tape's graph, built now
        assert d.key == compile_graph(g, ("reverse",), None, True).key
        cache = srv.adsvc_servicer.compiler.cache
        kinds = {type(e.plan) for e, _ in cache._items.values()}
        assert TapePlan in kinds
