"""The exact simplifications added for derivative graphs change no value: each rewritten
graph against numpy on awkward values (NaN, ±inf, ±0), and the rewrite did happen."""

from __future__ import annotations

import numpy as np
import pytest

import adsvc as ad

AWKWARD = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.5, 1e300, -1e-300, 7.0])


def _ops(g):
    return [n.op for n in g.nodes if n.op not in ("input", "constant")]


@pytest.mark.parametrize("fn, numpy_fn, ops", [
    (lambda x: x ** 1.0, lambda x: np.power(x, 1.0), []),
    (lambda x: x ** 0.0, lambda x: np.power(x, 0.0), []),  # ones (small: a constant)
    (lambda x: x ** 2.0, lambda x: np.power(x, 2.0), ["square"]),
    (lambda x: ad.mul_or_zero(3.0, x), lambda x: 3.0 * x, ["mul"]),
    (lambda x: ad.mul_or_zero(x, ad.full((10,), -2.0)), lambda x: x * -2.0, ["mul"]),
    (lambda x: x * ad.full((10,), 4.0), lambda x: x * 4.0, ["mul"]),
    (lambda x: x + ad.full((10,), 2.0) * 50.0, lambda x: x + 100.0, ["add"]),
])
def test_rewritten_graphs_compute_the_same_values(fn, numpy_fn, ops):
    g = ad.trace(fn, x=ad.f64(10))
    assert sorted(_ops(g)) == sorted(ops), g.text()
    with np.errstate(all="ignore"):
        want = numpy_fn(AWKWARD)
    got = ad.local().evaluate(g, x=AWKWARD)["out"]
    np.testing.assert_array_equal(got, want)


def test_large_broadcast_constants_fold_on_their_bases():
    g = ad.trace(lambda x: x + ad.full((100_000,), 2.0) * 50.0, x=ad.f64(100_000))
    consts = [n for n in g.nodes if n.op == "constant"]
    assert all(c.value.size == 1 for c in consts) and "mul" not in _ops(g)
    assert float(ad.local().evaluate(g, x=np.ones(100_000))["out"][7]) == 101.0


def test_mul_or_zero_keeps_its_zero_rule_for_a_zero_or_infinite_constant():
    for c in (0.0, np.inf):
        g = ad.trace(lambda x, c=c: ad.mul_or_zero(ad.full((10,), c), x), x=ad.f64(10))
        assert "mul_or_zero" in _ops(g)


def test_rosenbrock_gradient_graph_is_lean():
    r = ad.trace(lambda x: ad.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2),
                 x=ad.f64(1000))
    d = ad.differentiate(r, "reverse", seed=True)
    assert "pow" not in _ops(d)
    x = np.linspace(-1, 1, 1000)
    from scipy.optimize import rosen_der
    np.testing.assert_allclose(ad.local().grad(r, x=x)["x"], rosen_der(x), rtol=1e-13)
