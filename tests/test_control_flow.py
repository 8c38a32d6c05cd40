"""Loops and branches in the IR (scan, fori_loop, while_loop, cond, switch): values and
derivatives against finite differences and against the unrolled program, graph size
independent of the step count, reverse mode through while_loop, checkpointing (same
gradients, less memory), the text form, and the typed errors that name the carry."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from derivcheck import check_first_order, check_second_order

import adsvc as ad
from adsvc.runtime.plan import Plan
from adsvc_protocol.errors import (
    DTypeError,
    EvaluationError,
    InvalidGraphError,
    InvalidRequestError,
    ShapeError,
)

C = ad.local()
RNG = np.random.default_rng(9)


def _close(a, b, rtol=1e-11):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=1e-12)


def _same_derivatives(g, gu, feeds, tangents):
    """Value, gradient, JVP and Hessian of `g` equal those of its unrolled version `gu`."""
    v, gr = C.value_and_grad(g, inputs=feeds)
    vu, gru = C.value_and_grad(gu, inputs=feeds)
    _close(v, vu)
    for k in gr:
        _close(gr[k], gru[k])
    _, t = C.jvp(g, feeds, tangents)
    _, tu = C.jvp(gu, feeds, tangents)
    _close(t["out"], tu["out"])
    h, hu = C.hessian(g, inputs=feeds), C.hessian(gu, inputs=feeds)
    for a in h:
        for b in h[a]:
            _close(h[a][b], hu[a][b], 1e-10)


# -- scan ---------------------------------------------------------------------------------------
def _rnn_step(w, u):
    def step(h, x):
        h2 = ad.tanh(ad.matmul(w, h) + u * x)
        return h2, ad.sum(h2 * h2)
    return step


def _rnn(w, u, xs):
    h, ys = ad.scan(_rnn_step(w, u), ad.zeros((3,)), xs)
    return ad.sum(h) + ad.sum(ys) * 0.1


def _rnn_unrolled(w, u, xs):
    h, ys, step = ad.zeros((3,)), [], _rnn_step(w, u)
    for t in range(xs.shape[0]):
        h, y = step(h, xs[t])
        ys.append(y)
    return ad.sum(h) + sum(ys) * 0.1


RNN_FEEDS = {"w": RNG.normal(size=(3, 3)) * 0.5, "u": RNG.normal(size=3),
             "xs": RNG.normal(size=(6, 3))}
RNN_SPECS = {"w": ad.f64(3, 3), "u": ad.f64(3), "xs": ad.f64(6, 3)}


def test_scan_rnn_equals_the_unrolled_loop_to_order_two():
    g = ad.trace(_rnn, **RNN_SPECS)
    gu = ad.trace(_rnn_unrolled, **RNN_SPECS)
    _same_derivatives(g, gu, RNN_FEEDS, {k: RNG.normal(size=np.shape(v))
                                         for k, v in RNN_FEEDS.items()})


def test_scan_rnn_against_finite_differences():
    g = ad.trace(_rnn, **RNN_SPECS)
    check_first_order(C, g, RNN_FEEDS, np.random.default_rng(1))
    check_second_order(C, g, RNN_FEEDS, np.random.default_rng(2))


def test_pytree_carries_and_no_xs():
    def f(x, y):
        def step(c, _):
            return {"p": c["p"] * x + c["v"][0], "v": (c["v"][0] * y, c["v"][1] + 1)}, None
        c, ys = ad.scan(step, {"p": 1.0, "v": (0.5, 0)}, length=4)
        assert ys is None
        return c["p"] + ad.cast(c["v"][1], "float64")

    def unrolled(x, y):
        p, v0 = 1.0, 0.5
        for _ in range(4):
            p, v0 = p * x + v0, v0 * y
        return p + 4.0
    g, gu = ad.trace(f), ad.trace(unrolled)
    _same_derivatives(g, gu, {"x": 0.7, "y": 1.3}, {"x": 1.0, "y": -0.5})


def test_graph_size_does_not_depend_on_the_step_count():
    def program(n):
        return lambda x: ad.scan(lambda c, _: (ad.sin(c) * x + 0.1, None), x, length=n)[0]
    sizes = {n: len(ad.trace(program(n)).nodes) for n in (10, 1000, 10_000)}
    assert len(set(sizes.values())) == 1, sizes
    grads = {n: len(ad.differentiate(ad.trace(program(n)), "reverse", seed=True).nodes)
             for n in (10, 10_000)}
    assert len(set(grads.values())) == 1, grads


def test_ten_thousand_steps_value_and_gradient():
    n = 10_000
    g = ad.trace(lambda x: ad.scan(lambda c, _: (c * x + 1.0, None), 0.0, length=n)[0])
    x = 0.9995
    value, grad = C.value_and_grad(g, x=x)
    # c_n = (1 - x^n) / (1 - x);  dc_n/dx in closed form
    _close(value, (1 - x ** n) / (1 - x), 1e-10)
    expected = (-(n * x ** (n - 1)) * (1 - x) + (1 - x ** n)) / (1 - x) ** 2
    _close(grad["x"], expected, 1e-9)


def test_the_gradient_runs_the_forward_loop_once():
    d = ad.differentiate(ad.trace(lambda x: ad.sum(g_out(x))), "reverse", seed=True)
    forward = [n for n in d.nodes if n.op == "scan" and not n.attr("reverse")]
    assert len(forward) == 1 and forward[0].attr("save") == 1


def g_out(x):
    return ad.scan(lambda c, _: (ad.sin(c) * x, c), x, length=5)[1]


def test_fori_loop_equals_the_python_loop():
    def f(x):
        return ad.fori_loop(0, 5, lambda i, c: c * x + ad.cast(i, "float64"), 1.0)

    def unrolled(x):
        c = 1.0
        for i in range(5):
            c = c * x + float(i)
        return c
    _same_derivatives(ad.trace(f), ad.trace(unrolled), {"x": 1.1}, {"x": 1.0})


def test_nested_scan_with_closure_and_inner_grad():
    def f(x):
        def outer(c, _):
            inner, _ = ad.scan(lambda d, _: (d * x + c, None), 0.0, length=3)
            return c + 0.1 * ad.grad(lambda z: z * z * inner)(c), None
        return ad.scan(outer, 1.0, length=4)[0]

    def unrolled(x):
        c = 1.0
        for _ in range(4):
            d = 0.0
            for _ in range(3):
                d = d * x + c
            c = c + 0.1 * (2 * c * d)
        return c
    _same_derivatives(ad.trace(f), ad.trace(unrolled), {"x": 0.7}, {"x": 1.0})


# -- while_loop -----------------------------------------------------------------------------------
def test_while_loop_reverse_equals_the_unrolled_loop_with_the_same_trip_count():
    def f(x):
        c = ad.while_loop(lambda c: c[0] < 10.0, lambda c: (c[0] * x + 1.0, c[1] + 1),
                          (1.0, 0), max_iters=100)
        return c[0] + ad.cast(c[1], "float64")
    g = ad.trace(f)
    x = 1.5
    trips = int(C.evaluate(ad.trace(lambda x: ad.while_loop(
        lambda c: c[0] < 10.0, lambda c: (c[0] * x + 1.0, c[1] + 1), (1.0, 0),
        max_iters=100)[1]), x=x)["out"])
    assert trips == 4

    def unrolled(x):
        c = 1.0
        for _ in range(trips):
            c = c * x + 1.0
        return c + float(trips)
    _same_derivatives(g, ad.trace(unrolled), {"x": x}, {"x": 1.0})
    # closed form: c = x^4 + x^3 + x^2 + x + 1
    _, grad = C.value_and_grad(g, x=x)
    _close(grad["x"], 4 * x ** 3 + 3 * x ** 2 + 2 * x + 1)


def test_while_loop_against_finite_differences():
    def f(x, s):
        return ad.while_loop(lambda c: c[0] < 6, lambda c: (c[0] + 1, ad.sin(c[1]) * s + x),
                             (0, x), max_iters=50)[1]
    feeds = {"x": RNG.normal(size=4), "s": np.float64(0.8)}
    g = ad.trace(f, x=ad.f64(4), s=ad.f64())
    check_first_order(C, g, feeds, np.random.default_rng(3))
    check_second_order(C, g, feeds, np.random.default_rng(4))


def test_while_loop_over_max_iters_is_an_evaluation_error():
    g = ad.trace(lambda x: ad.while_loop(lambda c: c > 0.0, lambda c: c + 1.0, x,
                                         max_iters=20))
    with pytest.raises(EvaluationError, match="max_iters=20"):
        C.evaluate(g, x=1.0)
    with pytest.raises(EvaluationError, match="max_iters=20"):
        C.value_and_grad(g, x=1.0)
    assert float(C.evaluate(g, x=-1.0)["out"]) == -1.0  # no iteration at all


# -- cond / switch ------------------------------------------------------------------------------
def test_cond_differentiates_the_taken_branch():
    def f(x, y):
        return ad.cond(x > y, lambda a, b: a * a * b, lambda a, b: ad.sin(a) + b * x, x, y)
    g = ad.trace(f)
    for x, y, grad in ((2.0, 1.0, {"x": 4.0, "y": 4.0}),
                       (0.5, 1.0, {"x": np.cos(0.5) + 1.0, "y": 0.5})):
        _, got = C.value_and_grad(g, x=x, y=y)
        for k in grad:
            _close(got[k], grad[k])
        check_second_order(C, g, {"x": x, "y": y}, np.random.default_rng(5))


def test_only_the_taken_branch_runs():
    # the untaken branch would fail (index out of range): it must not run
    def f(x, i):
        return ad.switch(i, [lambda a: a * 2.0, lambda a: ad.take(a, ad.constant(
            np.array([7, 7, 7])), 0) * 3.0], x)
    g = ad.trace(f, x=ad.f64(3), i=ad.i64())
    assert C.evaluate(g, x=np.ones(3), i=0)["out"].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(EvaluationError):
        C.evaluate(g, x=np.ones(3), i=1)
    with pytest.raises(EvaluationError, match="outside"):
        C.evaluate(g, x=np.ones(3), i=5)


def test_cond_inside_scan_piecewise_dynamics():
    def step(c, x):
        return ad.cond(c > 0.0, lambda v: v * 0.5 - x, lambda v: v * v + x, c), c

    def f(x0, xs):
        c, ys = ad.scan(step, x0, xs)
        return c + ad.sum(ys)

    def unrolled(x0, xs, taken):
        c, total = x0, 0.0
        for t, pos in enumerate(taken):
            total = total + c
            c = c * 0.5 - xs[t] if pos else c * c + xs[t]
        return c + total
    feeds = {"x0": 0.3, "xs": np.array([0.1, 0.9, -0.2, 0.4])}
    taken, c = [], 0.3
    for x in feeds["xs"]:
        taken.append(c > 0)
        c = c * 0.5 - x if c > 0 else c * c + x
    g = ad.trace(f, x0=ad.f64(), xs=ad.f64(4))
    gu = ad.trace(lambda x0, xs: unrolled(x0, xs, taken), x0=ad.f64(), xs=ad.f64(4))
    _same_derivatives(g, gu, feeds, {"x0": 1.0, "xs": np.array([1.0, -1.0, 0.5, 2.0])})


# -- checkpointing -------------------------------------------------------------------------------
def _long_scan(checkpoint, n=400, size=2000):
    def f(x):
        c, _ = ad.scan(lambda c, _: (ad.sin(c) * x + 0.1, None), x * ad.ones((size,)),
                       length=n, checkpoint=checkpoint)
        return ad.sum(c)
    return ad.trace(f, x=ad.f64())


@pytest.mark.parametrize("checkpoint", [True, 7, 399, 400])
def test_checkpointed_gradients_equal_stored(checkpoint):
    stored, ck = _long_scan(False), _long_scan(checkpoint)
    v1, g1 = C.value_and_grad(stored, x=0.4)
    v2, g2 = C.value_and_grad(ck, x=0.4)
    _close(v1, v2)
    _close(g1["x"], g2["x"], 1e-12)
    h1, h2 = C.hessian(stored, x=0.4), C.hessian(ck, x=0.4)
    _close(h1["x"]["x"], h2["x"]["x"], 1e-10)


def _peak(graph) -> tuple[int, int]:
    """(planned peak bytes, measured tracemalloc peak) of one gradient."""
    d = ad.differentiate(graph, "reverse", seed=True)
    plan = Plan(d)
    tracemalloc.start()
    plan.run({"x": np.float64(0.4)})
    measured = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return plan.cost.peak_bytes, measured


def test_checkpointing_stores_sqrt_n_carries_and_less_memory():
    stored, ck = _long_scan(False), _long_scan(True)
    report = ad.loop_memory(ad.differentiate(ck, "reverse", seed=True))
    top = [r for r in report if r.depth == 0][0]
    assert (top.steps, top.interval, top.stored) == (400, 20, 20)
    assert top.recomputed == 400 and top.stored_bytes == 20 * 2000 * 8
    full = [r for r in ad.loop_memory(ad.differentiate(stored, "reverse", seed=True))]
    assert [(r.stored, r.recomputed) for r in full] == [(400, 0)]
    (plan_s, meas_s), (plan_c, meas_c) = _peak(stored), _peak(ck)
    assert plan_c * 5 < plan_s and meas_c * 5 < meas_s
    assert meas_s <= plan_s * 1.5 and meas_c <= plan_c * 1.5  # the plan predicts the peak


def test_checkpointing_is_chosen_by_the_memory_budget():
    g = _long_scan(None)
    tight = ad.local(max_eval_bytes=4 * 400 * 2000 * 8 // 2)  # a quarter < all carries
    roomy = ad.local()
    for client, interval in ((tight, 20), (roomy, 1)):
        d = client._compile(g, ("reverse",), None, True, None)
        top = [r for r in ad.loop_memory(d.graph) if r.depth == 0][0]
        assert top.interval == interval
    _close(tight.value_and_grad(g, x=0.4)[1]["x"], roomy.value_and_grad(g, x=0.4)[1]["x"])


# -- errors, text form, proto -------------------------------------------------------------------
def test_a_body_that_changes_a_carry_names_it():
    with pytest.raises(ShapeError, match=r"shape of carry\['v'\] from \[3\] to \[1\]"):
        ad.trace(lambda x: ad.scan(lambda c, _: ({"p": c["p"], "v": ad.sum(c["v"], keepdims=True)},
                                                None), {"p": x, "v": ad.zeros((3,))},
                                   length=2)[0]["p"])
    with pytest.raises(DTypeError, match=r"dtype of carry\[1\] from int64 to float64"):
        ad.trace(lambda x: ad.while_loop(lambda c: c[1] < 3,
                                         lambda c: (c[0], ad.cast(c[1], "float64")),
                                         (x, 0), max_iters=5)[0])
    with pytest.raises(InvalidRequestError, match="structure"):
        ad.trace(lambda x: ad.scan(lambda c, _: ((c, c), None), x, length=2)[0])


def test_branches_must_agree():
    with pytest.raises(DTypeError, match="branch 1"):
        ad.trace(lambda x: ad.cond(x > 0.0, lambda a: a, lambda a: ad.cast(a, "float32"), x))
    with pytest.raises(InvalidRequestError, match="branch 1 returns"):
        ad.trace(lambda x: ad.cond(x > 0.0, lambda a: a, lambda a: (a, a), x))


def test_scan_argument_errors():
    with pytest.raises(ShapeError, match="different leading axes"):
        ad.trace(lambda x: ad.scan(lambda c, r: (c, None), x, (ad.zeros((3,)), ad.zeros((4,))))[0])
    with pytest.raises(InvalidRequestError, match="give xs or length"):
        ad.trace(lambda x: ad.scan(lambda c, r: (c, None), x)[0])
    with pytest.raises(InvalidRequestError, match="max_iters"):
        ad.trace(lambda x: ad.while_loop(lambda c: c > 0.0, lambda c: c, x, max_iters=-1))


def test_text_form_prints_bodies_indented():
    g = ad.trace(lambda x: ad.scan(lambda c, r: (c * x + r, c), x, ad.constant(np.ones(3))))
    text = g.text()
    assert "scan %" in text and "body:" in text
    assert "      graph scan_body(c0: f64[], x0: f64[], k0: f64[]) {" in text
    assert ": (f64[], f64[3])" in text


def test_proto_round_trip_and_versions():
    g = ad.trace(_rnn, **RNN_SPECS)
    d = ad.differentiate(g, ["reverse", "forward"])
    for graph in (g, d):
        p = ad.to_proto(graph)
        assert (p.ir_version, p.opset_version) == (2, 2)
        assert ad.from_proto(p).key == graph.key
    plain = ad.to_proto(ad.trace(lambda x: x * x))
    assert (plain.ir_version, plain.opset_version) == (1, 1)


def test_a_hand_built_body_with_a_free_variable_is_refused():
    from adsvc.ir.graph import Graph
    from adsvc.ir.node import input_node, make
    outer = input_node("q", "float64", ())
    c = input_node("c0", "float64", ())
    body = Graph([c], [("c0", c * outer)], "body")
    with pytest.raises(InvalidGraphError, match="'q', which is not one of its inputs"):
        make("scan", [ad.constant(1.0)], {"body": body, "carries": 1, "xs": 0, "length": 2})


def test_same_loop_traced_twice_has_the_same_key():
    a, b = ad.trace(_rnn, **RNN_SPECS), ad.trace(_rnn, **RNN_SPECS)
    assert a.key == b.key


def test_a_refusal_by_the_memory_budget_names_the_loop_and_the_remedy():
    from adsvc_protocol.errors import LimitExceededError
    g = ad.trace(lambda x: ad.while_loop(lambda s: s[1] < 3.0, lambda s: (s[0] * x, s[1] + 1.0),
                                         (x, x * 0), max_iters=10**9)[0])
    assert float(C.evaluate(g, x=2.0)["out"]) == 16.0  # the primal loop stores nothing
    with pytest.raises(LimitExceededError, match="max_iters=1000000000 carries"):
        C.value_and_grad(g, x=2.0)
    small = ad.local(max_eval_bytes=50 * 2**20)
    s = ad.trace(lambda x: ad.sum(ad.scan(lambda c, _: (c * x, None), x * ad.ones((1000,)),
                                          length=10_000, checkpoint=False)[0]))
    with pytest.raises(LimitExceededError, match="checkpoint=True stores fewer"):
        small.value_and_grad(s, x=1.0)
    _close(small.value_and_grad(ad.trace(lambda x: ad.sum(ad.scan(
        lambda c, _: (c * x, None), x * ad.ones((1000,)), length=10_000)[0])), x=1.0)[1]["x"],
        1000 * 10_001.0)  # the default (by the budget) checkpoints and fits


def test_pictures_and_explain_of_loops():
    g = ad.trace(lambda x: ad.scan(lambda c, r: (ad.sin(c) * x + r, c), x,
                                   ad.constant(np.ones(3)))[0]
                 + ad.cond(x > 0.0, lambda a: a, lambda a: -a, x))
    dot = g.to_dot()
    assert "scan" in dot and "(f64[], f64[3])" in dot and "body=<graph scan_body>" in dot
    assert "scan" in ad.differentiate(g, "reverse", seed=True).to_dot()
    e = ad.explain(g, "reverse", x=0.5)
    text = e.text()
    assert "scan %0, %1, %0" in text and "cond %5, %0" in text
    _, grad = C.value_and_grad(g, x=0.5)
    assert f"∂out/∂x = {grad['x']:.6g}" in text
    assert "Result: out = 1.9976" in text
