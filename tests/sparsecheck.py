"""Checks of sparse derivatives against the dense ones, and of colorings by definition.

- the pattern never misses a nonzero of the dense Jacobian/Hessian;
- the recovered sparse matrix equals the dense one (Jacobians in both modes and the
  automatic choice; Hessians from the star coloring; the exact Hessian diagonal);
- every coloring is valid: forward — no two columns with an entry in one row share a
  color; reverse — the same for rows; star — adjacent vertices differ and every
  two-colored subgraph is a union of stars; diagonal — adjacent vertices differ.
"""

from __future__ import annotations

import itertools
import math

import networkx as nx
import numpy as np
import scipy.sparse as sp


def _flat(blocks: dict, rows: dict, cols: dict) -> np.ndarray:
    """One dense matrix from {row: {col: array of shape row.shape + col.shape}}."""
    return np.block([[np.asarray(blocks[r][c], float).reshape(math.prod(rows[r][1]),
                                                              math.prod(cols[c][1]))
                      for c in cols] for r in rows])


def _sparse_flat(blocks: dict, rows: dict, cols: dict) -> np.ndarray:
    return np.block([[blocks[r][c].toarray() for c in cols] for r in rows]).astype(float)


def assert_column_coloring(p, colors) -> None:
    p = sp.csr_matrix(p)
    for i in range(p.shape[0]):
        cs = colors[p.indices[p.indptr[i]:p.indptr[i + 1]]]
        assert len(set(cs.tolist())) == len(cs), f"row {i}: columns share a color"
        assert (cs >= 0).all(), f"row {i}: a column with an entry is in no seed"


def assert_row_coloring(p, colors) -> None:
    assert_column_coloring(sp.csr_matrix(p).T, colors)


def _graph(h) -> nx.Graph:
    coo = sp.coo_matrix(h)
    g = nx.Graph()
    g.add_nodes_from(range(h.shape[0]))
    g.add_edges_from((i, j) for i, j in zip(coo.row.tolist(), coo.col.tolist()) if i != j)
    return g


def assert_distance1_coloring(h, colors) -> None:
    for i, j in _graph(h).edges:
        assert colors[i] != colors[j], f"adjacent {i}, {j} share color {colors[i]}"
    has = np.diff(sp.csr_matrix(h).indptr) > 0
    assert (colors[has] >= 0).all(), "a vertex with entries is in no seed"


def assert_star_coloring(h, colors) -> None:
    assert_distance1_coloring(h, colors)
    g = _graph(h)
    for a, b in itertools.combinations(sorted(set(colors.tolist())), 2):
        sub = g.subgraph([v for v in g if colors[v] in (a, b)])
        for comp in nx.connected_components(sub):
            s = sub.subgraph(comp)
            centers = [v for v in s if s.degree(v) > 1]
            assert len(centers) <= 1 and s.number_of_edges() == len(comp) - 1, \
                f"colors {a}, {b}: a two-colored component that is not a star: {sorted(comp)}"


def assert_colorings(s) -> None:
    """Every coloring of a Sparsity is valid for its pattern."""
    checks = {"forward": assert_column_coloring, "reverse": assert_row_coloring,
              "star": assert_star_coloring, "diagonal": assert_distance1_coloring}
    for name, colors in s.colorings.items():
        checks[name](s.pattern, colors)


def _assert_covers(pattern, dense, what) -> None:
    missed = (np.abs(dense) > 0) & ~pattern.toarray()
    assert not missed.any(), f"{what}: the pattern misses nonzeros at {np.argwhere(missed)[:5]}"


def check_sparse_jacobian(c, g, feeds, rtol=1e-10, atol=1e-12) -> None:
    s = c.sparsity(g)
    assert_colorings(s)
    dense = _flat(c.jacobian(g, inputs=feeds), s.rows, s.cols)
    _assert_covers(s.pattern, dense, "Jacobian")
    for mode in (None, "forward", "reverse"):
        got = c.jacobian(g, mode=mode, inputs=feeds, sparse=True)
        for blocks in got.values():
            assert all(sp.issparse(m) and m.format == "csr" for m in blocks.values())
        np.testing.assert_allclose(_sparse_flat(got, s.rows, s.cols), dense, rtol=rtol,
                                   atol=atol, err_msg=f"sparse Jacobian, mode {mode}")


def check_sparse_hessian(c, g, feeds, rtol=1e-10, atol=1e-12) -> None:
    s = c.sparsity(g, hessian=True)
    assert_colorings(s)
    dense = _flat(c.hessian(g, inputs=feeds), s.rows, s.cols)
    _assert_covers(s.pattern, dense, "Hessian")
    got = _sparse_flat(c.hessian(g, inputs=feeds, sparse=True), s.rows, s.cols)
    np.testing.assert_allclose(got, dense, rtol=rtol, atol=atol, err_msg="sparse Hessian")
    diag = c.hessian_diag(g, inputs=feeds)
    flat = np.concatenate([np.ravel(diag[x]) for x in s.cols]) if s.cols else np.zeros(0)
    for x in s.cols:
        assert diag[x].shape == tuple(s.cols[x][1])
    np.testing.assert_allclose(flat, np.diag(dense), rtol=rtol, atol=atol,
                               err_msg="Hessian diagonal")
