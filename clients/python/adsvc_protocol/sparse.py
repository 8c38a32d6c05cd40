"""Sparse derivatives: a structural pattern with its colorings, compressed seeds and the
recovery of the matrix from the compressed sweeps.

A `Sparsity` is the pattern of a Jacobian (rows: the graph's float outputs, columns: the
wrt inputs, each flattened row-major and concatenated in order) or of a Hessian (rows
and columns: the wrt inputs), with colorings of it:

- "forward": a color per column such that no two columns with an entry in the same row
  share one (distance-2 coloring of the bipartite graph). One JVP per color, seeded with
  the sum of the one-hot directions of its columns, gives B = J·S, and J[i, j] =
  B[i, color[j]].
- "reverse": the same for rows (one VJP per color: B = Sᵀ·J, J[i, j] = B[color[i], j]).
- "star" (Hessians): a distance-1 coloring in which every path on four vertices has
  three colors; one Hessian-vector product per color, B = H·S, and each entry H[i, j]
  is B[i, color[j]] when j is the only neighbour of i of its color, else B[j, color[i]].
- "diagonal" (Hessians): a distance-1 coloring; H[i, i] = B[i, color[i]] exactly.

Colors are 0, 1, ...; -1 marks a column, row or variable without entries (in no seed).

The server computes patterns and colorings (`adsvc.passes.sparsity`) and sends them
(service.proto: SparsityResponse, a COO pattern); the recipes run the sweeps and
recover the values here, so every client shares this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from adsvc_protocol import dtypes
from adsvc_protocol.errors import AdsvcError, InvalidRequestError
from adsvc_protocol.feeds import TypeSig
from adsvc_protocol.proto import ir_pb2, service_pb2
from adsvc_protocol.tensors import TO_ENUM as DTYPE_TO_ENUM
from adsvc_protocol.tensors import dtype_from_enum, from_tensor, to_tensor

JACOBIAN, HESSIAN = "jacobian", "hessian"
FORWARD, REVERSE, STAR, DIAGONAL = "forward", "reverse", "star", "diagonal"
COLORINGS = {JACOBIAN: (FORWARD, REVERSE), HESSIAN: (STAR, DIAGONAL)}


def count(colors: np.ndarray) -> int:
    """The number of colors of a coloring (0 for nothing to color)."""
    return int(colors.max()) + 1 if colors.size else 0


def offsets(sigs: dict[str, TypeSig]) -> dict[str, tuple[int, int]]:
    """{name: (start, stop)} of each flattened block in the concatenation, in order."""
    out, start = {}, 0
    for name, (_, shape) in sigs.items():
        stop = start + math.prod(shape)
        out[name] = (start, stop)
        start = stop
    return out


@dataclass(eq=False)
class Sparsity:
    """A structural Jacobian or Hessian pattern with its colorings (module docstring).

    `pattern` is a boolean CSR matrix (len(rows) blocks of rows × cols blocks of
    columns); `colorings` maps each coloring name of its kind to one int32 color per
    column ("forward"), row ("reverse") or variable ("star", "diagonal")."""

    kind: str
    rows: dict[str, TypeSig]
    cols: dict[str, TypeSig]
    pattern: sp.csr_matrix
    colorings: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """What a cached pattern holds: its CSR arrays, colorings and recovery indices."""
        p = self.pattern
        return (p.data.nbytes + p.indices.nbytes + p.indptr.nbytes
                + 8 * len(self.colorings) * p.nnz
                + sum(c.nbytes for c in self.colorings.values()))

    @property
    def nnz(self) -> int:
        """The number of structural nonzeros."""
        return int(self.pattern.nnz)

    def colors(self) -> dict[str, int]:
        """{coloring name: number of colors} (sweeps each needs)."""
        return {k: count(c) for k, c in self.colorings.items()}

    @property
    def mode(self) -> str:
        """The coloring a sparse derivative uses: for a Jacobian the mode with fewer colors
        (forward on a tie: a JVP is the cheaper sweep), for a Hessian "star"."""
        if self.kind == HESSIAN:
            return STAR
        n = self.colors()
        return FORWARD if n[FORWARD] <= n[REVERSE] else REVERSE

    def blocks(self, matrix: sp.spmatrix | None = None) -> dict[str, dict[str, sp.csr_matrix]]:
        """{row block: {column block: CSR matrix}} of `matrix` (default: the pattern)."""
        m = (self.pattern if matrix is None else matrix).tocsr()
        cols = offsets(self.cols)
        out = {}
        for r, (r0, r1) in offsets(self.rows).items():
            band = m[r0:r1]
            out[r] = {c: band[:, c0:c1].tocsr() for c, (c0, c1) in cols.items()}
        return out

    def seeds(self, coloring: str) -> np.ndarray:
        """(colors × length) 0/1 matrix: row c is the sum of the one-hot directions of
        color c (the seed of one compressed sweep)."""
        key = ("seeds", coloring)
        s = self._recovery.get(key)
        if s is None:
            colors = self.colorings[coloring]
            s = np.zeros((count(colors), colors.size))
            seeded = np.flatnonzero(colors >= 0)
            s[colors[seeded], seeded] = 1.0
            s.setflags(write=False)
            self._recovery[key] = s
        return s

    @cached_property
    def _coo(self) -> tuple[np.ndarray, np.ndarray]:
        p = self.pattern
        return np.repeat(np.arange(p.shape[0]), np.diff(p.indptr)), p.indices.astype(np.int64)

    def _sources(self, coloring: str) -> np.ndarray:
        """Flat indices into the compressed matrix of each pattern entry (CSR order)."""
        rows, cols = self._coo
        c = self.colorings[coloring].astype(np.int64)
        k = count(c)
        if coloring == FORWARD:  # B is rows × colors
            return rows * k + c[cols]
        if coloring == REVERSE:  # B is colors × columns
            return c[rows] * self.pattern.shape[1] + cols
        if coloring == STAR:
            return self._star_sources(rows, cols, c, k)
        raise ValueError(f"unknown coloring {coloring!r}")

    def _star_sources(self, rows, cols, c, k) -> np.ndarray:
        # How many off-diagonal neighbours of each color every row has: where j is the
        # only neighbour of i of color[j], B[i, color[j]] is H[i, j]; else (star
        # coloring) i is the only neighbour of j of color[i] and B[j, color[i]] is.
        off = rows != cols
        n = self.pattern.shape[0]
        per_color = sp.csr_matrix((np.ones(int(off.sum())), (rows[off], c[cols[off]])),
                                  shape=(n, max(k, 1))).toarray()
        direct = (~off) | (per_color[rows, c[cols]] == 1)
        return np.where(direct, rows * k + c[cols], cols * k + c[rows])

    @cached_property
    def _recovery(self) -> dict:
        return {}  # computed once per coloring: seeds and recovery indices

    def recover(self, coloring: str, compressed: np.ndarray) -> sp.csr_matrix:
        """The matrix (CSR, with the pattern's structure) from the compressed sweeps of
        `coloring` (B = J·S, Sᵀ·J or H·S; see the module docstring)."""
        src = self._recovery.get(coloring)
        if src is None:
            src = self._recovery[coloring] = self._sources(coloring)
        b = np.asarray(compressed)
        data = b.reshape(-1)[src] if src.size else np.zeros(0, b.dtype)
        p = self.pattern
        return sp.csr_matrix((data, p.indices.copy(), p.indptr.copy()), shape=p.shape)

    def diagonal(self, compressed: np.ndarray) -> np.ndarray:
        """The Hessian's diagonal from the compressed sweeps of the "diagonal" coloring."""
        c = self.colorings[DIAGONAL].astype(np.int64)
        b = np.asarray(compressed)
        out = np.zeros(c.size, b.dtype)
        seeded = np.flatnonzero(c >= 0)
        out[seeded] = b[seeded, c[seeded]]
        return out


# -- the wire form (service.proto: SparseMatrix, Coloring, SparsityResponse) -----------
KIND_TO_ENUM = {JACOBIAN: service_pb2.SPARSITY_KIND_JACOBIAN,
                HESSIAN: service_pb2.SPARSITY_KIND_HESSIAN}
KIND_FROM_ENUM = {v: k for k, v in KIND_TO_ENUM.items()}


def kind_from_enum(value: int, field: str = "kind") -> str:
    """"jacobian" or "hessian" for a SparsityKind; InvalidRequestError otherwise."""
    try:
        return KIND_FROM_ENUM[value]
    except KeyError:
        raise InvalidRequestError(f"kind must be SPARSITY_KIND_JACOBIAN or "
                                  f"SPARSITY_KIND_HESSIAN, got {value}", field=field) from None


def matrix_to_proto(m: sp.spmatrix, values: bool = True) -> service_pb2.SparseMatrix:
    """A sparse matrix as COO indices (sorted by row, then column) and values."""
    csr = sp.csr_matrix(m)
    csr.sort_indices()
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    idx = np.stack([rows, csr.indices.astype(np.int64)], axis=1)
    out = service_pb2.SparseMatrix(rows=csr.shape[0], cols=csr.shape[1],
                                   indices=to_tensor(idx, dtypes.INT64))
    if values:
        out.values.CopyFrom(to_tensor(csr.data))
    return out


def matrix_from_proto(msg: service_pb2.SparseMatrix, where: str = "matrix",
                      error=AdsvcError) -> sp.csr_matrix:
    """The CSR matrix of a SparseMatrix (boolean when it has no values); `error` (at
    `where`) when it is inconsistent."""
    shape = (int(msg.rows), int(msg.cols))
    idx = from_tensor(msg.indices, f"{where}.indices", error)
    if idx.size == 0:
        idx = idx.reshape(0, 2)
    if idx.ndim != 2 or idx.shape[1] != 2 or idx.dtype.kind != "i":
        raise error("indices must be an integer tensor of dims [nnz, 2]", field=where)
    if idx.size and (idx.min() < 0 or idx[:, 0].max() >= shape[0]
                     or idx[:, 1].max() >= shape[1]):
        raise error(f"an index is outside the {shape[0]}x{shape[1]} matrix", field=where)
    if msg.HasField("values"):
        data = from_tensor(msg.values, f"{where}.values", error).reshape(-1)
        if data.size != idx.shape[0]:
            raise error(f"{data.size} values for {idx.shape[0]} indices", field=where)
    else:
        data = np.ones(idx.shape[0], dtype=bool)
    m = sp.csr_matrix((data, (idx[:, 0], idx[:, 1])), shape=shape)
    m.sort_indices()
    return m


def named_types(sigs: dict[str, TypeSig]) -> list[service_pb2.NamedType]:
    """{name: (dtype, shape)} as NamedType messages, in order."""
    return [service_pb2.NamedType(name=k, type=ir_pb2.TensorType(
        dtype=DTYPE_TO_ENUM[dt], dims=list(shape))) for k, (dt, shape) in sigs.items()]


def sigs_from(named, error=AdsvcError) -> dict[str, TypeSig]:
    """NamedType messages as {name: (dtype, shape)}."""
    return {t.name: (dtype_from_enum(t.type.dtype, t.name, error),
                     tuple(int(d) for d in t.type.dims)) for t in named}


def to_proto(s: Sparsity) -> service_pb2.SparsityResponse:
    """The SparsityResponse of a Sparsity (the pattern without values)."""
    return service_pb2.SparsityResponse(
        kind=KIND_TO_ENUM[s.kind], rows=named_types(s.rows), cols=named_types(s.cols),
        pattern=matrix_to_proto(s.pattern, values=False),
        colorings=[service_pb2.Coloring(name=k, colors=count(c),
                                        color=to_tensor(c, dtypes.INT32))
                   for k, c in s.colorings.items()])


def from_proto(msg: service_pb2.SparsityResponse, error=AdsvcError) -> Sparsity:
    """The Sparsity of a SparsityResponse, checked for consistency."""
    kind = KIND_FROM_ENUM.get(msg.kind)
    if kind is None:
        raise error(f"unknown sparsity kind {msg.kind}", field="kind")
    rows, cols = sigs_from(msg.rows, error), sigs_from(msg.cols, error)
    pattern = matrix_from_proto(msg.pattern, "pattern", error).astype(bool)
    if pattern.shape != (sum(math.prod(s[1]) for s in rows.values()),
                         sum(math.prod(s[1]) for s in cols.values())):
        raise error("the pattern's shape does not match its row and column blocks",
                    field="pattern")
    colorings = {}
    for c in msg.colorings:
        colors = from_tensor(c.color, f"colorings.{c.name}", error).reshape(-1)
        length = pattern.shape[1 if c.name == FORWARD else 0]
        if c.name not in COLORINGS[kind] or colors.size != length or count(colors) != c.colors:
            raise error(f"coloring {c.name!r} does not fit the pattern", field="colorings")
        colorings[c.name] = colors.astype(np.int32)
    return Sparsity(kind, rows, cols, pattern, colorings)
