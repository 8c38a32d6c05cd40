"""The IR and the evaluator: interning, text form, memoization, liveness, deadlines."""

import numpy as np
import pytest

import adsvc as ad
from adsvc.errors import DeadlineExceededError
from adsvc.runtime.plan import Plan


def test_nodes_are_interned():
    x = ad.trace(lambda x: x, x=ad.f64(3)).input("x")
    assert ad.sin(x) * 2.0 is ad.sin(x) * 2.0
    assert ad.sum(x, 0) is ad.sum(x, (0,), keepdims=False)
    assert ad.constant([1.0, 2.0]) is ad.constant(np.array([1.0, 2.0]))
    assert ad.constant([1.0, 2.0]) is not ad.constant([1.0, 3.0])


def test_mixed_dtypes_cannot_be_built():
    with pytest.raises(ad.errors.DTypeError, match="dtypes differ.*use cast"):
        ad.trace(lambda x, y: x * y, x=ad.f64(2, 3), y=ad.f32(3))


def test_text_form_lines():
    g = ad.trace(lambda x, y: {"z": ad.sum(x * y, 0, keepdims=True)}, x=ad.f64(2, 3),
                 y=ad.f64(3), name="f")
    assert g.text().splitlines() == [
        "graph f(x: f64[2,3], y: f64[3]) {",
        "  %0 = input x : f64[2,3]",
        "  %1 = input y : f64[3]",
        "  %2 = mul %0, %1 : f64[2,3]",
        "  %3 = sum %2 {axes=[0], keepdims=True} : f64[1,3]",
        "  return z = %3",
        "}",
    ]


def test_each_node_computed_once():
    """A shared subexpression is one node, one step: sin(x) is evaluated once even though
    the function and its gradient use it four times."""
    g = ad.trace(lambda x: ad.sin(x) * ad.sin(x) + ad.exp(ad.sin(x)), x=ad.f64(3))
    d = ad.local().differentiate(g, "reverse", seed=False)
    plan = Plan(d)
    ops = [step[4].op for step in plan.steps]
    assert ops.count("sin") == 1 and ops.count("exp") == 1
    calls = []
    for i, (fn, ins, out, frees, node) in enumerate(plan.steps):
        def counted(*a, fn=fn, op=node.op):
            calls.append(op)
            return fn(*a)
        plan.steps[i] = (counted, ins, out, frees, node)
    out = plan.run({"x": np.array([0.1, 0.2, 0.3]), "cotangent:out": np.ones(3)})
    assert calls.count("sin") == 1 and calls.count("cos") == 1
    x = np.array([0.1, 0.2, 0.3])
    np.testing.assert_allclose(out["grad:x"],
                               2 * np.sin(x) * np.cos(x) + np.exp(np.sin(x)) * np.cos(x))


def _peak_live(plan):
    live = set(plan.input_slots) | {i for i, v in enumerate(plan.template) if v is not None}
    peak = len(live)
    for *_, out, frees, _ in plan.steps:
        live.add(out)
        peak = max(peak, len(live))
        live -= set(frees)
    return peak


def test_values_are_released_after_last_use():
    def chain(x):
        for _ in range(200):
            x = ad.sin(x)
        return x
    g = ad.trace(chain, x=ad.f64(1000))
    plan = Plan(g)
    assert len(plan.steps) == 200
    assert _peak_live(plan) <= 3  # x, the previous value, the new value
    np.testing.assert_allclose(plan.run({"x": np.full(1000, 0.5)})["out"],
                               np.full(1000, [chain_np(0.5)]))


def chain_np(v):
    for _ in range(200):
        v = np.sin(v)
    return v


def test_deadline_stops_local_evaluation():
    def long_chain(x):
        for _ in range(3000):
            x = ad.sin(x)
        return ad.sum(x)
    g = ad.trace(long_chain, x=ad.f64(20000))
    with pytest.raises(DeadlineExceededError):
        ad.local().evaluate(g, x=np.zeros(20000), timeout=1e-4)


def test_differentiated_graph_round_trips_through_proto():
    from adsvc.ir.codec import graph_from_proto, graph_to_proto

    g = ad.trace(lambda x: ad.sum(ad.softmax(x) * x), x=ad.f64(4))
    d = ad.local().differentiate(g, ("reverse", "forward"), seed=True)
    back = graph_from_proto(graph_to_proto(d))
    feeds = {"x": np.arange(4.0), "tangent2:x": np.ones(4)}
    a, b = ad.local().evaluate(d, feeds), ad.local().evaluate(back, feeds)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
