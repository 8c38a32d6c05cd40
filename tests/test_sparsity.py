"""Sparse Jacobians and Hessians (issue 13): sparsity patterns through every op of the
table and random graphs, colorings, compressed sweeps and recovery, Hessian diagonals.
The same checks run through a real server in tests/test_service_sparsity.py."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from optable_cases import CASES
from sparsecheck import (
    assert_column_coloring,
    assert_distance1_coloring,
    assert_row_coloring,
    assert_star_coloring,
    check_sparse_hessian,
    check_sparse_jacobian,
)

import adsvc as ad
from adsvc.passes import coloring
from adsvc_protocol.errors import InvalidRequestError, LimitExceededError

PARAMS = [pytest.param(c, id=f"{op}-{i}") for op in sorted(CASES)
          for i, c in enumerate(CASES[op])]


# -- the op table ------------------------------------------------------------------------
@pytest.mark.parametrize("case", PARAMS)
def test_op_table_sparse_jacobian_equals_dense(case):
    c = ad.local()
    check_sparse_jacobian(c, ad.trace(case.fn, **case.specs()), case.feeds)


@pytest.mark.parametrize("case", PARAMS)
def test_op_table_sparse_hessian_equals_dense(case):
    c = ad.local()
    g = ad.trace(lambda **kw: ad.sum(ad.sin(case.fn(**kw))), **case.specs())
    check_sparse_hessian(c, g, case.feeds)


# -- random graphs with structure ----------------------------------------------------------
N = 6
REVERSE = np.arange(N)[::-1].copy()
SCATTER = np.array([4, 0, 4])


def _blocks(a):
    return ad.reshape(a, (2, 3))


STRUCTURAL = [
    lambda a, b, i: ad.sin(a) * b,
    lambda a, b, i: a / (1.0 + b * b),
    lambda a, b, i: ad.where(a > b, a * b, a - b),
    lambda a, b, i: ad.exp(ad.tanh(a)) + ad.square(b),
    lambda a, b, i: ad.concat([a[1:], a[:1]], 0) * b,  # a rotation
    lambda a, b, i: ad.take(a, ad.constant(REVERSE), 0) + b,  # constant gather
    lambda a, b, i: ad.concat([ad.take(a, i, 0), b[3:]], 0),  # gather by an input
    lambda a, b, i: ad.scatter_add(a[:3] * b[3:], ad.constant(SCATTER), 0, N),
    lambda a, b, i: ad.reshape(_blocks(a) - ad.mean(_blocks(b), 1, keepdims=True), (N,)),
    lambda a, b, i: ad.reshape(ad.transpose(_blocks(a), (1, 0)), (N,)) * b,
    lambda a, b, i: ad.pad(a[1:4] * b[2:5], (2,), (1,)),
    lambda a, b, i: ad.maximum(a, b) + ad.sum(a[:2]),
    lambda a, b, i: ad.reshape(_blocks(a) @ ad.reshape(b[:3], (3, 1)), (2,)) * a[:2],
    lambda a, b, i: ad.concat([ad.reshape(ad.reshape(b[:4], (2, 2)) @ ad.reshape(a[:4], (2, 2)),
                                          (4,)), a[4:]], 0),
    lambda a, b, i: ad.broadcast_to(ad.logsumexp(_blocks(a), 1, keepdims=True), (2, 3))
    .reshape((N,)) * b,
]

structured = st.lists(st.tuples(st.integers(0, len(STRUCTURAL) - 1), st.integers(0, 50),
                                st.integers(0, 50)), min_size=1, max_size=8)


def _structured_graph(steps, n_inputs=2):
    names = [f"x{k}" for k in range(n_inputs)]

    def fn(i, **xs):
        vals = [xs[n] for n in names]
        for op, j, k in steps:
            v = STRUCTURAL[op](vals[j % len(vals)], vals[k % len(vals)], i)
            vals.append(ad.concat([v] * N, 0)[:N] if v.shape != (N,) else v)
        return vals[-1]

    specs = {n: ad.f64(N) for n in names}
    return fn, specs, names


def _feeds(names, seed):
    rng = np.random.default_rng(seed)
    out = {n: rng.standard_normal(N) for n in names}
    out["i"] = np.array([2, 5, 0])
    return out


@settings(max_examples=40, deadline=None)
@given(structured, st.integers(0, 2**16))
def test_random_graphs_sparse_equals_dense(steps, seed):
    fn, specs, names = _structured_graph(steps)
    c = ad.local()
    g = ad.trace(fn, i=ad.i64(3), **specs)
    feeds = _feeds(names, seed)
    check_sparse_jacobian(c, g, feeds, rtol=1e-9, atol=1e-11)
    h = ad.trace(lambda i, **xs: ad.sum(ad.sin(fn(i, **xs))), i=ad.i64(3), **specs)
    check_sparse_hessian(c, h, feeds, rtol=1e-9, atol=1e-11)


# -- known structures ------------------------------------------------------------------------
def rosenbrock(x):
    return ad.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def banded(x, half=2):
    """r_i = sum over |k - i| <= half of a nonlinear term in x_k: 2·half + 1 diagonals."""
    n = x.shape[0]
    xp = ad.pad(x, (half,), (half,))
    r = xp[0:n] * xp[2 * half:2 * half + n]
    for k in range(1, 2 * half):
        r = r + ad.sin(xp[k:k + n]) * (k + 1.0)
    return r


def test_chained_rosenbrock_hessian_is_tridiagonal_with_three_colors():
    c = ad.local()
    n = 200
    g = ad.trace(rosenbrock, x=ad.f64(n))
    s = c.sparsity(g, hessian=True)
    expected = sp.diags([np.ones(n - 1), np.ones(n), np.ones(n - 1)], [-1, 0, 1]).toarray()
    np.testing.assert_array_equal(s.pattern.toarray(), expected > 0)
    assert s.colors()["star"] <= 3 and s.mode == "star"
    x = np.random.default_rng(3).standard_normal(n)
    check_sparse_hessian(c, g, {"x": x})


def test_banded_jacobian_needs_bandwidth_plus_one_colors_at_most():
    c = ad.local()
    g = ad.trace(banded, x=ad.f64(300))
    s = c.sparsity(g)
    assert s.nnz == 300 * 5 - 2 * (2 + 1)
    assert min(s.colors().values()) <= 6
    check_sparse_jacobian(c, g, {"x": np.random.default_rng(4).standard_normal(300)})


def test_arrowhead_hessian_needs_two_star_colors():
    n = 300
    g = ad.trace(lambda x: ad.sum(x[0] * ad.sin(x[1:])) + ad.sum(x ** 4), x=ad.f64(n))
    c = ad.local()
    s = c.sparsity(g, hessian=True)
    assert s.colors()["star"] == 2  # column (distance-2) coloring would need n
    check_sparse_hessian(c, g, {"x": np.random.default_rng(5).standard_normal(n)})


def test_block_diagonal_and_least_squares_shapes():
    c = ad.local()
    a = np.random.default_rng(6).standard_normal((4, 3, 3))
    g = ad.trace(lambda x: ad.reshape(ad.constant(a) @ ad.reshape(x, (4, 3, 1)), (12,)),
                 x=ad.f64(12))  # block-diagonal Jacobian, 3 colors
    s = c.sparsity(g)
    assert s.nnz == 36 and min(s.colors().values()) == 3
    check_sparse_jacobian(c, g, {"x": np.arange(12.0)})
    r = ad.trace(lambda x, y: ad.sum(ad.square(x[1:] * y - ad.sin(x[:-1]))),
                 x=ad.f64(3, 4), y=ad.f64(4))
    check_sparse_hessian(c, r, {"x": np.random.default_rng(7).standard_normal((3, 4)),
                                "y": np.random.default_rng(8).standard_normal(4)})


def test_scalar_graph_patterns_element_by_element():
    """A graph of scalar nodes (Python loop over elements) gives the same patterns."""
    n = 40

    def scalar_rosenbrock(x):
        xs = [x[k] for k in range(n)]
        return sum((100.0 * (xs[k + 1] - xs[k] ** 2) ** 2 + (1.0 - xs[k]) ** 2
                    for k in range(n - 1)), ad.constant(0.0))

    c = ad.local()
    g = ad.trace(scalar_rosenbrock, x=ad.f64(n))
    assert c.sparsity(g, hessian=True).nnz == 3 * n - 2
    check_sparse_hessian(c, g, {"x": np.random.default_rng(9).standard_normal(n)})


# -- colorings by definition ---------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.floats(0.0, 0.5), st.integers(0, 2**16))
def test_colorings_are_valid_on_random_patterns(n, density, seed):
    rng = np.random.default_rng(seed)
    p = sp.random(n, max(1, n // 2 + 3), density=density, random_state=rng, format="csr") != 0
    assert_column_coloring(p, coloring.column_coloring(p))
    assert_row_coloring(p, coloring.row_coloring(p))
    h = sp.random(n, n, density=density, random_state=rng, format="csr") != 0
    h = ((h + h.T) != 0).tocsr()
    assert_star_coloring(h, coloring.star_coloring(h))
    assert_distance1_coloring(h, coloring.distance1_coloring(h))


def test_star_coloring_of_a_large_arrowhead_is_fast_and_two_colors():
    n = 20000
    rows = np.concatenate([np.zeros(n - 1, int), np.arange(1, n)])
    cols = np.concatenate([np.arange(1, n), np.zeros(n - 1, int)])
    h = sp.csr_matrix((np.ones(2 * n - 2, bool), (rows, cols)), shape=(n, n))
    colors = coloring.star_coloring(h)
    assert colors.max() + 1 == 2


# -- the API around it ------------------------------------------------------------------------
def test_sparsity_is_cached_with_the_compiled_graph():
    c = ad.local()
    g = ad.trace(rosenbrock, x=ad.f64(10))
    assert c.sparsity(g) is c.sparsity(g)
    assert c.sparsity(g, hessian=True) is c.sparsity(g, hessian=True)
    assert c.sparsity(g, wrt="x") is not c.sparsity(g)


def test_blocks_shapes_names_and_dtype():
    c = ad.local()
    g = ad.trace(lambda x, y: {"a": ad.sin(x) * y[0, 0], "b": ad.sum(y)},
                 x=ad.f32(2, 3), y=ad.f32(2, 2))
    feeds = {"x": np.ones((2, 3), np.float32), "y": np.ones((2, 2), np.float32)}
    j = c.jacobian(g, sparse=True, inputs=feeds)
    assert list(j) == ["a", "b"] and list(j["a"]) == ["x", "y"]
    assert j["a"]["x"].shape == (6, 6) and j["b"]["y"].shape == (1, 4)
    assert j["a"]["x"].dtype == np.float32
    s = c.sparsity(g)
    assert s.rows == {"a": ("float32", (2, 3)), "b": ("float32", ())}
    assert s.blocks()["a"]["y"].nnz == 6


def test_errors_and_limits():
    c = ad.local()
    g = ad.trace(lambda x: ad.sin(x), x=ad.f64(3))
    with pytest.raises(InvalidRequestError, match="scalar"):
        c.hessian(g, sparse=True, x=np.ones(3))
    with pytest.raises(InvalidRequestError, match="no input named"):
        c.sparsity(g, wrt="y")
    dense = ad.trace(lambda x: x - ad.mean(x), x=ad.f64(200))
    small = ad.local(max_eval_bytes=16 * 10000)
    with pytest.raises(LimitExceededError, match="pattern"):
        small.sparsity(dense)
    j = ad.local().jacobian(dense, sparse=True, x=np.arange(200.0))["out"]["x"]
    assert j.nnz == 200 * 200


def test_constant_output_has_an_empty_pattern_and_zero_sweeps():
    c = ad.local()
    g = ad.trace(lambda x: ad.sum(x * 2.0), x=ad.f64(4))
    s = c.sparsity(g, hessian=True)
    assert s.nnz == 0 and s.colors() == {"star": 0, "diagonal": 0}
    assert c.hessian(g, sparse=True, x=np.ones(4))["x"]["x"].nnz == 0
    np.testing.assert_array_equal(c.hessian_diag(g, x=np.ones(4))["x"], np.zeros(4))


def test_readme_sparse_example_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Sparse Jacobians and Hessians\n\n```py\n")[1].split("```", 1)[0]
    ns = {"np": np, "adsvc": ad, "c": ad.local()}
    exec(compile(block.replace("100_000", "2_000"), "README.md", "exec"), ns)
    assert ns["s"].colors() == {"star": 3, "diagonal": 2}
    assert ns["H"].nnz == 3 * 2000 - 2 and ns["J"].shape == (1999, 2000)
    np.testing.assert_allclose(ns["d"], ns["H"].diagonal())


def test_a_dense_row_gets_the_trivial_forward_coloring_without_a_graph():
    """A scalar output of 3000 inputs: reverse needs 1 color; the complete column
    intersection graph (4.5 million edges) is never built."""
    n = 3000
    p = sp.csr_matrix(np.ones((1, n), bool))
    forward, reverse = coloring.jacobian_colorings(p)
    np.testing.assert_array_equal(forward, np.arange(n))
    assert reverse.max() == 0
    c = ad.local()
    g = ad.trace(lambda x: ad.sum(ad.sin(x)), x=ad.f64(n))
    s = c.sparsity(g)
    assert s.mode == "reverse" and s.colors() == {"forward": n, "reverse": 1}
    assert_column_coloring(s.pattern, s.colorings["forward"])


class _OneSweepAtATime(ad.LocalClient):
    def _compile_sweeps(self, *args):
        return None


def test_vector_mode_sweeps_equal_one_sweep_per_color():
    x = np.random.default_rng(10).standard_normal(60)
    jg, hg = ad.trace(banded, x=ad.f64(60)), ad.trace(rosenbrock, x=ad.f64(60))
    vector, single = ad.local(), _OneSweepAtATime()
    for mode in ("forward", "reverse"):
        a = vector.jacobian(jg, mode=mode, sparse=True, x=x)["out"]["x"]
        b = single.jacobian(jg, mode=mode, sparse=True, x=x)["out"]["x"]
        assert abs(a - b).max() == 0
    assert abs(vector.hessian(hg, sparse=True, x=x)["x"]["x"]
               - single.hessian(hg, sparse=True, x=x)["x"]["x"]).max() == 0
    np.testing.assert_array_equal(vector.hessian_diag(hg, x=x)["x"],
                                  single.hessian_diag(hg, x=x)["x"])
    assert any(len(k) == 5 and k[1] == "sweeps" for k in vector.cache._items)


def test_a_dense_pattern_gets_the_trivial_coloring_without_an_intersection_graph():
    """x - mean(x) is dense: every column needs its own color, found from the full rows
    (networkx would hold the 2M-edge intersection graph of 2000 columns: ~1 GB)."""
    g = ad.trace(lambda x: ad.square(x - ad.mean(x, keepdims=True)),
                    x=ad.f64(2000))
    built = []
    real = coloring.column_coloring
    coloring.column_coloring = lambda p: built.append(p.shape) or real(p)
    try:
        s = ad.local().sparsity(g)
    finally:
        coloring.column_coloring = real
    assert not built
    assert s.colors()["forward"] == s.colors()["reverse"] == 2000
