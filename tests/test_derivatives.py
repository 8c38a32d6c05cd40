"""Closed-form derivatives, higher orders, and the awkward points users file bugs about."""

import numpy as np
import pytest

import adsvc as ad
from adsvc.errors import InvalidRequestError, NotDifferentiableError

MODES = ["forward", "reverse"]


def seed_graph():
    return ad.trace(lambda x, y: x * x + x * y + 2, x=ad.f64(), y=ad.f64())


@pytest.mark.parametrize("mode", MODES)
def test_seed_example(mode):
    value, grad = ad.local().value_and_grad(seed_graph(), mode=mode, x=3.0, y=4.0)
    assert value == 23.0
    assert grad == {"x": 10.0, "y": 3.0}


def test_seed_hessian_and_hvp():
    c = ad.local()
    h = c.hessian(seed_graph(), x=3.0, y=4.0)
    assert [[h["x"]["x"], h["x"]["y"]], [h["y"]["x"], h["y"]["y"]]] == [[2, 1], [1, 0]]
    d = c.differentiate(seed_graph(), ("reverse", "forward"), seed=True)
    out = c.evaluate(d, x=3.0, y=4.0, **{"tangent2:x": 0.5, "tangent2:y": -2.0})
    assert out["tangent2:grad:x"] == 2 * 0.5 + 1 * -2.0
    assert out["tangent2:grad:y"] == 0.5


def rosenbrock(x):
    a, b = x[:-1], x[1:]
    return ad.sum(100.0 * ad.square(b - a * a) + ad.square(1.0 - a))


def rosen_grad(x):
    g = np.zeros_like(x)
    g[:-1] = -400 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2 * (1 - x[:-1])
    g[1:] += 200 * (x[1:] - x[:-1] ** 2)
    return g


def rosen_hess(x):
    n = len(x)
    h = np.zeros((n, n))
    for i in range(n - 1):
        h[i, i] += 1200 * x[i] ** 2 - 400 * x[i + 1] + 2
        h[i, i + 1] = h[i + 1, i] = -400 * x[i]
        h[i + 1, i + 1] += 200
    return h


@pytest.mark.parametrize("mode", MODES)
def test_rosenbrock_gradient_and_hessian(mode):
    x0 = np.array([-1.2, 1.0, 0.7, 2.0, -0.3])
    g = ad.trace(rosenbrock, x=ad.f64(5))
    c = ad.local()
    np.testing.assert_allclose(c.grad(g, mode=mode, x=x0)["x"], rosen_grad(x0), rtol=1e-13)
    np.testing.assert_allclose(c.hessian(g, x=x0)["x"]["x"], rosen_hess(x0), rtol=1e-13)
    v = np.arange(5.0)
    d = c.differentiate(g, ("reverse", "forward"), seed=True)
    hv = c.evaluate(d, x=x0, **{"tangent2:x": v})["tangent2:grad:x"]
    np.testing.assert_allclose(hv, rosen_hess(x0) @ v, rtol=1e-13)


@pytest.mark.parametrize("modes", [("reverse", "forward", "forward"),
                                   ("forward", "forward", "forward"),
                                   ("reverse", "reverse", "reverse")])
def test_third_derivative_of_polynomial(modes):
    g = ad.trace(lambda x: x ** 4 + 3.0 * x ** 3 - x, x=ad.f64())
    c = ad.local()
    d = c.differentiate(g, modes, seed=modes[0] == "reverse")
    x = 1.5
    feeds = {"x": x}
    for k, m in enumerate(modes, start=1):
        tag = "" if k == 1 else str(k)
        if m == "forward":
            feeds[f"tangent{tag}:x"] = 1.0
    # cotangents for reverse passes after the first: 1 on the one new output
    new_outputs = [k for k in d.input_names if k.startswith("cotangent")]
    feeds.update({k: 1.0 for k in new_outputs})
    out = c.evaluate(d, feeds)
    last = d.output_names[-1]
    assert out[last] == pytest.approx(24 * x + 18, rel=1e-14)


def test_jacobian_both_modes_match_closed_form():
    g = ad.trace(lambda x, w: {"y": ad.tanh(w @ x), "s": ad.sum(x * x)},
                 x=ad.f64(3), w=ad.f64(2, 3))
    x0, w0 = np.array([0.1, -0.4, 0.3]), np.arange(6.0).reshape(2, 3) / 6
    c = ad.local()
    jr = c.jacobian(g, x=x0, w=w0)
    jf = c.jacobian(g, mode="forward", x=x0, w=w0)
    y = np.tanh(w0 @ x0)
    expect_yx = (1 - y ** 2)[:, None] * w0
    expect_yw = np.einsum("i,ij,k->ijk", 1 - y ** 2, np.eye(2), x0)
    for j in (jr, jf):
        np.testing.assert_allclose(j["y"]["x"], expect_yx, rtol=1e-14)
        np.testing.assert_allclose(j["y"]["w"], expect_yw, rtol=1e-14)
        np.testing.assert_allclose(j["s"]["x"], 2 * x0, rtol=1e-14)
        assert j["s"]["w"].shape == (2, 3) and not j["s"]["w"].any()


def test_broadcast_and_reduce_cotangents_have_operand_shapes():
    g = ad.trace(lambda a, b, c: ad.sum(ad.mean(a * b, 0) + c), a=ad.f64(4, 3),
                 b=ad.f64(3), c=ad.f64(1))
    a, b, cc = np.ones((4, 3)) * np.arange(4.0)[:, None], np.array([1.0, 2, 3]), np.array([5.0])
    for mode in MODES:
        gr = ad.local().grad(g, mode=mode, a=a, b=b, c=cc)
        assert gr["a"].shape == (4, 3) and gr["b"].shape == (3,) and gr["c"].shape == (1,)
        np.testing.assert_allclose(gr["a"], np.broadcast_to(b / 4, (4, 3)))
        np.testing.assert_allclose(gr["b"], a.mean(0))
        np.testing.assert_allclose(gr["c"], [3.0])


# -- awkward points -----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("branch", [ad.sqrt, ad.log, lambda x: 1.0 / x, lambda x: x ** 0.5,
                                    ad.log1p])
def test_where_untaken_branch_leaks_no_nan(mode, branch):
    # At x = -1 (and x = 0) the sqrt/log/reciprocal branch is NaN/inf but not taken.
    g = ad.trace(lambda x: ad.sum(ad.where(x > 0.5, branch(x), x * x)), x=ad.f64(3))
    x = np.array([-1.0, 0.0, 4.0])
    value, grad = ad.local().value_and_grad(g, mode=mode, x=x)
    assert np.isfinite(value)
    eps = 1e-6
    fd = [(ad.local().evaluate(g, x=x + eps * e)["out"] - ad.local().evaluate(
        g, x=x - eps * e)["out"]) / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(grad["x"], fd, rtol=1e-6)
    assert grad["x"][0] == -2.0 and grad["x"][1] == 0.0


def test_where_gradient_goes_to_the_taken_side_only():
    g = ad.trace(lambda a, b: ad.sum(ad.where(a > b, a, b)), a=ad.f64(3), b=ad.f64(3))
    gr = ad.local().grad(g, a=np.array([1.0, 2, 3]), b=np.array([3.0, 2, 1]))
    assert gr["a"].tolist() == [0, 0, 1] and gr["b"].tolist() == [1, 1, 0]


@pytest.mark.parametrize("mode", MODES)
def test_conventions_at_zero(mode):
    c = ad.local()
    grad = lambda f, **kw: c.grad(ad.trace(f), mode=mode, **kw)  # noqa: E731
    assert grad(ad.sqrt, x=0.0)["x"] == np.inf        # sqrt'(0) = +inf
    assert grad(ad.abs, x=0.0)["x"] == 0.0            # abs'(0) = sign(0) = 0
    assert grad(ad.relu, x=0.0)["x"] == 0.0           # relu'(0) = 0
    assert grad(ad.sign, x=0.0)["x"] == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_pow_at_zero_base(mode):
    c = ad.local()
    g = ad.trace(lambda x, y: x ** y)
    # 0**2 = 0: d/dx = 2*0 = 0, d/dy = 0 (the limit of 0**y * log(0) for y > 0).
    assert c.grad(g, mode=mode, x=0.0, y=2.0) == {"x": 0.0, "y": 0.0}
    # 0**0 = 1: d/dx = 0 by convention (not 0 * 0**-1 = NaN), d/dy = 0.
    assert c.grad(g, mode=mode, x=0.0, y=0.0) == {"x": 0.0, "y": 0.0}
    # x**0 = 1 everywhere: d/dx = 0; d/dy = log(x).
    gr = c.grad(g, mode=mode, x=2.0, y=0.0)
    assert gr["x"] == 0.0 and gr["y"] == pytest.approx(np.log(2.0), rel=1e-15)
    # and the second derivative stays finite at x = 0
    h = c.hessian(g, x=0.0, y=2.0)
    assert all(np.isfinite(h[a][b]) for a in "xy" for b in "xy")
    assert h["x"]["x"] == 2.0


@pytest.mark.parametrize("mode", MODES)
def test_ties_split_evenly(mode):
    c = ad.local()
    gm = c.grad(ad.trace(ad.maximum), mode=mode, a=1.0, b=1.0)
    assert gm == {"a": 0.5, "b": 0.5}
    gmin = c.grad(ad.trace(ad.minimum), mode=mode, a=2.0, b=2.0)
    assert gmin == {"a": 0.5, "b": 0.5}
    g = ad.trace(lambda x: ad.max(x), x=ad.f64(4))
    assert c.grad(g, mode=mode, x=np.array([3.0, 1.0, 3.0, 3.0]))["x"].tolist() == \
        [1 / 3, 0, 1 / 3, 1 / 3]


@pytest.mark.parametrize("mode", MODES)
def test_logsumexp_stable(mode):
    c = ad.local()
    g = ad.trace(lambda x: ad.logsumexp(x), x=ad.f64(3))
    v, gr = c.value_and_grad(g, mode=mode, x=np.array([1000.0, 1000.0, -np.inf]))
    assert v == pytest.approx(1000.0 + np.log(2.0), rel=1e-15)
    assert gr["x"].tolist() == [0.5, 0.5, 0.0]
    v, gr = c.value_and_grad(g, mode=mode, x=np.array([-1000.0, -1001.0, -1002.0]))
    p = np.exp([0.0, -1.0, -2.0]) / np.exp([0.0, -1.0, -2.0]).sum()
    assert v == pytest.approx(-1000.0 + np.log(np.exp([0.0, -1.0, -2.0]).sum()), rel=1e-15)
    np.testing.assert_allclose(gr["x"], p, rtol=1e-14)


def test_softmax_composite_stable():
    g = ad.trace(lambda x: ad.softmax(x), x=ad.f64(3))
    out = ad.local().evaluate(g, x=np.array([1000.0, 0.0, -np.inf]))["out"]
    np.testing.assert_allclose(out, [1.0, 0.0, 0.0])


def test_float32_cast_round_trip_gradient():
    g = ad.trace(lambda x: ad.cast(ad.sum(ad.square(ad.cast(x, "float32"))), "float64"),
                 x=ad.f64(3))
    x = np.array([0.1, 1.7, -2.3])
    gr = ad.local().grad(g, x=x)["x"]
    assert gr.dtype == np.float64
    np.testing.assert_allclose(gr, 2 * x.astype(np.float32), rtol=1e-7)


# -- activity analysis ----------------------------------------------------------------
def test_integer_input_gradient_is_an_error():
    g = ad.trace(lambda x, n: x * ad.cast(n, "float64"), x=ad.f64(), n=ad.i64())
    with pytest.raises(NotDifferentiableError, match="'n'.*int64"):
        ad.local().grad(g, wrt="n", x=1.0, n=2)
    assert ad.local().grad(g, x=1.5, n=2) == {"x": 2.0}  # default wrt: float inputs


def test_unknown_wrt_and_non_scalar_grad_are_errors():
    c = ad.local()
    with pytest.raises(InvalidRequestError, match="no input named 'z'"):
        c.grad(seed_graph(), wrt="z", x=1.0, y=1.0)
    g = ad.trace(lambda x: x * 2.0, x=ad.f64(3))
    with pytest.raises(InvalidRequestError, match="one scalar float output"):
        c.grad(g, x=np.ones(3))


def test_stop_gradient_and_inactive_inputs():
    g = ad.trace(lambda x, y: x * ad.stop_gradient(y) + ad.stop_gradient(x))
    for mode in MODES:
        assert ad.local().grad(g, mode=mode, x=2.0, y=5.0) == {"x": 5.0, "y": 0.0}
    d = ad.local().differentiate(g, "reverse", seed=True)
    # only the x*y path is differentiated: the gradient graph adds no node for y
    assert "grad:y" in d.output_names and d.output("grad:y").op in ("broadcast_to", "constant")


def test_reverse_reuses_forward_values_and_shares_nodes():
    """The gradient graph refers to the primal nodes (no recomputation): every node of the
    function appears once in the differentiated graph."""
    g = ad.trace(lambda x: ad.sum(ad.exp(ad.sin(x)) * ad.exp(ad.sin(x))), x=ad.f64(4))
    d = ad.local().differentiate(g, "reverse", seed=True)
    ops = [n.op for n in d.nodes]
    assert ops.count("sin") == 1 and ops.count("exp") == 1
