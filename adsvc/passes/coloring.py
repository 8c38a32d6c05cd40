"""Graph colorings that compress sparse Jacobians and Hessians (networkx graphs).

- `column_coloring(P)`: columns that share a row get different colors — the distance-2
  coloring of P's bipartite graph, computed as networkx's greedy coloring of the column
  intersection graph (edges where PᵀP is set). Forward mode: one JVP per color.
- `row_coloring(P)`: the same for rows (PPᵀ). Reverse mode: one VJP per color.
- `star_coloring(H)`: for a symmetric pattern, a distance-1 coloring of its adjacency
  graph in which every path on four vertices has at least three colors, so that every
  two-colored subgraph is a union of stars and each entry is read directly from one
  Hessian-vector product (Gebremedhin, Manne, Pothen: "What color is your Jacobian?",
  SIAM Review 2005). networkx has no star coloring; `star_coloring` is the greedy
  algorithm: vertices in networkx's largest-first order, each given the smallest color
  that neither a neighbour has nor would close a two-colored path on four vertices.
  Bookkeeping per vertex (colors of its neighbours, and of neighbours that already have
  two neighbours of its color) keeps a step O(degree × colors), so a hub (an arrowhead)
  costs no more than its edges.
- `distance1_coloring(H)`: neighbours differ; enough for the Hessian's diagonal.
- `jacobian_colorings(P)`: both Jacobian colorings, without building a graph that
  cannot win: a mode whose lower bound (the most entries in one row for columns, in one
  column for rows) is above the other mode's colors, or whose intersection graph
  would have more than MAX_EDGES edges (a dense row makes it complete), gets the
  trivial coloring (every column or row its own color; valid, never chosen over a
  better one).

Each returns one int32 color per column, row or vertex (0, 1, ...); a vertex without
edges gets color 0 (`adsvc.passes.sparsity` marks those without entries -1).
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np
import scipy.sparse as sp

STRATEGY = "largest_first"  # networkx greedy_color ordering (banded: optimal colors)
MAX_EDGES = 4_000_000  # intersection graphs beyond this get the trivial coloring
DENSE_FROM = 512  # columns from which a dense (> 1/4 full) intersection graph is not built


def adjacency_graph(m: sp.spmatrix) -> nx.Graph:
    """The undirected graph of a square pattern's off-diagonal entries (either triangle)."""
    n = m.shape[0]
    coo = sp.triu((m + m.T).tocsr(), k=1).tocoo()
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(coo.row.tolist(), coo.col.tolist()))
    return g


def _greedy(g: nx.Graph) -> np.ndarray:
    colors = np.zeros(g.number_of_nodes(), dtype=np.int32)
    for v, c in nx.greedy_color(g, strategy=STRATEGY).items():
        colors[v] = c
    return colors


def column_coloring(p: sp.spmatrix) -> np.ndarray:
    """A color per column; no two columns with an entry in the same row share one."""
    b = sp.csr_matrix(p, dtype=bool)
    return _greedy(adjacency_graph((b.T @ b).tocsr()))


def row_coloring(p: sp.spmatrix) -> np.ndarray:
    """A color per row; no two rows with an entry in the same column share one."""
    return column_coloring(sp.csr_matrix(p).T)


def trivial_coloring(length: int) -> np.ndarray:
    """Every column (row) its own color: valid for any pattern."""
    return np.arange(length, dtype=np.int32)


def _bounded_column_coloring(p: sp.csr_matrix, beat: int | None) -> np.ndarray:
    """column_coloring(p), or the trivial one when it must need more than `beat`
    colors or its intersection graph is over MAX_EDGES edges."""
    row_nnz = np.diff(p.indptr)
    lower = int(row_nnz.max()) if row_nnz.size else 0
    edges = int((row_nnz.astype(np.int64) ** 2).sum())  # an upper bound, before merging
    n = p.shape[1]
    if lower >= n:  # a full row: every column needs its own color anyway
        return trivial_coloring(n)
    if n >= DENSE_FROM and edges > n * n // 4 and (p.T @ p).nnz > n * n // 4:
        # a dense intersection graph: coloring cannot gain much, and networkx would hold
        # a few hundred bytes per edge (a dense 2000-column pattern took ~1 GB and 40 s)
        return trivial_coloring(n)
    if (beat is not None and lower > beat) or edges > 2 * MAX_EDGES and \
            (p.T @ p).nnz > 2 * MAX_EDGES:
        return trivial_coloring(p.shape[1])
    return column_coloring(p)


def jacobian_colorings(p: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """(column coloring, row coloring) of a Jacobian pattern (module docstring): the mode
    with the smaller lower bound is colored first."""
    b = sp.csr_matrix(p, dtype=bool)
    t = b.T.tocsr()
    cols_first = (np.diff(b.indptr).max(initial=0) <= np.diff(t.indptr).max(initial=0))
    first, second = (b, t) if cols_first else (t, b)
    c1 = _bounded_column_coloring(first, None)
    c2 = _bounded_column_coloring(second, int(c1.max(initial=-1)) + 1)
    return (c1, c2) if cols_first else (c2, c1)


def distance1_coloring(h: sp.spmatrix) -> np.ndarray:
    """A color per vertex of a symmetric pattern; adjacent vertices differ."""
    return _greedy(adjacency_graph(h))


def star_coloring(h: sp.spmatrix, check: Callable[[], None] | None = None) -> np.ndarray:
    """A star coloring of a symmetric pattern's adjacency graph (module docstring);
    `check` is called every few thousand vertices and may raise to stop the work."""
    g = adjacency_graph(h)
    state = _StarState(g)
    for k, v in enumerate(nx.coloring.strategy_largest_first(g, None)):
        if check is not None and k % 4096 == 0:
            check()
        state.assign(v, state.smallest_allowed(v))
    colors = np.zeros(g.number_of_nodes(), dtype=np.int32)
    for v, c in state.color.items():
        colors[v] = c
    return colors


class _StarState:
    """The greedy star coloring's bookkeeping: `color`; `around[v]` = {color: number of
    colored neighbours of v with it}; `first[v, c]` = the first neighbour of v colored
    c; `bad[w]` = {color c: number of colored neighbours x of w colored c that have a
    second neighbour of w's color}."""

    def __init__(self, g: nx.Graph):
        self.g = g
        self.color: dict[int, int] = {}
        self.around: dict[int, dict[int, int]] = {v: {} for v in g}
        self.first: dict[tuple[int, int], int] = {}
        self.bad: dict[int, dict[int, int]] = {v: {} for v in g}

    def smallest_allowed(self, v: int) -> int:
        """The smallest color v can take: not a neighbour's (distance 1), not one that
        makes a two-colored path v-w-x-y (v at an end) or w-v-x-y (v inside)."""
        around = self.around[v]
        forbidden = set(around)
        for w in self.g[v]:
            cw = self.color.get(w)
            if cw is None:
                continue
            forbidden.update(c for c, k in self.bad[w].items() if k)  # v-w-x-y
            if around[cw] >= 2:  # w-v-x-y: v has two neighbours of w's color
                forbidden.update(self.around[w])
        c = 0
        while c in forbidden:
            c += 1
        return c

    def assign(self, v: int, c: int) -> None:
        """Color v with c and update the bookkeeping of its neighbours."""
        self.color[v] = c
        for x in self.g[v]:
            k = self.around[x].get(c, 0) + 1
            self.around[x][c] = k
            if k == 1:
                self.first[x, c] = v
            cx = self.color.get(x)
            if cx is not None and k >= 2:  # x has two neighbours colored c: v, first
                self.bad[v][cx] = self.bad[v].get(cx, 0) + 1
                if k == 2:
                    w0 = self.first[x, c]
                    self.bad[w0][cx] = self.bad[w0].get(cx, 0) + 1
        for w in self.g[v]:  # v, now colored, has two neighbours of w's color
            cw = self.color.get(w)
            if cw is not None and self.around[v].get(cw, 0) >= 2:
                self.bad[w][c] = self.bad[w].get(c, 0) + 1
