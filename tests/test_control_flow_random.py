"""Random scan programs against their hand-unrolled twins.

A seeded generator draws small scan bodies: random elementwise ops from a safe set
over the carries, the xs rows and constants captured from the enclosing trace (vectors,
scalars, a mixing matrix), now and then a cond, an inner fori_loop or an inner grad,
carries in a tuple or a dict nest, ys of several kinds. Each
program is traced twice: as one `adsvc.scan`, and with the same body called in a Python
loop inside the trace. Both must agree in value, reverse gradient, forward JVP and
Hessian (forward over reverse), and a checkpointed scan (True, 3) must give the stored
scan's gradient and Hessian.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest

import adsvc as ad

N_PROGRAMS = 40
RTOL, ATOL = 1e-10, 1e-12
L = ad.local()

# Unary ops: bounded growth (exp only of a tanh); "sum" makes a scalar.
UNARY = {
    "sin": ad.sin,
    "cos": ad.cos,
    "tanh": ad.tanh,
    "exp_tanh": lambda v: ad.exp(ad.tanh(v)),
    "sigmoid": ad.sigmoid,
    "softplus": ad.softplus,
    "square_sin": lambda v: ad.square(ad.sin(v)),
    "neg": lambda v: -v,
    "sum": lambda v: 0.5 * ad.sum(v),
}
# Binary ops (scalars broadcast against vectors); products keep one factor bounded.
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul_tanh": lambda a, b: a * ad.tanh(b),
    "mix": lambda a, b: 0.6 * a + 0.3 * b,
}


def _fit(b, a):
    """`b`, summed to a scalar when `a` is one (so a result keeps `a`'s shape)."""
    return 0.5 * ad.sum(b) if b.ndim > a.ndim else b


# Control flow and transforms nested in the body (they keep the first operand's shape,
# except cond, which broadcasts like the binary ops).
NESTED = {
    "cond": lambda a, b: ad.cond(ad.sum(a) > 0.0, lambda u, v: ad.sin(u) * v,
                                 lambda u, v: u + ad.tanh(v), a, b),
    "loop": lambda a, b: ad.fori_loop(0, 3, lambda i, c: ad.tanh(0.9 * c + _fit(b, c)), a),
    "grad": lambda a, b: ad.grad(lambda u: ad.sum(ad.sin(u) * _fit(b, u)))(a),
}


@dataclass(frozen=True)
class Program:
    """One random scan program (plain data: printed when a check fails)."""
    seed: int
    d: int  # vector size
    length: int
    carries: tuple[bool, ...]  # per carry: a vector (else a scalar)
    xs: tuple[bool, ...]  # per xs: rows are vectors (else scalars)
    consts: tuple[bool, ...]  # captured consts: vector or scalar
    matrix: bool  # a captured (d, d) mixing matrix
    ops: tuple[tuple[str, int, int], ...]  # (op, operand, operand) appended to the pool
    carry_src: tuple[tuple[int, bool], ...]  # per carry: (pool index, passed through)
    ys: tuple[int, ...] | None  # pool indices of y (None: no y)
    nest: str  # "tuple" or "dict" carries


def draw(seed: int) -> Program:
    """A random program: sizes bounded, shapes tracked so every op is well typed."""
    rng = np.random.default_rng(seed)
    carries = tuple(bool(b) for b in rng.random(int(rng.integers(1, 4))) < 0.7)
    xs = tuple(bool(b) for b in rng.random(int(rng.integers(0, 3))) < 0.7)
    consts = tuple(bool(b) for b in rng.random(int(rng.integers(0, 3))) < 0.6)
    matrix = bool(rng.random() < 0.5)
    vec = list(carries + xs + consts)  # the pool's shapes: vector or scalar
    ops = []
    for _ in range(int(rng.integers(2, 10))):
        a, b = (int(i) for i in rng.integers(0, len(vec), 2))
        kind = rng.random()
        if kind < 0.15 and matrix and vec[a]:
            ops.append(("matmul", a, a))
            vec.append(True)
        elif kind < 0.3:
            name = str(rng.choice(sorted(NESTED)))
            ops.append((name, a, b))
            vec.append(vec[a] or (name == "cond" and vec[b]))
        elif kind < 0.6:
            name = str(rng.choice(sorted(UNARY)))
            ops.append((name, a, a))
            vec.append(vec[a] and name != "sum")
        else:
            ops.append((str(rng.choice(sorted(BINARY))), a, b))
            vec.append(vec[a] or vec[b])
    n_raw = len(carries) + len(xs)  # raw carries and rows may pass through unchanged
    carry_src = []
    for v in carries:
        same = [j for j in range(n_raw) if vec[j] == v]
        if rng.random() < 0.25:
            carry_src.append((int(rng.choice(same)), True))
        else:  # the newest values are the likeliest sources: deep bodies
            carry_src.append((int(len(vec) - 1 - rng.integers(0, min(3, len(vec)))), False))
    ys = None if rng.random() < 0.25 else tuple(
        int(j) for j in rng.integers(0, len(vec), int(rng.integers(1, 3))))
    return Program(seed, int(rng.integers(1, 4)), int(rng.integers(1, 11)), carries, xs,
                   consts, matrix, tuple(ops), tuple(carry_src), ys,
                   "dict" if rng.random() < 0.4 else "tuple")


def _pack(leaves: list, nest: str):
    if nest == "tuple":
        return tuple(leaves)
    return {"first": leaves[0], "rest": list(leaves[1:])}


def _unpack(carry, nest: str) -> list:
    return list(carry) if nest == "tuple" else [carry["first"], *carry["rest"]]


def make_body(p: Program, consts: list, matrix):
    """The scan body `(carry, x) -> (carry, y)` of `p`, closing over the enclosing
    trace's `consts` and `matrix`."""
    def body(carry, x):
        cs = _unpack(carry, p.nest)
        rows = [] if x is None else list(x) if isinstance(x, tuple) else [x]
        pool = cs + rows + list(consts)
        for name, a, b in p.ops:
            if name == "matmul":
                pool.append(pool[a] @ matrix)
            elif name in UNARY:
                pool.append(UNARY[name](pool[a]))
            elif name in NESTED:
                pool.append(NESTED[name](pool[a], pool[b]))
            else:
                pool.append(BINARY[name](pool[a], pool[b]))
        new = []
        for c, (j, through) in zip(cs, p.carry_src):
            v = pool[j]
            if not through:
                v = ad.sum(v) / p.d if c.ndim == 0 and v.ndim else v
                v = 0.5 * c + 0.5 * ad.tanh(v)
            new.append(v)
        y = None if p.ys is None else tuple(pool[j] for j in p.ys)
        return _pack(new, p.nest), y[0] if y is not None and len(y) == 1 else y
    return body


def _stack(rows: list):
    return ad.concat([ad.reshape(r, (1, *r.shape)) for r in rows], 0)


def run(p: Program, kw: dict, unrolled: bool, checkpoint=None) -> list:
    """The program's results (final carries, then ys) as a flat list of nodes."""
    init = _pack([kw[f"c{i}"] for i in range(len(p.carries))], p.nest)
    xs = [kw[f"x{i}"] for i in range(len(p.xs))]
    xs_arg = None if not xs else xs[0] if len(xs) == 1 else tuple(xs)
    body = make_body(p, [kw[f"k{i}"] for i in range(len(p.consts))], kw.get("m"))
    if not unrolled:
        final, ys = ad.scan(body, init, xs_arg, length=None if xs else p.length,
                            checkpoint=checkpoint)
        ys = [] if ys is None else list(ys) if isinstance(ys, tuple) else [ys]
        return _unpack(final, p.nest) + ys
    carry, steps = init, []
    for t in range(p.length):
        row = None if not xs else xs[0][t] if len(xs) == 1 else tuple(x[t] for x in xs)
        carry, y = body(carry, row)
        steps.append([] if y is None else list(y) if isinstance(y, tuple) else [y])
    ys = [_stack([s[j] for s in steps]) for j in range(len(steps[0]))]
    return _unpack(carry, p.nest) + ys


def feeds(p: Program) -> dict[str, np.ndarray]:
    """Random inputs of `p` (from its seed)."""
    rng = np.random.default_rng(10_000 + p.seed)

    def shaped(is_vec, lead=()):
        return rng.standard_normal((*lead, p.d) if is_vec else lead)
    out = {f"c{i}": 0.8 * shaped(v) for i, v in enumerate(p.carries)}
    out.update({f"x{i}": shaped(v, (p.length,)) for i, v in enumerate(p.xs)})
    out.update({f"k{i}": shaped(v) for i, v in enumerate(p.consts)})
    if p.matrix:
        out["m"] = rng.standard_normal((p.d, p.d)) / np.sqrt(p.d)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


@functools.cache
def graph(seed: int, unrolled: bool, scalar: bool, checkpoint=None):
    """The traced program: its results as outputs, or one scalar loss of them."""
    p = draw(seed)

    def traced(**kw):
        outs = run(p, kw, unrolled, checkpoint)
        if scalar:
            return sum(ad.sum(o * ad.cos(o) + 0.3 * o) for o in outs)
        return {f"o{i}": o for i, o in enumerate(outs)}
    specs = {k: ad.Spec("float64", v.shape) for k, v in feeds(p).items()}
    return ad.trace(traced, name=f"random{seed}", **specs)


def _close(got: dict, want: dict, p: Program, what: str):
    assert got.keys() == want.keys(), what
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{what} {k} of {p}")


SEEDS = list(range(N_PROGRAMS))


@pytest.mark.parametrize("seed", SEEDS)
def test_value_matches_unrolled(seed):
    """Every result (final carries, ys) of the scan equals the unrolled loop's."""
    p, f = draw(seed), feeds(draw(seed))
    _close(L.evaluate(graph(seed, False, False), f), L.evaluate(graph(seed, True, False), f),
           p, "value")


@pytest.mark.parametrize("seed", SEEDS)
def test_reverse_gradient_matches_unrolled(seed):
    """Reverse-mode gradients of the scalar loss agree."""
    p, f = draw(seed), feeds(draw(seed))
    v1, g1 = L.value_and_grad(graph(seed, False, True), inputs=f)
    v2, g2 = L.value_and_grad(graph(seed, True, True), inputs=f)
    assert v1 == pytest.approx(v2, rel=RTOL)
    _close(g1, g2, p, "gradient")


@pytest.mark.parametrize("seed", SEEDS)
def test_forward_jvp_matches_unrolled(seed):
    """Forward-mode J·v of every result agrees (random tangents)."""
    p, f = draw(seed), feeds(draw(seed))
    rng = np.random.default_rng(20_000 + seed)
    tangents = {k: rng.standard_normal(v.shape) for k, v in f.items()}
    _, t1 = L.jvp(graph(seed, False, False), f, tangents)
    _, t2 = L.jvp(graph(seed, True, False), f, tangents)
    _close(t1, t2, p, "jvp")


def _flat_hessian(h: dict) -> dict:
    return {f"{a}/{b}": v for a, row in h.items() for b, v in row.items()}


@pytest.mark.parametrize("seed", SEEDS)
def test_hessian_matches_unrolled(seed):
    """Hessians (forward over reverse) of the scalar loss agree."""
    p, f = draw(seed), feeds(draw(seed))
    h1 = L.hessian(graph(seed, False, True), inputs=f)
    h2 = L.hessian(graph(seed, True, True), inputs=f)
    _close(_flat_hessian(h1), _flat_hessian(h2), p, "hessian")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("checkpoint", [True, 3])
def test_checkpointed_scan_matches_stored(seed, checkpoint):
    """checkpoint=True / 3 gives the stored scan's gradient (and, for 3, Hessian)."""
    p, f = draw(seed), feeds(draw(seed))
    _, stored = L.value_and_grad(graph(seed, False, True, False), inputs=f)
    _, ck = L.value_and_grad(graph(seed, False, True, checkpoint), inputs=f)
    _close(ck, stored, p, f"checkpoint={checkpoint} gradient")
    if checkpoint == 3:
        _close(_flat_hessian(L.hessian(graph(seed, False, True, 3), inputs=f)),
               _flat_hessian(L.hessian(graph(seed, False, True, False), inputs=f)),
               p, "checkpoint=3 hessian")


def test_generator_covers_the_features():
    """The drawn programs use every op, both nests, no-xs scans, several xs, no y,
    tuple ys, pass-through carries, captured consts and checkpointable lengths."""
    ps = [draw(s) for s in SEEDS]
    used = {name for p in ps for name, _, _ in p.ops}
    assert used >= set(UNARY) | set(BINARY) | set(NESTED) | {"matmul"}
    assert {p.nest for p in ps} == {"tuple", "dict"}
    assert any(not p.xs for p in ps) and any(len(p.xs) == 2 for p in ps)
    assert any(p.ys is None for p in ps) and any(p.ys and len(p.ys) == 2 for p in ps)
    assert any(t for p in ps for _, t in p.carry_src)
    assert any(p.consts for p in ps) and any(p.matrix for p in ps)
    assert any(len(p.carries) == 3 for p in ps) and any(p.length == 1 for p in ps)
    # checkpointing applies from 4 steps on: some programs have a padded last segment
    assert sum(p.length >= 4 and p.length % 3 != 0 for p in ps) >= 10
