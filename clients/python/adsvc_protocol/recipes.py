"""Client recipes: values and derivatives as functions over compile and run.

Every recipe takes a `Backend` — anything that can compile a graph for a list of modes
and run the result — so the in-process client, the SDK and the server's Gradient RPC
compute the same answer with the same code. The names the passes add (``tangent:x``,
``grad:x`` ...) are read with `adsvc_protocol.names`; dense Jacobians and Hessians are
one sweep per element of the seeded inputs (`basis`); sparse ones are one sweep per
color of the backend's `Sparsity` (pattern and colorings), recovered by
`adsvc_protocol.sparse`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from adsvc_protocol import dims, dtypes, names
from adsvc_protocol.errors import InputError, InvalidRequestError
from adsvc_protocol.feeds import TypeSig
from adsvc_protocol.modes import FORWARD, REVERSE, single_mode
from adsvc_protocol.sparse import DIAGONAL, HESSIAN, JACOBIAN, STAR, Sparsity, offsets

Feeds = Mapping[str, Any]


@dataclass(eq=False)
class Compiled:
    """A compiled (differentiated, planned) graph: a backend's handle and its signature."""

    handle: Any
    inputs: dict[str, TypeSig]
    outputs: dict[str, TypeSig]
    # the differentiated graph, in the backend's representation, or a function that
    # builds it on first use (a backend that evaluates without it: a native tape)
    graph_source: Any = None
    # {(kind, wrt): Sparsity} computed for this (undifferentiated) graph, kept with it
    sparsity: dict = field(default_factory=dict)
    # what recipes work out from the signature once (the output names they pick)
    memo: dict = field(default_factory=dict)

    @property
    def graph(self) -> Any:
        """The differentiated graph (built now if the backend deferred it)."""
        if callable(self.graph_source):
            self.graph_source = self.graph_source()
        return self.graph_source

    @graph.setter
    def graph(self, value: Any) -> None:
        self.graph_source = value


class Backend(Protocol):
    """What the recipes run on: compile a graph for modes, wrt and seed, then run the
    result on one or many sets of feeds."""

    def compile(self, graph, modes: tuple[str, ...], wrt: tuple[str, ...] | None,
                seed: bool) -> Compiled:
        """`graph` differentiated by `modes` in turn with respect to `wrt` (None: every
        float input), ready to run; `seed`: a first reverse pass takes no cotangent input."""
        ...

    def run(self, compiled: Compiled, feeds: Feeds,
            outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """{output name: value} of the compiled graph at `feeds`; `outputs`: the names
        the caller reads (None: all), so a backend may skip what only the others need
        (the result may still hold more)."""
        ...

    def run_many(self, compiled: Compiled,
                 feeds: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
        """One {output name: value} per set of feeds, in order."""
        ...

    def sparsity(self, graph, kind: str, wrt: tuple[str, ...] | None) -> Sparsity:
        """The structural pattern of the Jacobian ("jacobian") or Hessian ("hessian") of
        `graph` with respect to `wrt` (None: every float input), with its colorings."""
        ...

    # Optional: `compile_sweeps(graph, mode, wrt, count) -> Compiled | None`, `count`
    # compressed sweeps of `mode` ("forward", "reverse", "hvp") as passes over one primal
    # graph (adsvc.passes.sweeps); None or absent: one evaluation per sweep.


# -- shared rules ---------------------------------------------------------------------
def wrt_tuple(wrt) -> tuple[str, ...] | None:
    """`wrt` as a tuple of input names (None: every float input)."""
    if wrt is None:
        return None
    return (wrt,) if isinstance(wrt, str) else tuple(wrt)


def ordered(out: Mapping[str, Any], order) -> dict[str, Any]:
    """`out` in the order of the names in `order` (a graph's outputs); a server's map
    has no order."""
    return {k: out[k] for k in order if k in out}


def scalar_output(outputs: Mapping[str, TypeSig], primal_only: bool = True) -> str:
    """The name of the one scalar float output a gradient needs, or InvalidRequestError.
    Among the graph's own outputs (`primal_only`: not those differentiation added — a
    compiled graph's; else every output counts — a graph before differentiation)."""
    primal = [k for k in outputs if names.is_primal(k) or not primal_only]
    floats = [k for k in primal if dtypes.is_float(outputs[k][0])]
    if len(floats) != 1 or tuple(outputs[floats[0]][1]) != ():
        raise InvalidRequestError(
            "a gradient needs exactly one scalar float output; this graph has "
            + (", ".join(f"{k}{list(outputs[k][1])}" for k in primal) or "none")
            + " (use jacobian or vjp)", field="outputs")
    return floats[0]


def bound(c: Compiled, feeds: Feeds) -> Compiled:
    """`c` with concrete types when its shapes are symbolic (`adsvc_protocol.dims`): the
    symbols bound by the shapes of `feeds` (errors name the symbol or the input)."""
    sigs = [*c.inputs.values(), *c.outputs.values()]
    if not any(dims.is_symbolic(sh) for _, sh in sigs):
        return c
    binding = dims.bind(c.inputs, {k: np.shape(v) for k, v in feeds.items() if k in c.inputs})
    missing = sorted(dims.symbols_of(c.inputs) - set(binding))
    if missing:
        raise InputError(f"the dimension {missing[0]!r} is not bound: feed an input whose "
                         "shape has it", field="inputs")

    def concrete(s: Mapping[str, TypeSig]) -> dict[str, TypeSig]:
        return {k: (dt, dims.concrete(sh, binding)) for k, (dt, sh) in s.items()}
    return dataclasses.replace(c, inputs=concrete(c.inputs), outputs=concrete(c.outputs))


def zeros(sig: TypeSig) -> np.ndarray:
    """A zero array of the type `sig` (dtype, shape)."""
    return np.zeros(sig[1], dtype=dtypes.to_numpy(sig[0]))


def size(sig: TypeSig) -> int:
    """The number of elements of the type `sig` (dtype, shape)."""
    return math.prod(sig[1])


def basis(seeds: Mapping[str, TypeSig]) -> Iterator[tuple[str, int, dict[str, np.ndarray]]]:
    """(seed name, flat index e, feeds): every seed input zero except element e of one,
    which is 1 — the directions of a dense Jacobian, one sweep each."""
    base = {k: zeros(sig) for k, sig in seeds.items()}
    for name, sig in seeds.items():
        for e in range(size(sig)):
            one = zeros(sig)
            one.reshape(-1)[e] = 1
            yield name, e, {**base, name: one}


def _sweeps(b: Backend, c: Compiled, feeds: Feeds, seeds: list[str]):
    """[(seed name, e, outputs)] of one run per basis direction of `seeds`."""
    runs, index = [], []
    for name, e, seed in basis({k: c.inputs[k] for k in seeds}):
        runs.append({**feeds, **seed})
        index.append((name, e))
    outs = b.run_many(c, runs) if runs else []
    return [(name, e, out) for (name, e), out in zip(index, outs)]


# -- recipes --------------------------------------------------------------------------
def evaluate(b: Backend, g, feeds: Feeds) -> dict[str, np.ndarray]:
    """{output name: value} of `g` at `feeds`."""
    c = b.compile(g, (), None, False)
    return ordered(b.run(c, feeds), c.outputs)


def value_and_grad(b: Backend, g, wrt, mode: str, feeds: Feeds, value: bool = True):
    """(value, {wrt input: gradient}) of a graph with exactly one scalar float output;
    the output's name is `scalar_output(compiled.outputs)`. Without `value` (`grad`),
    the value is None and a backend need not compute what only it needs."""
    if single_mode(mode) == REVERSE:
        c = b.compile(g, (REVERSE,), wrt_tuple(wrt), True)
        picked = c.memo.get("value_and_grad")
        if picked is None:  # (the value's name, [(wrt input, its gradient's name)], those)
            grads = [(x, names.grad(x)) for x in names.bases(c.outputs, names.GRAD)]
            picked = c.memo["value_and_grad"] = (scalar_output(c.outputs), grads,
                                                 tuple(k for _, k in grads))
        name, grads, wanted = picked
        out = b.run(c, feeds) if value else b.run(c, feeds, wanted)
        return (out[name] if value else None), {x: out[k] for x, k in grads}
    c = bound(b.compile(g, (FORWARD,), wrt_tuple(wrt), False), feeds)
    name = scalar_output(c.outputs)
    xs = names.bases(c.inputs, names.TANGENT)
    seeds = [names.tangent(x) for x in xs]
    grads = {x: zeros(c.inputs[s]) for x, s in zip(xs, seeds)}
    sweeps = _sweeps(b, c, feeds, seeds)
    if not sweeps:  # every wrt input is empty: just evaluate
        value = b.run(c, {**feeds, **{s: zeros(c.inputs[s]) for s in seeds}})[name]
        return value, grads
    for seed, e, out in sweeps:
        grads[names.parse(seed).base].reshape(-1)[e] = out[names.tangent(name)]
    return sweeps[0][2][name], grads


def jvp(b: Backend, g, primals: Feeds, tangents: Feeds):
    """(outputs, {output: J @ tangent}): forward mode along `tangents` (by input name)."""
    c = b.compile(g, (FORWARD,), tuple(tangents), False)
    out = b.run(c, {**primals, **{names.tangent(k): v for k, v in tangents.items()}})
    return split(out, c, names.TANGENT)


def vjp(b: Backend, g, primals: Feeds, cotangents: Feeds, wrt=None):
    """(outputs, {wrt input: J^T @ cotangent}); missing output cotangents are zero."""
    c = bound(b.compile(g, (REVERSE,), wrt_tuple(wrt), False), primals)
    cts = {k: zeros(v) for k, v in c.inputs.items()
           if (d := names.parse(k)) is not None and d.kind == names.COTANGENT}
    for k, v in cotangents.items():
        if names.cotangent(k) not in cts:
            raise InvalidRequestError(f"no float output named {k!r} to take a cotangent for",
                                      field=f"cotangents.{k}")
        cts[names.cotangent(k)] = v
    return split(b.run(c, {**primals, **cts}), c, names.GRAD)


def _primal_types(b: Backend, g, wrt, feeds: Feeds):
    """({wrt input: type}, {float output: type}, batch width) of `g` at the sizes of
    `feeds`: how many sweeps `_dense` may build into one graph (see BATCHED_NODES)."""
    compiled = b.compile(g, (), None, False)
    c = bound(compiled, feeds)
    names_in = wrt_tuple(wrt) or tuple(k for k, t in c.inputs.items() if dtypes.is_float(t[0]))
    for x in names_in:
        if x not in c.inputs:
            raise InvalidRequestError(f"no input named {x!r} (inputs: {', '.join(c.inputs)})",
                                      field=f"wrt.{x}")
    outs = {k: t for k, t in c.outputs.items() if names.is_primal(k) and dtypes.is_float(t[0])}
    nodes = getattr(compiled.graph, "total_nodes", None)
    width = (1 if c is not compiled or not nodes  # symbolic sizes; a graph we cannot see
             else min(MAX_SWEEPS_IN_ONE_GRAPH, BATCHED_NODES // nodes))
    return {x: c.inputs[x] for x in names_in}, outs, width if width >= 4 else 1


# Vector mode builds k sweeps as passes over one graph: that graph is about k times the
# size of one sweep's, and compiling it costs as much. Batches are as wide as keeps it
# under this many nodes of the original graph times k (a 20-node Rosenbrock: 32 at once,
# 1.7x faster; a 2,000-node scalar graph: one at a time — 30 at once took 14 s to
# compile; batches narrower than 4 do not pay for their compile).
BATCHED_NODES = 4096


def _dense(b: Backend, g, wrt, mode: str, feeds: Feeds, seed_sigs, out_blocks,
           width: int) -> np.ndarray:
    """(out elements × seed elements): a sweep per basis direction of the `seed_sigs`
    blocks, as compressed sweeps with one-hot seeds — `width` of them in one evaluation
    (vector mode: the primal computed once per batch); width 1: one evaluation per
    direction (a graph with symbolic sizes: batches shaped by the size would compile
    once per size)."""
    n = sum(size(sig) for sig in seed_sigs.values())
    m = sum(size(sig) for sig in out_blocks.values())
    step = n if width == 1 else width
    cols = []
    for start in range(0, n, max(step, 1)):
        k = min(step, n - start)
        seeds = np.zeros((k, n))
        seeds[np.arange(k), start + np.arange(k)] = 1.0
        cols.append(_compressed(b, g, wrt, mode, feeds, seeds, seed_sigs, out_blocks,
                                batch=width > 1))
    return np.concatenate(cols, axis=1) if cols else np.zeros((m, 0))


def _blocks(matrix: np.ndarray, rows, cols) -> dict[str, dict[str, np.ndarray]]:
    """{row block: {col block: its part of `matrix`, shaped row.shape + col.shape}}."""
    ro, co = offsets(rows), offsets(cols)
    return {r: {c: matrix[a:b, e:f].reshape(tuple(rows[r][1]) + tuple(cols[c][1]))
                   .astype(dtypes.to_numpy(rows[r][0]), copy=False)
                for c, (e, f) in co.items()} for r, (a, b) in ro.items()}


def jacobian(b: Backend, g, wrt, mode: str | None,
             feeds: Feeds) -> dict[str, dict[str, np.ndarray]]:
    """{output: {input: array of shape output.shape + input.shape}} (float outputs): one
    JVP per input element (forward) or one VJP per output element (reverse), batched in
    vector mode; `mode` None: the one with fewer sweeps."""
    ins, outs, width = _primal_types(b, g, wrt, feeds)
    if not outs:
        raise InvalidRequestError("the graph has no float output to differentiate",
                                  field="outputs")
    n_in, n_out = (sum(size(t) for t in d.values()) for d in (ins, outs))
    mode = (FORWARD if n_in < n_out else REVERSE) if mode is None else single_mode(mode)
    wrt = tuple(ins)
    if mode == FORWARD:
        matrix = _dense(b, g, wrt, FORWARD, feeds, ins, outs, width)
    else:
        matrix = _dense(b, g, wrt, REVERSE, feeds, outs, ins, width).T
    return _blocks(matrix, outs, ins)


def hessian(b: Backend, g, wrt, feeds: Feeds) -> dict[str, dict[str, np.ndarray]]:
    """{x_i: {x_j: d2f/dx_i dx_j of shape x_i.shape + x_j.shape}}: one Hessian-vector
    product (forward over reverse) per input element, batched in vector mode."""
    ins, outs, width = _primal_types(b, g, wrt, feeds)
    scalar_output(outs, primal_only=False)
    return _blocks(_dense(b, g, tuple(ins), "hvp", feeds, ins, ins, width), ins, ins)


def split(out: Mapping[str, Any], c: Compiled, kind: str):
    """(primal outputs, {base: value} of the first-pass outputs of `kind`)."""
    out = ordered(out, c.outputs)
    primal = {k: v for k, v in out.items() if names.is_primal(k)}
    return primal, {base: out[names.derived(kind, base)] for base in names.bases(out, kind)}


# -- sparse derivatives ---------------------------------------------------------------
def sparsity(b: Backend, g, wrt, kind: str = JACOBIAN) -> Sparsity:
    """The pattern (no values) and colorings of the Jacobian or Hessian of `g`."""
    return b.sparsity(g, kind, wrt_tuple(wrt))


def _split(vector: np.ndarray, sigs: Mapping[str, TypeSig], name) -> dict[str, np.ndarray]:
    """A flat vector over the blocks `sigs` as feeds {name(block): array of its type}."""
    return {name(k): vector[a:b].reshape(sigs[k][1]).astype(dtypes.to_numpy(sigs[k][0]))
            for k, (a, b) in offsets(sigs).items()}


def _joined(out: Mapping[str, np.ndarray], blocks, name) -> np.ndarray:
    """The outputs {name(block)} flattened and concatenated in the order of `blocks`."""
    parts = [np.ravel(out[name(k)]) for k in blocks]
    return np.concatenate(parts) if parts else np.zeros(0)


# (seed input name, output name) of pass k of each kind of compressed sweep
SWEEP_NAMES = {
    FORWARD: (names.tangent, names.tangent),
    REVERSE: (names.cotangent, names.grad),
    "hvp": (names.tangent, lambda x, k: names.tangent(names.grad(x), k)),
}
SWEEP_COMPILE = {FORWARD: ((FORWARD,), False), REVERSE: ((REVERSE,), False),
                 "hvp": ((REVERSE, FORWARD), True)}
MAX_SWEEPS_IN_ONE_GRAPH = 32  # more colors: one evaluation per color instead


def _pass_names(mode: str, k: int):
    seed, out = SWEEP_NAMES[mode]
    return (lambda x: seed(x, k)), (lambda x: out(x, k))


def _compressed(b: Backend, g, wrt, mode: str, feeds: Feeds, seeds: np.ndarray,
                seed_sigs, out_blocks, batch: bool = True) -> np.ndarray:
    """(length of `out_blocks` × colors): the compressed sweeps of `mode` ("forward",
    "reverse", "hvp"), one per seed row. A backend that can (`compile_sweeps`) builds
    all of them as passes over one primal graph and evaluates it once (vector mode: the
    primal computed once); otherwise (or not `batch`) one evaluation per color."""
    k = len(seeds)
    if not k:
        return np.zeros((sum(size(sig) for sig in out_blocks.values()), 0))
    first = 2 if mode == "hvp" else 1
    batched = getattr(b, "compile_sweeps", None) if batch else None
    c = (batched(g, mode, wrt_tuple(wrt), k)
         if batched is not None and 1 < k <= MAX_SWEEPS_IN_ONE_GRAPH else None)
    if c is not None:
        run = dict(feeds)
        for i, row in enumerate(seeds):
            run.update(_split(row, seed_sigs, _pass_names(mode, first + i)[0]))
        out = b.run(c, run)
        cols = [_joined(out, out_blocks, _pass_names(mode, first + i)[1]) for i in range(k)]
    else:
        modes, seeded = SWEEP_COMPILE[mode]
        c = b.compile(g, modes, wrt_tuple(wrt), seeded)
        seed_name, out_name = _pass_names(mode, first)
        outs = b.run_many(c, [{**feeds, **_split(row, seed_sigs, seed_name)} for row in seeds])
        cols = [_joined(o, out_blocks, out_name) for o in outs]
    return np.stack(cols, axis=1)


def sparse_jacobian_matrix(b: Backend, g, wrt, mode: str | None,
                           feeds: Feeds) -> tuple[Sparsity, Any]:
    """(sparsity, the Jacobian as one CSR matrix: the float outputs' elements × the wrt
    inputs' elements): one JVP per column color (forward) or one VJP per row color
    (reverse); `mode` None: the one with fewer colors."""
    s = b.sparsity(g, JACOBIAN, wrt_tuple(wrt))
    mode = s.mode if mode is None else single_mode(mode)
    if mode == FORWARD:
        comp = _compressed(b, g, wrt, FORWARD, feeds, s.seeds(FORWARD), s.cols, s.rows)
    else:
        comp = _compressed(b, g, wrt, REVERSE, feeds, s.seeds(REVERSE), s.rows, s.cols).T
    return s, s.recover(mode, comp)


def sparse_jacobian(b: Backend, g, wrt, mode: str | None, feeds: Feeds):
    """{output: {input: CSR matrix (output.size × input.size)}} of the float outputs."""
    s, m = sparse_jacobian_matrix(b, g, wrt, mode, feeds)
    return s.blocks(m)


def _hvps(b: Backend, g, wrt, feeds: Feeds, coloring: str) -> tuple[Sparsity, np.ndarray]:
    """(Hessian sparsity, H·S): one Hessian-vector product per color of `coloring`."""
    s = b.sparsity(g, HESSIAN, wrt_tuple(wrt))
    return s, _compressed(b, g, wrt, "hvp", feeds, s.seeds(coloring), s.cols, s.cols)


def sparse_hessian_matrix(b: Backend, g, wrt, feeds: Feeds) -> tuple[Sparsity, Any]:
    """(sparsity, the Hessian as one CSR matrix over the wrt inputs' elements): one
    Hessian-vector product per color of the star coloring."""
    s, comp = _hvps(b, g, wrt, feeds, STAR)
    return s, s.recover(STAR, comp)


def sparse_hessian(b: Backend, g, wrt, feeds: Feeds):
    """{x_i: {x_j: CSR matrix (x_i.size × x_j.size)}} of the one scalar float output."""
    s, m = sparse_hessian_matrix(b, g, wrt, feeds)
    return s.blocks(m)


def hessian_diag(b: Backend, g, wrt, feeds: Feeds) -> dict[str, np.ndarray]:
    """{x: the diagonal of d2f/dx2, of x's shape}: exact for any Hessian, one
    Hessian-vector product per color of a distance-1 coloring of its pattern (a dense
    Hessian needs one per element)."""
    s, comp = _hvps(b, g, wrt, feeds, DIAGONAL)
    d = s.diagonal(comp)
    return {x: d[a:e].reshape(s.cols[x][1]).astype(dtypes.to_numpy(s.cols[x][0]))
            for x, (a, e) in offsets(s.cols).items()}
