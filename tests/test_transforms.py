"""Function transformations inside traces (grad, value_and_grad, jvp, vjp, jacobian,
hessian) and `adsvc.call`: nested derivatives against closed forms and numbers that do
not come from our rules (central differences, the JVP/VJP inner-product identity), in
process and through a server."""

from __future__ import annotations

import numpy as np
import pytest
from service_fixtures import running_server

import adsvc
from adsvc_protocol.errors import DTypeError, InputError, InvalidRequestError, ShapeError

RNG = np.random.default_rng(7)


def ev(graph, **feeds):
    return adsvc.local().evaluate(graph, **feeds)["out"]


def central(fn, x, h=1e-6):
    return (fn(x + h) - fn(x - h)) / (2 * h)


def test_perturbation_confusion_is_avoided():
    """d/dx (x · d/dy (x + y)) = 1 (a confused implementation gives 2)."""
    g = adsvc.trace(adsvc.grad(lambda x: x * adsvc.grad(lambda y: x + y)(x)))
    for x in (0.0, 3.0, -2.5):
        assert ev(g, x=x) == 1.0


def test_gradient_of_an_inner_partial_derivative_closed_form():
    """f = sin(x)·y² + x³·y:  ∂f/∂y = 2y·sin x + x³,  ∂/∂x of that = 2y·cos x + 3x²."""
    def f(x, y):
        return adsvc.sin(x) * y * y + x ** 3 * y

    g = adsvc.trace(adsvc.grad(adsvc.grad(f, wrt="y"), wrt="x"))
    inner = adsvc.trace(adsvc.grad(f, wrt="y"))
    for x, y in RNG.normal(size=(5, 2)):
        assert np.isclose(ev(g, x=x, y=y), 2 * y * np.cos(x) + 3 * x * x, rtol=1e-13)
        fd = central(lambda t, y=y: ev(inner, x=t, y=y), x)
        assert np.isclose(ev(g, x=x, y=y), fd, rtol=1e-6, atol=1e-8)


def test_mixed_modes_at_order_three():
    """d³/dx³ of x⁴·sin(x) three ways: reverse∘forward∘reverse, forward∘reverse∘reverse,
    and the gradient of the hessian."""
    def f(x):
        return x ** 4 * adsvc.sin(x)

    def exact(x):  # (x^4 sin x)''' = 24x sin x + 36x² cos x - 12x³ sin x - x⁴ cos x
        return 24 * x * np.sin(x) + 36 * x**2 * np.cos(x) - 12 * x**3 * np.sin(x) \
            - x**4 * np.cos(x)

    d2 = adsvc.grad(lambda x: adsvc.jvp(adsvc.grad(f), (x,), (1.0,))[1])
    d3 = lambda x: adsvc.jvp(adsvc.grad(adsvc.grad(f)), (x,), (1.0,))[1]  # noqa: E731
    d4 = adsvc.grad(adsvc.hessian(f))
    for fn in (d2, d3, d4):
        g = adsvc.trace(fn)
        for x in (0.3, 1.7, -2.2):
            assert np.isclose(ev(g, x=x), exact(x), rtol=1e-12)


def test_jacobian_both_modes_and_hessian_agree_with_the_clients():
    def f(x):
        return adsvc.sin(x) * adsvc.sum(x * x)

    x = RNG.normal(size=3)
    c = adsvc.local()
    outer = adsvc.trace(f, x=adsvc.f64(3))
    want = c.jacobian(outer, x=x)["out"]["x"]
    for mode in ("forward", "reverse"):
        got = ev(adsvc.trace(adsvc.jacobian(f, mode=mode), x=adsvc.f64(3)), x=x)
        assert got.shape == (3, 3) and np.allclose(got, want, rtol=1e-13)
    scalar = adsvc.trace(lambda x: adsvc.sum(f(x)), x=adsvc.f64(3))
    hess = ev(adsvc.trace(adsvc.hessian(lambda x: adsvc.sum(f(x))), x=adsvc.f64(3)), x=x)
    assert np.allclose(hess, c.hessian(scalar, x=x)["x"]["x"], rtol=1e-12)
    pair = adsvc.trace(lambda a, b: adsvc.hessian(lambda a, b: a * a * b ** 3,
                                                  wrt=("a", "b"))(a, b)[0][1])
    assert ev(pair, a=2.0, b=3.0) == 6 * 2.0 * 3.0 ** 2


def test_jvp_and_vjp_inside_a_trace_satisfy_the_inner_product_identity():
    def f(x):
        return adsvc.sin(x) * adsvc.sum(adsvc.exp(x))

    x, v, u = (RNG.normal(size=4) for _ in range(3))
    jv = adsvc.trace(lambda x, v: adsvc.jvp(f, (x,), (v,))[1], x=adsvc.f64(4), v=adsvc.f64(4))
    jtu = adsvc.trace(lambda x, u: adsvc.vjp(f, x)[1](u)[0], x=adsvc.f64(4), u=adsvc.f64(4))
    c = adsvc.local()
    lhs = u @ c.evaluate(jv, x=x, v=v)["out"]
    rhs = c.evaluate(jtu, x=x, u=u)["out"] @ v
    assert np.isclose(lhs, rhs, rtol=1e-13)


def test_call_a_differentiated_graph_inside_a_trace(tmp_path):
    c = adsvc.local()
    seed = adsvc.trace(lambda x, y: x * x + x * y + 2)
    dg = c.differentiate(seed, "reverse", seed=True)
    g = adsvc.trace(lambda x, y: adsvc.call(dg, x=x, y=y)["grad:x"] * 2)
    assert ev(g, x=3.0, y=4.0) == 20.0
    proto = adsvc.to_proto(dg)
    g2 = adsvc.trace(lambda x: adsvc.call(proto, x=x, y=1.0)["grad:y"])
    assert ev(g2, x=3.0) == 3.0
    from adsvc import graphfile

    path = str(tmp_path / "seed.json")
    graphfile.save(seed, path)
    g3 = adsvc.trace(lambda x: adsvc.grad(lambda t: adsvc.call(graphfile.load(path), x=t,
                                                                y=4.0)["out"])(x))
    assert ev(g3, x=3.0) == 10.0


def test_call_errors_name_the_input():
    g = adsvc.trace(lambda x, n: x * adsvc.cast(n, "float64"), x=adsvc.f64(2),
                    n=adsvc.i64())
    with pytest.raises(InputError, match="missing input 'n'") as e:
        adsvc.call(g, x=[1.0, 2.0])
    assert e.value.field == "inputs.n"
    with pytest.raises(InputError, match="no input 'q'"):
        adsvc.call(g, x=[1.0, 2.0], n=1, q=3)
    with pytest.raises(ShapeError) as e:
        adsvc.trace(lambda x: adsvc.call(g, x=x, n=1)["out"], x=adsvc.f64(3))
    assert e.value.field == "inputs.x"
    with pytest.raises(DTypeError):
        adsvc.trace(lambda x: adsvc.call(g, x=x, n=1)["out"], x=adsvc.f32(2))
    with pytest.raises(InvalidRequestError, match="no array argument 'z'"):
        adsvc.grad(lambda x: x * x, wrt="z")(1.0)
    with pytest.raises(InvalidRequestError, match="exactly one scalar float output"):
        adsvc.grad(lambda x: x * 2.0)(np.ones(3))


def test_nested_graphs_through_the_server_and_sdk():
    def f(x, y):
        return adsvc.sin(x) * y * y + x ** 3 * y

    g = adsvc.trace(lambda x, y: adsvc.grad(adsvc.grad(f, wrt="y"), wrt="x")(x, y) * x)
    confusion = adsvc.trace(adsvc.grad(lambda x: x * adsvc.grad(lambda y: x + y)(x)))
    local = adsvc.local()
    with running_server() as (_, target), adsvc.connect(target, timeout=60) as c:
        for x, y in RNG.normal(size=(3, 2)):
            assert np.isclose(c.evaluate(g, x=x, y=y)["out"],
                              local.evaluate(g, x=x, y=y)["out"], rtol=1e-15)
            assert np.allclose(c.grad(g, x=x, y=y)["x"], local.grad(g, x=x, y=y)["x"])
        assert c.evaluate(confusion, x=2.0)["out"] == 1.0


def test_array_constructors_are_exported():
    z = adsvc.zeros((2, 3))
    assert z.shape == (2, 3) and ev(adsvc.trace(lambda x: adsvc.sum(adsvc.ones((4,)) * x)),
                                    x=2.0) == 8.0
    assert adsvc.full((2,), 3.5).dtype == "float64" and adsvc.zeros_like(z).shape == (2, 3)
    assert adsvc.ones_like(adsvc.zeros((3,), "float32")).dtype == "float32"
