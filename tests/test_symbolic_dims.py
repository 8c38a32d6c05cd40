"""Symbolic dimensions (`adsvc.f64("n", 3)`): shape rules computing with `Dim`
polynomials, graphs differentiated once and evaluated at any size (values, gradients in
both modes, JVPs and Hessians equal the same program traced with concrete shapes and
central finite differences), the in-process cache holding one entry per mode for every
size, typed errors naming the symbol / input / binding, the wire form (IR version 2,
TensorType.symbols, IntList.symbols, AttrValue.dim) and the gRPC server and SDK
(compiled once for all sizes, limits checked at the bound sizes)."""

from __future__ import annotations

import importlib

import grpc
import numpy as np
import pytest
from derivcheck import check_first_order, check_second_order, fd_grad, fd_hessian
from service_fixtures import F64, channel, hand_graph, running_server, stub

import adsvc
from adsvc.errors import (
    AdsvcError,
    AttributeError_,
    InputError,
    InvalidGraphError,
    InvalidRequestError,
    LimitExceededError,
    ShapeError,
    VersionError,
)
from adsvc.runtime.plan import SymbolicPlan
from adsvc.server.config import ServerConfig
from adsvc_protocol.dims import Dim, bind
from adsvc_protocol.proto import ir_pb2
from adsvc_protocol.proto import service_pb2 as S
from adsvc_protocol.tensors import from_tensor, to_tensor

f64, i64 = adsvc.f64, adsvc.i64
plan_module = importlib.import_module("adsvc.runtime.plan")  # where clients compile
N, M = Dim.symbol("n"), Dim.symbol("m")
H = 1e-6
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def close(actual, expected, what, rtol=1e-7, atol=1e-8):
    """assert_allclose with an absolute tolerance scaled by the expected magnitude."""
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def out_shape(g, name="out"):
    return g.output(name).shape


# =====================================================================================
# 1. shape rules on symbols
# =====================================================================================
def _outer(x):
    n = x.shape[0]
    return adsvc.reshape(x, (n, 1)) * adsvc.reshape(x, (1, n))


def _scan_ys(xs):
    return adsvc.scan(lambda c, x: (0.5 * c + adsvc.sin(x), c * x), adsvc.zeros((3,)), xs)[1]


def _np_scan_ys(xs):
    c, ys = np.zeros(3), []
    for x in xs:
        ys.append(c * x)
        c = 0.5 * c + np.sin(x)
    return np.array(ys).reshape(len(xs), 3)


IDX = np.array([2, 0, 1, 1])

# name: (fn, specs, expected symbolic shape, numpy reference, {input: shape at size k})
SHAPE_CASES = {
    "broadcast n with 1": (lambda x, y: x + y, dict(x=f64("n", 3), y=f64(1, 3)), (N, 3),
                           lambda x, y: x + y, lambda k: dict(x=(k, 3), y=(1, 3))),
    "broadcast n with n": (lambda x, y: x * y, dict(x=f64("n", 3), y=f64("n", 3)), (N, 3),
                           lambda x, y: x * y, lambda k: dict(x=(k, 3), y=(k, 3))),
    "broadcast n with [3]": (lambda x, y: x - y, dict(x=f64("n", 3), y=f64(3)), (N, 3),
                             lambda x, y: x - y, lambda k: dict(x=(k, 3), y=(3,))),
    "sum over n": (lambda x: adsvc.sum(x, axes=0), dict(x=f64("n", 3)), (3,),
                   lambda x: x.sum(0), lambda k: dict(x=(k, 3))),
    "sum over 3": (lambda x: adsvc.sum(x, axes=1), dict(x=f64("n", 3)), (N,),
                   lambda x: x.sum(1), lambda k: dict(x=(k, 3))),
    "sum keepdims": (lambda x: adsvc.sum(x, axes=0, keepdims=True), dict(x=f64("n", 3)),
                     (1, 3), lambda x: x.sum(0, keepdims=True), lambda k: dict(x=(k, 3))),
    "mean over n, m": (lambda x: adsvc.mean(x, axes=(0, 2)), dict(x=f64("n", 3, "m")), (3,),
                       lambda x: x.mean((0, 2)), lambda k: dict(x=(k, 3, k + 1))),
    "mean keepdims": (lambda x: adsvc.mean(x, axes=0, keepdims=True), dict(x=f64("n", 3)),
                      (1, 3), lambda x: x.mean(0, keepdims=True), lambda k: dict(x=(k, 3))),
    "max over n": (lambda x: adsvc.max(x, axes=0), dict(x=f64("n", 3)), (3,),
                   lambda x: x.max(0), lambda k: dict(x=(k, 3))),
    "max keepdims over 3": (lambda x: adsvc.max(x, axes=1, keepdims=True),
                            dict(x=f64("n", 3)), (N, 1), lambda x: x.max(1, keepdims=True),
                            lambda k: dict(x=(k, 3))),
    "matmul [n,3]@[3,m]": (lambda x, w: x @ w, dict(x=f64("n", 3), w=f64(3, "m")), (N, M),
                           lambda x, w: x @ w, lambda k: dict(x=(k, 3), w=(3, k + 2))),
    "matmul [n,k]@[k]": (lambda a, v: a @ v, dict(a=f64("n", "k"), v=f64("k")), (N,),
                         lambda a, v: a @ v, lambda k: dict(a=(k, 2), v=(2,))),
    "reshape [n,3]->[-1]": (lambda x: adsvc.reshape(x, (-1,)), dict(x=f64("n", 3)), (3 * N,),
                            lambda x: x.reshape(-1), lambda k: dict(x=(k, 3))),
    "reshape [n,6]->[-1,3]": (lambda x: adsvc.reshape(x, (-1, 3)), dict(x=f64("n", 6)),
                              (2 * N, 3), lambda x: x.reshape(-1, 3),
                              lambda k: dict(x=(k, 6))),
    "reshape [n,m]->[-1]": (lambda x: adsvc.reshape(x, (-1,)) * 2.0, dict(x=f64("n", "m")),
                            (N * M,), lambda x: 2 * x.reshape(-1),
                            lambda k: dict(x=(k, 2))),
    "x[1:]": (lambda x: x[1:], dict(x=f64("n", 3)), (N - 1, 3), lambda x: x[1:],
              lambda k: dict(x=(k, 3))),
    "x[:-1]": (lambda x: x[:-1], dict(x=f64("n", 3)), (N - 1, 3), lambda x: x[:-1],
               lambda k: dict(x=(k, 3))),
    "x[-1]": (lambda x: x[-1], dict(x=f64("n", 3)), (3,), lambda x: x[-1],
              lambda k: dict(x=(k, 3))),
    "x[2:-1]": (lambda x: x[2:-1], dict(x=f64("n", 3)), (N - 3, 3), lambda x: x[2:-1],
                lambda k: dict(x=(k + 3, 3))),
    "slice(x, 2, n - 1)": (lambda x: adsvc.slice(x, (2, 0), (x.shape[0] - 1, 3)),
                           dict(x=f64("n", 3)), (N - 3, 3), lambda x: x[2:-1],
                           lambda k: dict(x=(k + 3, 3))),
    "x[:, 1:]": (lambda x: x[:, 1:], dict(x=f64("n", 3)), (N, 2), lambda x: x[:, 1:],
                 lambda k: dict(x=(k, 3))),
    "concat n, m": (lambda x, y: adsvc.concat([x, y], 0), dict(x=f64("n", 3), y=f64("m", 3)),
                    (N + M, 3), lambda x, y: np.concatenate([x, y]),
                    lambda k: dict(x=(k, 3), y=(k + 2, 3))),
    "roll by concat (n - 1 + 1 == n)": (
        lambda x: x + adsvc.concat([x[1:], x[:1]], 0), dict(x=f64("n", 3)), (N, 3),
        lambda x: x + np.roll(x, -1, axis=0), lambda k: dict(x=(k, 3))),
    "transpose": (lambda x: adsvc.transpose(x, (2, 0, 1)), dict(x=f64("n", 3, "m")),
                  (M, N, 3), lambda x: x.transpose(2, 0, 1), lambda k: dict(x=(k, 3, 2))),
    "x.T": (lambda x: x.T, dict(x=f64("n", 3)), (3, N), lambda x: x.T,
            lambda k: dict(x=(k, 3))),
    "where": (lambda x, y: adsvc.where(x > 0.0, x, y), dict(x=f64("n", 3), y=f64(1, 3)),
              (N, 3), lambda x, y: np.where(x > 0, x, y), lambda k: dict(x=(k, 3), y=(1, 3))),
    "take fixed indices, axis 0": (lambda x: adsvc.take(x, np.array([0, 0]), 0),
                                   dict(x=f64("n", 3)), (2, 3), lambda x: x[[0, 0]],
                                   lambda k: dict(x=(k, 3))),
    "take fixed indices, axis 1": (lambda x: adsvc.take(x, IDX, 1), dict(x=f64("n", 3)),
                                   (N, 4), lambda x: x[:, IDX], lambda k: dict(x=(k, 3))),
    "pad": (lambda x: adsvc.pad(x, (1, 0), (2, 0)), dict(x=f64("n", 3)), (N + 3, 3),
            lambda x: np.pad(x, ((1, 2), (0, 0))), lambda k: dict(x=(k, 3))),
    "pad interior": (lambda x: adsvc.pad(x, (1,), (2,), (1,)), dict(x=f64("n")), (2 * N + 2,),
                     lambda x: np.pad(np.stack([x, np.zeros_like(x)], 1).reshape(-1)[:-1],
                                      (1, 2)), lambda k: dict(x=(k,))),
    "outer product [n]x[n]": (_outer, dict(x=f64("n")), (N, N), lambda x: np.outer(x, x),
                              lambda k: dict(x=(k,))),
    "ones((n, 3))": (lambda x: x + adsvc.ones((x.shape[0], 3)), dict(x=f64("n", 3)), (N, 3),
                     lambda x: x + 1, lambda k: dict(x=(k, 3))),
    "softmax over n": (lambda x: adsvc.softmax(x, axis=0), dict(x=f64("n", 3)), (N, 3),
                       lambda x: np.exp(x) / np.exp(x).sum(0), lambda k: dict(x=(k, 3))),
    "scan over xs [n,3]": (_scan_ys, dict(xs=f64("n", 3)), (N, 3), _np_scan_ys,
                           lambda k: dict(xs=(k, 3))),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_shape_rule_and_values_at_three_sizes(name):
    """The symbolic shape is the expected polynomial; at three sizes the values equal
    numpy's and the result has the shape bound from the polynomial."""
    fn, specs, want, ref, shapes = SHAPE_CASES[name]
    g = adsvc.trace(fn, **specs)
    assert out_shape(g) == want
    assert g.symbolic
    c = adsvc.local()
    rng = np.random.default_rng(7)
    for k in (1, 2, 5):
        feeds = {x: rng.standard_normal(s) for x, s in shapes(k).items()}
        got = c.evaluate(g, feeds)["out"]
        close(got, ref(**feeds), f"{name} at size {k}", rtol=1e-12)
        binding = bind({n.name: (n.dtype, n.shape) for n in g.inputs},
                       {x: v.shape for x, v in feeds.items()})
        assert got.shape == tuple(d.evaluate(binding) if isinstance(d, Dim) else d
                                  for d in want)


REFUSED = {
    "n with m": (lambda x, y: x + y, dict(x=f64("n"), y=f64("m"))),
    "n with 3": (lambda x, y: x + y, dict(x=f64("n"), y=f64(3))),
    "where n with m": (lambda x, b: adsvc.where(b, x, -x), dict(x=f64("n"), b=adsvc.boolean("m"))),
    "matmul 3 != 4": (lambda x, w: x @ w, dict(x=f64("n", 3), w=f64(4, "m"))),
    "matmul k != j": (lambda x, w: x @ w, dict(x=f64("n", "k"), w=f64("j", "m"))),
    "reshape [n,6]->[-1,4]": (lambda x: adsvc.reshape(x, (-1, 4)), dict(x=f64("n", 6))),
    "reshape [n]->[-1,2]": (lambda x: adsvc.reshape(x, (-1, 2)), dict(x=f64("n"))),
    "reshape [n,3]->[n,4]": (lambda x: adsvc.reshape(x, (x.shape[0], 4)), dict(x=f64("n", 3))),
    "concat on axis 1": (lambda x, y: adsvc.concat([x, y], 1), dict(x=f64("n", 3), y=f64("m", 3))),
    "step 2 over n": (lambda x: x[::2], dict(x=f64("n"))),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_shape_rule_refusals_are_shape_errors(name):
    fn, specs = REFUSED[name]
    with pytest.raises(ShapeError) as e:
        adsvc.trace(fn, **specs)
    assert "n" in str(e.value)


def test_slice_past_a_symbolic_end_is_refused_when_traced():
    """stop = n + 1 > n for every n: refused at once (typed), not at evaluation."""
    with pytest.raises(AttributeError_, match="stop"):
        adsvc.trace(lambda x: adsvc.slice(x, (0,), (x.shape[0] + 1,)), x=f64("n"))


def test_python_slice_syntax_with_a_symbolic_bound():
    """x[2:n-1] and x[n-1] with n = x.shape[0] (the numpy idiom) mean what
    adsvc.slice(x, 2, n - 1) and x[-1] mean."""
    g = adsvc.trace(lambda x: x[2:x.shape[0] - 1] * 1.0 + x[x.shape[0] - 1], x=f64("n", 3))
    assert out_shape(g) == (N - 3, 3)
    x = np.arange(21.0).reshape(7, 3)
    close(adsvc.local().evaluate(g, x=x)["out"], x[2:-1] + x[-1], "x[2:n-1] + x[n-1]")


def test_text_form_shows_symbolic_types_and_attributes():
    g = adsvc.trace(lambda x, w: adsvc.sum(adsvc.concat([x @ w, x[1:] @ w], 0)),
                    x=f64("n", 3), w=f64(3, "m"))
    text = g.text()
    assert "x: f64[n,3]" in text and "w: f64[3,m]" in text
    assert "stops=[n,3]" in text and ": f64[n - 1,m]" in text and ": f64[2*n - 1,m]" in text
    assert repr(g.input("x")) == "<Node x float64[n, 3]>"
    s = adsvc.trace(_scan_ys, xs=f64("n", 3))
    st = s.text()
    assert "(f64[3], f64[n,3])" in st
    # a symbolic integer attribute reads like the shapes do ("length=n"), not a repr
    assert "length=n" in st and "Dim(" not in st, st


def test_scan_over_symbolic_length_derivatives():
    """ys and the final carry of a scan over [n,3]; reverse gradient equals the same
    scan traced at a fixed length (n = 0: the carry is the init)."""
    def f(xs, w):
        carry, ys = adsvc.scan(lambda h, x: (adsvc.tanh(h * w + x), adsvc.sum(h * x)),
                               adsvc.zeros((3,)), xs)
        return adsvc.sum(carry ** 2) + adsvc.sum(ys)
    g = adsvc.trace(f, xs=f64("n", 3), w=f64(3))
    c, rng = adsvc.local(), np.random.default_rng(3)
    for k in (0, 1, 6):
        feeds = dict(xs=rng.standard_normal((k, 3)), w=rng.standard_normal(3))
        gc = adsvc.trace(f, xs=f64(k, 3), w=f64(3))
        v, gr = c.value_and_grad(g, **feeds)
        vc, grc = c.value_and_grad(gc, **feeds)
        close(v, vc, f"value at n={k}", rtol=1e-13)
        for x in gr:
            close(gr[x], grc[x], f"grad {x} at n={k}", rtol=1e-12)
    assert float(c.evaluate(g, xs=np.zeros((0, 3)), w=np.ones(3))["out"]) == 0.0


def test_take_along_the_symbolic_axis_differentiates():
    """take(x, fixed indices, axis 0) with x: [n, 3]: its VJP scatters into n rows."""
    def f(x):
        return adsvc.sum(adsvc.take(x, np.array([0, 2, 0]), 0) ** 2)
    g = adsvc.trace(f, x=f64("n", 3))
    x = np.arange(12.0).reshape(4, 3)
    want = np.zeros_like(x)
    want[0], want[2] = 4 * x[0], 2 * x[2]
    c = adsvc.local()
    close(c.grad(g, mode="forward", x=x)["x"], want, "forward")
    close(c.grad(g, x=x)["x"], want, "reverse")


def test_take_with_symbolic_index_count_and_its_gradient():
    """An embedding lookup: table [4, 3], indices [m]: out [m, 3]; the gradient of the
    table counts each row's uses."""
    g = adsvc.trace(lambda t, i: adsvc.sum(adsvc.take(t, i, 0)), t=f64(4, 3), i=i64("m"))
    assert g.output("out").shape == ()
    c = adsvc.local()
    for idx in ([3], [0, 0, 1], [2, 2, 2, 2, 0]):
        idx = np.array(idx)
        grad = c.grad(g, wrt=["t"], t=np.ones((4, 3)), i=idx)["t"]
        close(grad, np.bincount(idx, minlength=4)[:, None] * np.ones((1, 3)), f"{idx}")


# =====================================================================================
# 2. compile once, evaluate at several sizes
# =====================================================================================
def _mlp(x, w, b, y):
    return adsvc.mean((adsvc.tanh(x @ w + b) - y) ** 2)


def _lsq(A, x, b):
    return adsvc.sum((A @ x - b) ** 2)


def _scan_prog(xs, w):
    carry, ys = adsvc.scan(lambda h, x: (adsvc.tanh(h * w + x), adsvc.sum(h * x)),
                           adsvc.zeros((3,)), xs)
    return adsvc.sum(carry ** 2) + adsvc.sum(ys)


def _fdiff(x):
    return adsvc.sum((x[1:] - x[:-1]) ** 2 * adsvc.cos(x[1:]))


# name: (fn, symbolic specs, shapes at size k, Hessian wrt, sizes)
PROGRAMS = {
    "mlp": (_mlp, dict(x=f64("n", 3), w=f64(3, 2), b=f64(2), y=f64("n", 2)),
            lambda k: dict(x=(k, 3), w=(3, 2), b=(2,), y=(k, 2)), ["w", "b"], (1, 4, 9)),
    "lsq": (_lsq, dict(A=f64("n", "k"), x=f64("k"), b=f64("n")),
            lambda k: dict(A=(k, 3), x=(3,), b=(k,)), ["x", "b"], (0, 1, 4, 9)),
    "scan": (_scan_prog, dict(xs=f64("n", 3), w=f64(3)),
             lambda k: dict(xs=(k, 3), w=(3,)), ["xs", "w"], (0, 1, 4, 9)),
    "fdiff": (_fdiff, dict(x=f64("n", 2)), lambda k: dict(x=(k, 2)), ["x"], (1, 4, 9)),
}
PROGRAM_SIZES = [(p, k) for p, v in PROGRAMS.items() for k in v[4]]


def _feeds(prog, k, seed=0):
    rng = np.random.default_rng(seed + 100 * k)
    return {x: rng.standard_normal(s) * 0.7 for x, s in PROGRAMS[prog][2](k).items()}


def _concrete(prog, k):
    fn, _, shapes = PROGRAMS[prog][:3]
    return adsvc.trace(fn, **{x: f64(*s) for x, s in shapes(k).items()})


def _symbolic(prog):
    fn, specs = PROGRAMS[prog][:2]
    return adsvc.trace(fn, **specs)


@pytest.mark.parametrize("prog,k", PROGRAM_SIZES)
def test_program_equals_concrete_trace_and_finite_differences(prog, k):
    g, gc = _symbolic(prog), _concrete(prog, k)
    feeds, c = _feeds(prog, k), adsvc.local()
    v, grad = c.value_and_grad(g, **feeds)
    vc, gradc = c.value_and_grad(gc, **feeds)
    vf, gradf = c.value_and_grad(g, mode="forward", **feeds)
    close(v, vc, "value", rtol=1e-13)
    close(vf, vc, "value (forward)", rtol=1e-13)
    fd = fd_grad(c, g, feeds)
    for x in feeds:
        close(grad[x], gradc[x], f"reverse grad {x}", rtol=1e-12)
        close(gradf[x], gradc[x], f"forward grad {x}", rtol=1e-12)
        close(grad[x], fd[x], f"grad {x} vs central differences", rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(k)
    t = {x: rng.standard_normal(np.shape(a)) for x, a in feeds.items()}
    _, jv = c.jvp(g, feeds, t)
    _, jvc = c.jvp(gc, feeds, t)
    close(jv["out"], jvc["out"], "jvp", rtol=1e-12)
    close(jv["out"], sum(np.vdot(grad[x], t[x]) for x in feeds), "jvp = <grad, t>")
    wrt = PROGRAMS[prog][3]
    hs, hc = c.hessian(g, wrt=wrt, **feeds), c.hessian(gc, wrt=wrt, **feeds)
    for a in wrt:
        for b in wrt:
            close(hs[a][b], hc[a][b], f"hessian {a},{b}", rtol=1e-12)
            sa, sb = feeds[a].size, feeds[b].size
            close(hs[a][b].reshape(sa, sb), hs[b][a].reshape(sb, sa).T, f"symmetric {a},{b}")
    fdh = fd_hessian(c, g, feeds, wrt)
    for a in wrt:
        for b in wrt:
            close(hs[a][b], fdh[a][b], f"hessian {a},{b} vs central differences", rtol=1e-5,
                  atol=1e-6)


@pytest.mark.parametrize("prog", list(PROGRAMS))
def test_program_derivative_identities(prog):
    """derivcheck (JVP vs FD, <u,Jv> = <J^T u,v>, Hv vs FD, fwd/rev order 2) at the
    symbolic graph, three sizes, one client."""
    g, c = _symbolic(prog), adsvc.local()
    for k in PROGRAMS[prog][4][-3:]:
        rng = np.random.default_rng(k)
        check_first_order(c, g, _feeds(prog, k), rng)
        check_second_order(c, g, _feeds(prog, k), rng)


@pytest.mark.parametrize("prog", list(PROGRAMS))
def test_local_client_compiles_once_for_every_size(prog, monkeypatch):
    calls = []
    real = plan_module.compile_graph

    def counting(graph, modes, *a, **kw):
        calls.append(tuple(modes))
        return real(graph, modes, *a, **kw)
    monkeypatch.setattr(plan_module, "compile_graph", counting)
    g, c = _symbolic(prog), adsvc.local()
    for k in PROGRAMS[prog][4][-3:]:
        feeds = _feeds(prog, k)
        c.evaluate(g, feeds)
        c.value_and_grad(g, **feeds)
        c.value_and_grad(g, mode="forward", **feeds)
        c.hessian(g, wrt=PROGRAMS[prog][3], **feeds)
    # evaluate, reverse (seeded), forward, forward-over-reverse: one entry each
    assert sorted(calls) == sorted([(), ("reverse",), ("forward",), ("reverse", "forward")])
    assert len(c.cache) == 4
    plans = [item for item, _ in c.cache._items.values()]
    for compiled in plans:
        assert isinstance(compiled.handle, SymbolicPlan)
        assert len(compiled.handle._plans) == 3  # one bound plan per size


def test_differentiated_graph_has_symbolic_types():
    g = adsvc.trace(lambda x, w: adsvc.mean(adsvc.tanh(x @ w)), x=f64("n", 3), w=f64(3, 2))
    rev = adsvc.differentiate(g, "reverse")
    assert rev.input("x").shape == (N, 3)
    assert rev.output("grad:x").shape == (N, 3)
    assert rev.output("grad:w").shape == (3, 2)
    assert rev.symbolic
    fwd = adsvc.differentiate(g, "forward")
    assert fwd.input("tangent:x").shape == (N, 3)
    fr = adsvc.differentiate(g, ("reverse", "forward"))
    assert fr.input("tangent2:x").shape == (N, 3)
    assert fr.output("tangent2:grad:x").shape == (N, 3)
    # specializing the symbolic derivative gives the derivative of the concrete trace
    gc = adsvc.trace(lambda x, w: adsvc.mean(adsvc.tanh(x @ w)), x=f64(5, 3), w=f64(3, 2))
    assert adsvc.specialize(rev, n=5).key == adsvc.differentiate(gc, "reverse").key
    assert not adsvc.specialize(rev, n=5).symbolic


def test_mean_gradient_counts_the_symbolic_axis_at_run_time():
    g = adsvc.trace(lambda x: adsvc.sum(adsvc.mean(x, axes=0) * np.arange(1.0, 4.0)),
                    x=f64("n", 3))
    c = adsvc.local()
    for k in (1, 2, 7):
        close(c.grad(g, x=np.ones((k, 3)))["x"], np.tile(np.arange(1.0, 4.0) / k, (k, 1)),
              f"n={k}")


def test_specialize_binds_and_checks_sizes():
    g = _symbolic("mlp")
    s = adsvc.specialize(g, n=4)
    assert s.key == _concrete("mlp", 4).key
    assert adsvc.specialize(s) is s  # nothing symbolic left
    for bad, field in ((dict(), "sizes.n"), (dict(n=4, m=2), "sizes.m"),
                       (dict(n=-1), "sizes.n"), (dict(n=2.0), "sizes.n")):
        with pytest.raises(AdsvcError) as e:
            adsvc.specialize(g, **bad)
        assert e.value.field == field


def test_call_of_a_symbolic_graph_inside_traces():
    g = _symbolic("lsq")
    outer = adsvc.trace(lambda A, x, b: 2.0 * adsvc.call(g, A=A, x=x, b=b)["out"],
                        A=f64("m", 3), x=f64(3), b=f64("m"))
    assert outer.input("A").shape == (M, 3)
    c, feeds = adsvc.local(), _feeds("lsq", 4)
    close(c.evaluate(outer, feeds)["out"], 2 * c.evaluate(g, feeds)["out"], "call")
    close(c.grad(outer, **feeds)["A"], 2 * c.grad(g, **feeds)["A"], "grad through call")


# =====================================================================================
# 3. errors
# =====================================================================================
TWO = adsvc.trace(lambda x, y: adsvc.sum(x * y), x=f64("n", 3), y=f64("n", 3))


def test_feeds_that_disagree_on_n_name_both_inputs_and_n():
    with pytest.raises(InputError) as e:
        adsvc.local().evaluate(TWO, x=np.ones((2, 3)), y=np.ones((4, 3)))
    msg = str(e.value)
    assert "'x'" in msg and "'y'" in msg and "n = 4" in msg and "n = 2" in msg
    assert e.value.field == "inputs.y"


@pytest.mark.parametrize("x,y,field", [
    (np.ones((2, 3, 1)), np.ones((2, 3)), "inputs.x"),  # rank 3 for [n, 3]
    (np.ones(2), np.ones((2, 3)), "inputs.x"),  # rank 1
    (np.ones((2, 3)), np.ones((2, 4)), "inputs.y"),  # the fixed axis
    (np.float64(1.0), np.ones((2, 3)), "inputs.x"),  # a scalar
])
def test_wrong_rank_or_fixed_axis_names_the_input(x, y, field):
    with pytest.raises(InputError) as e:
        adsvc.local().evaluate(TWO, x=x, y=y)
    assert e.value.field == field
    assert "[n, 3]" in str(e.value) or "[2, 3]" in str(e.value)


def test_expression_dims_on_inputs_and_outputs():
    """y: [n + 1] is checked against the n that x binds; it cannot bind n itself."""
    g = adsvc.trace(lambda x, y: adsvc.sum(x) * adsvc.sum(y) + adsvc.sum(adsvc.pad(x, (1,), (0,))),
                    x=f64("n"), y=f64(N + 1))
    assert g.input("y").shape == (N + 1,)
    c = adsvc.local()
    close(c.evaluate(g, x=np.ones(2), y=np.ones(3))["out"], 2 * 3 + 2, "n = 2")
    with pytest.raises(InputError, match=r"n \+ 1.*\[3\]") as e:
        c.evaluate(g, x=np.ones(2), y=np.ones(4))
    assert e.value.field == "inputs.y"
    only = adsvc.trace(lambda y: adsvc.sum(y), y=f64(2 * N))
    with pytest.raises(InputError, match="2\\*n"):
        c.evaluate(only, y=np.ones(4))
    pad = adsvc.trace(lambda x: adsvc.pad(x, (1,), (0,)), x=f64("n"))
    assert out_shape(pad) == (N + 1,)
    assert c.evaluate(pad, x=np.ones(4))["out"].shape == (5,)


def test_slice_out_of_range_only_at_a_small_size():
    g = adsvc.trace(lambda x: adsvc.sum(x[5:] ** 2), x=f64("n", 3))
    c = adsvc.local()
    close(c.evaluate(g, x=np.ones((7, 3)))["out"], 6.0, "n = 7")
    with pytest.raises(AttributeError_) as e:
        c.evaluate(g, x=np.ones((3, 3)))
    msg = str(e.value)
    assert "n = 3" in msg and "slice" in msg and "%1" in msg
    assert e.value.field == "nodes[id=1]"
    with pytest.raises(AttributeError_, match="n = 3"):
        c.value_and_grad(g, x=np.ones((3, 3)))
    close(c.grad(g, x=np.ones((6, 3)))["x"][5], 2 * np.ones(3), "still works at n = 6")


def test_finite_differences_at_n_0_are_refused_naming_the_binding():
    """x[1:] with n = 0: the bounds are not clamped, so the slice is an error at n = 0
    (a typed one, naming the node and the binding) — unlike the concrete trace."""
    with pytest.raises(AttributeError_, match="n = 0"):
        adsvc.local().evaluate(_symbolic("fdiff"), x=np.zeros((0, 2)))
    assert float(adsvc.local().evaluate(_symbolic("fdiff"), x=np.ones((1, 2)))["out"]) == 0.0


def test_reductions_of_an_empty_symbolic_axis():
    g = adsvc.trace(lambda x: adsvc.max(x, axes=0), x=f64("n", 3))
    with pytest.raises(ShapeError, match="n = 0"):
        adsvc.local().evaluate(g, x=np.zeros((0, 3)))
    s = adsvc.trace(lambda x: adsvc.sum(x, axes=0), x=f64("n", 3))
    close(adsvc.local().evaluate(s, x=np.zeros((0, 3)))["out"], np.zeros(3), "sum of none")


def test_symbol_that_no_input_binds():
    """m appears only in an attribute: every evaluation fails with a typed error naming
    m; and a missing input that alone binds m is named too."""
    g = adsvc.trace(lambda x: adsvc.broadcast_to(x, (x.shape[0], M)), x=f64("n", 1))
    assert out_shape(g) == (N, M)
    with pytest.raises(ShapeError, match="'m' is not bound"):
        adsvc.local().evaluate(g, x=np.ones((2, 1)))
    two = adsvc.trace(lambda x, y: adsvc.sum(x) + adsvc.sum(y), x=f64("n"), y=f64("m"))
    with pytest.raises(InputError, match="'m'"):
        adsvc.local().evaluate(two, x=np.ones(2))


def test_bad_symbol_names_are_shape_errors():
    for bad in ("2n", "n+1", "", "n m"):
        with pytest.raises(ShapeError):
            adsvc.f64(bad)


@pytest.mark.parametrize("text", ["1n", "n m", "2 3", "n n", "n +", "2**n", "n/2", "-",
                                  "n*(2)", "n^2", "n.x"])
def test_dim_parse_rejects_bad_text_with_shape_error(text):
    with pytest.raises(ShapeError, match="bad symbolic dimension"):
        Dim.parse(text)


def test_dim_parse_round_trips_str():
    for d in (N, N + 1, 2 * N - 3, N * M, N * N * M - 2 * M + 7, -N):
        assert Dim.parse(str(d)) == d
    assert Dim.parse("n - n") == 0 and Dim.parse("3") == 3


# =====================================================================================
# 4. proto
# =====================================================================================
SYM = adsvc.trace(lambda x, w: adsvc.mean(adsvc.reshape(x, (-1,))) + adsvc.sum(x[1:] @ w),
                  x=f64("n", 3), w=f64(3, "m"))


def _node(p, op):
    return next(n for n in p.nodes if n.op == op)


def test_to_proto_writes_ir_version_2_and_symbols():
    p = adsvc.to_proto(SYM)
    assert p.ir_version == 2 and p.opset_version == 1
    x = next(i for i in p.inputs if i.name == "x")
    assert list(x.type.symbols) == ["n", ""] and list(x.type.dims) == [-1, 3]
    w = next(i for i in p.inputs if i.name == "w")
    assert list(w.type.symbols) == ["", "m"]
    stops = _node(p, "slice").attrs["stops"].ints
    assert list(stops.symbols) == ["n", ""] and list(stops.values) == [-1, 3]
    assert list(_node(p, "reshape").type.symbols) == ["3*n"]
    concrete = adsvc.to_proto(_concrete("mlp", 3))
    assert concrete.ir_version == 1 and not any(i.type.symbols for i in concrete.inputs)


def test_from_proto_round_trip_keeps_the_key():
    for g in (SYM, _symbolic("scan"), adsvc.differentiate(SYM, "reverse"),
              adsvc.differentiate(SYM, ("reverse", "forward")),
              adsvc.differentiate(_symbolic("scan"), "reverse"),
              adsvc.differentiate(_symbolic("scan"), ("reverse", "forward"))):
        back = adsvc.from_proto(adsvc.to_proto(g))
        assert back.key == g.key
        assert back.symbolic
    scan_len = _node(adsvc.to_proto(_symbolic("scan")), "scan").attrs["length"]
    assert scan_len.WhichOneof("value") == "dim" and scan_len.dim == "n"


def test_round_tripped_graph_evaluates_like_the_original():
    back = adsvc.from_proto(adsvc.to_proto(adsvc.differentiate(_symbolic("lsq"), "reverse")))
    c = adsvc.local()
    for k in (1, 4):
        feeds = _feeds("lsq", k)
        out = c.evaluate(back, {**feeds, "cotangent:out": 1.0})
        close(out["grad:A"], c.grad(_symbolic("lsq"), **feeds)["A"], f"n={k}")


def test_ir_version_1_with_input_symbols_is_a_version_error():
    p = adsvc.to_proto(SYM)
    p.ir_version = 1
    with pytest.raises(VersionError) as e:
        adsvc.from_proto(p)
    assert e.value.field == "inputs"


def _ints(values, symbols=()):
    return ir_pb2.AttrValue(ints=ir_pb2.IntList(values=values, symbols=list(symbols)))


def test_ir_version_1_with_attribute_symbols_is_a_version_error():
    """IntList.symbols is IR version 2 (protos/adsvc/v1/ir.proto): a version-1 graph
    that uses it is refused like one with TensorType.symbols."""
    p = hand_graph([(0, "x", [4, 3])], [(1, "slice", [0], {
        "starts": _ints([0, 0]), "stops": _ints([-1, 3], ["n", ""]),
        "steps": _ints([1, 1])})], [("out", 1)], ir_version=1)
    with pytest.raises(VersionError):
        adsvc.from_proto(p)


@pytest.mark.parametrize("bad", ["n +", "2**n", "n/2", "n^2", "-", "x" * 300, "1n", "n m"])
def test_bad_expression_in_tensor_type_symbols(bad):
    p = adsvc.to_proto(SYM)
    p.inputs[0].type.symbols[0] = bad
    with pytest.raises(InvalidGraphError) as e:
        adsvc.from_proto(p)
    assert e.value.field == "inputs[id=0]"


def test_bad_expression_in_intlist_and_dim_attrs_names_the_field():
    p = adsvc.to_proto(SYM)
    sl = _node(p, "slice")
    sid = sl.id
    sl.attrs["stops"].ints.symbols[0] = "n +"
    with pytest.raises(InvalidGraphError) as e:
        adsvc.from_proto(p)
    assert e.value.field == f"nodes[id={sid}].attrs.stops"
    p = adsvc.to_proto(SYM)
    del _node(p, "slice").attrs["stops"].ints.symbols[1]
    with pytest.raises(InvalidGraphError, match="1 symbols for 2"):
        adsvc.from_proto(p)
    ps = adsvc.to_proto(_symbolic("scan"))
    scan = _node(ps, "scan")
    scan.attrs["length"].dim = "2**n"
    with pytest.raises(InvalidGraphError) as e:
        adsvc.from_proto(ps)
    assert e.value.field == f"nodes[id={scan.id}].attrs.length"
    scan.attrs["length"].dim = "m"  # well-formed, but not the leading axis of xs
    with pytest.raises(ShapeError, match="length m"):
        adsvc.from_proto(ps)


# =====================================================================================
# 5. server and SDK
# =====================================================================================
@pytest.fixture(scope="module")
def server():
    with running_server() as (srv, target):
        yield target


@pytest.fixture(scope="module")
def client(server):
    with adsvc.connect(server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def rpc(server):
    with channel(server) as ch:
        yield stub(ch)


@pytest.mark.parametrize("prog", list(PROGRAMS))
def test_remote_equals_local_at_every_size(prog, client):
    g, loc = _symbolic(prog), adsvc.local()
    wrt = PROGRAMS[prog][3]
    for k in PROGRAMS[prog][4]:
        feeds = _feeds(prog, k, seed=5)
        for mode in ("reverse", "forward"):
            v, gr = client.value_and_grad(g, mode=mode, **feeds)
            vl, grl = loc.value_and_grad(g, mode=mode, **feeds)
            close(v, vl, f"{mode} value n={k}", rtol=1e-13)
            for x in grl:
                close(gr[x], grl[x], f"{mode} grad {x} n={k}", rtol=1e-13)
        t = {x: np.ones(np.shape(a)) for x, a in feeds.items()}
        close(client.jvp(g, feeds, t)[1]["out"], loc.jvp(g, feeds, t)[1]["out"], "jvp")
        hr, hl = client.hessian(g, wrt=wrt, **feeds), loc.hessian(g, wrt=wrt, **feeds)
        for a in wrt:
            for b in wrt:
                close(hr[a][b], hl[a][b], f"hessian {a},{b} n={k}", rtol=1e-13)


def test_remote_derivative_identities(client):
    g = _symbolic("mlp")
    for k in (1, 4):
        check_first_order(client, g, _feeds("mlp", k), np.random.default_rng(k))
        check_second_order(client, g, _feeds("mlp", k), np.random.default_rng(k))


FDIFF_VEC = adsvc.trace(lambda x: x[1:] - x[:-1], x=f64("n"))


def _difference_matrix(k):
    return np.eye(k)[1:] - np.eye(k)[:-1]


@pytest.mark.parametrize("remote", [False, True])
def test_jacobian_and_vjp_at_three_sizes(remote, client):
    c = client if remote else adsvc.local()
    for k in (1, 2, 6):
        x = np.linspace(0, 1, k)
        for mode in ("reverse", "forward"):
            jac = c.jacobian(FDIFF_VEC, mode=mode, x=x)["out"]["x"]
            assert jac.shape == (k - 1, k)
            close(jac, _difference_matrix(k), f"{mode} jacobian n={k}")
        u = np.arange(k - 1.0)
        out, ct = c.vjp(FDIFF_VEC, {"x": x}, {"out": u})
        close(out["out"], np.diff(x), f"vjp value n={k}")
        close(ct["x"], _difference_matrix(k).T @ u, f"vjp n={k}")


@pytest.mark.parametrize("remote", [False, True])
def test_sparse_derivatives_need_specialized_graphs(remote, client):
    c = client if remote else adsvc.local()
    with pytest.raises(InvalidRequestError, match="adsvc.specialize"):
        c.jacobian(FDIFF_VEC, sparse=True, x=np.ones(4))
    with pytest.raises(InvalidRequestError, match="specialize"):
        c.hessian_diag(adsvc.trace(lambda x: adsvc.sum(adsvc.sin(x) * x), x=f64("n")),
                       x=np.ones(4))
    jac = c.jacobian(adsvc.specialize(FDIFF_VEC, n=4), sparse=True, x=np.ones(4))
    close(jac["out"]["x"].toarray(), _difference_matrix(4), "specialized sparse jacobian")


def test_remote_expression_dims(client):
    g = adsvc.trace(lambda x, y: adsvc.sum(x) * adsvc.sum(y), x=f64("n"), y=f64(N + 1))
    v, grad = client.value_and_grad(g, x=np.ones(2), y=np.ones(3))
    assert float(v) == 6.0
    close(grad["x"], [3.0, 3.0], "grad x")
    close(grad["y"], [2.0, 2.0, 2.0], "grad y")
    with pytest.raises(InputError, match=r"n \+ 1") as e:
        client.evaluate(g, x=np.ones(2), y=np.ones(4))
    assert e.value.field == "inputs.y"


def test_remote_differentiate_returns_symbolic_types(client):
    rev = client.differentiate(_symbolic("lsq"), "reverse")
    assert rev.input("A").shape == (N, Dim.symbol("k"))
    assert rev.output("grad:b").shape == (N,)


def test_server_compiles_once_for_all_sizes(rpc):
    g = adsvc.trace(_lsq, name="compiled_once", A=f64("n", "k"), x=f64("k"), b=f64("n"))
    p = adsvc.to_proto(g)
    diff = S.Differentiation(modes=[S.MODE_REVERSE], seed=True)
    before = rpc.GetServerInfo(S.GetServerInfoRequest()).stats
    handles, loc = [], adsvc.local()
    for i, k in enumerate((1, 4, 9, 0)):
        r = rpc.Differentiate(S.DifferentiateRequest(graph=p, differentiation=diff,
                                                     omit_graph=True))
        assert r.stats.cache_hit == (i > 0)
        handles.append(r.handle)
        feeds = _feeds("lsq", k)
        e = rpc.Evaluate(S.EvaluateRequest(handle=r.handle,
                                           inputs={x: to_tensor(v) for x, v in feeds.items()}))
        assert e.handle == r.handle
        _, grad = loc.value_and_grad(g, **feeds)
        for x in feeds:
            close(from_tensor(e.outputs[f"grad:{x}"]), grad[x], f"grad:{x} at n={k}")
        gr = rpc.Gradient(S.GradientRequest(graph=p, inputs={x: to_tensor(v)
                                                             for x, v in feeds.items()}))
        assert gr.handle == r.handle
        close(from_tensor(gr.gradients["A"]), grad["A"], f"Gradient A at n={k}")
    assert len(set(handles)) == 1
    after = rpc.GetServerInfo(S.GetServerInfoRequest()).stats
    assert after.cache_misses - before.cache_misses == 1
    assert after.cache_size - before.cache_size == 1
    assert list(r.inputs[0].type.symbols) == ["n", "k"]


def test_sdk_keeps_one_handle_for_all_sizes(server):
    g = adsvc.trace(_lsq, name="sdk_once", A=f64("n", "k"), x=f64("k"), b=f64("n"))
    with adsvc.connect(server, timeout=60) as c:
        for k in (1, 4, 9):
            c.value_and_grad(g, **_feeds("lsq", k))
            c.hessian(g, wrt=["x"], **_feeds("lsq", k))
        # reverse (seeded), forward-over-reverse, and the plain graph (the Hessian reads
        # its input types from it): one entry each for every size
        assert len(c.cache) == 3
        assert c.cache.misses == 3


def test_evaluate_stream_with_different_sizes_per_feed(rpc):
    g = adsvc.trace(lambda x: adsvc.sum(_outer(x)), x=f64("n"))

    def requests():
        yield S.EvaluateStreamRequest(target=S.StreamTarget(graph=adsvc.to_proto(g)))
        for k in (2, 5, 0, 3):
            yield S.EvaluateStreamRequest(feed=S.Feed(inputs={"x": to_tensor(np.arange(k) + 1.0)}))
    got = [float(from_tensor(r.outputs["out"])) for r in rpc.EvaluateStream(requests())]
    assert got == [float(np.arange(1.0, k + 1).sum() ** 2) for k in (2, 5, 0, 3)]


def test_remote_errors_are_typed(client, rpc):
    with pytest.raises(InputError) as e:
        client.evaluate(TWO, x=np.ones((2, 3)), y=np.ones((4, 3)))
    assert "n = 4" in str(e.value) and "'x'" in str(e.value) and e.value.field == "inputs.y"
    with pytest.raises(grpc.RpcError) as e:
        rpc.Evaluate(S.EvaluateRequest(graph=adsvc.to_proto(TWO), inputs={
            "x": to_tensor(np.ones((2, 3))), "y": to_tensor(np.ones((4, 3)))}))
    assert e.value.code() == INVALID and "n = 2" in e.value.details()
    g5 = adsvc.trace(lambda x: adsvc.sum(x[5:]), x=f64("n"))
    with pytest.raises(grpc.RpcError) as e:
        rpc.Evaluate(S.EvaluateRequest(graph=adsvc.to_proto(g5),
                                       inputs={"x": to_tensor(np.ones(3))}))
    assert e.value.code() == INVALID
    assert "n = 3" in e.value.details() and "slice" in e.value.details()
    with pytest.raises(AttributeError_, match="n = 3"):
        client.evaluate(g5, x=np.ones(3))
    assert float(client.evaluate(g5, x=np.ones(8))["out"]) == 3.0


@pytest.mark.parametrize("bad", ["n +", "2**n", "1n", "n m"])
def test_bad_symbols_over_the_wire_are_invalid_argument(rpc, bad):
    p = adsvc.to_proto(_symbolic("fdiff"))
    p.inputs[0].type.symbols[0] = bad
    with pytest.raises(grpc.RpcError) as e:
        rpc.Evaluate(S.EvaluateRequest(graph=p, inputs={"x": to_tensor(np.ones((3, 2)))}))
    assert e.value.code() == INVALID, e.value.details()
    assert "symbolic dimension" in e.value.details()
    # and the server keeps serving
    ok = rpc.Evaluate(S.EvaluateRequest(graph=adsvc.to_proto(_symbolic("fdiff")),
                                        inputs={"x": to_tensor(np.ones((3, 2)))}))
    assert float(from_tensor(ok.outputs["out"])) == 0.0


def test_ir_version_1_symbols_over_the_wire(rpc):
    p = adsvc.to_proto(SYM)
    p.ir_version = 1
    with pytest.raises(grpc.RpcError) as e:
        rpc.Evaluate(S.EvaluateRequest(graph=p))
    assert e.value.code() == INVALID
    assert "VersionError" in e.value.details() and "IR version 2" in e.value.details()


OUTER_SUM = adsvc.trace(lambda x: adsvc.sum(adsvc.sin(_outer(x))), x=f64("n"))
OUTER = adsvc.trace(_outer, x=f64("n"))


def _grad_outer_sum(x):
    m = np.cos(np.outer(x, x))
    return m @ x + m.T @ x


def test_max_tensor_elements_at_the_bound_sizes():
    """The input [n] fits at n = 100; the [n, n] intermediate does not: refused before
    it runs, and the server keeps serving smaller sizes."""
    with running_server(ServerConfig(max_tensor_elements=1000)) as (_, target), \
            adsvc.connect(target, timeout=60) as c, channel(target) as ch:
        x10 = np.linspace(-1, 1, 10)
        v, g = c.value_and_grad(OUTER_SUM, x=x10)
        close(v, np.sin(np.outer(x10, x10)).sum(), "n = 10")
        close(g["x"], _grad_outer_sum(x10), "grad n = 10")
        for k in (100, 10_000):
            with pytest.raises(LimitExceededError, match="limit is 1000"):
                c.value_and_grad(OUTER_SUM, x=np.ones(k))
            with pytest.raises(grpc.RpcError) as e:
                stub(ch).Evaluate(S.EvaluateRequest(graph=adsvc.to_proto(OUTER_SUM),
                                                    inputs={"x": to_tensor(np.ones(k))}))
            assert e.value.code() == EXHAUSTED
        with pytest.raises(LimitExceededError, match="100, 100"):
            c.evaluate(OUTER_SUM, x=np.ones(100))

        def requests():
            yield S.EvaluateStreamRequest(target=S.StreamTarget(graph=adsvc.to_proto(OUTER_SUM)))
            for k in (3, 100, 4):
                yield S.EvaluateStreamRequest(feed=S.Feed(inputs={"x": to_tensor(np.ones(k))}))
        got = []
        with pytest.raises(grpc.RpcError) as e:
            for r in stub(ch).EvaluateStream(requests()):
                got.append(float(from_tensor(r.outputs["out"])))
        assert e.value.code() == EXHAUSTED and "feeds[1]" in e.value.details()
        close(got, [9 * np.sin(1.0)], "the stream's first feed")
        close(c.value_and_grad(OUTER_SUM, x=x10)[1]["x"], _grad_outer_sum(x10), "again")
        close(c.evaluate(OUTER_SUM, x=np.ones(31))["out"], 31 * 31 * np.sin(1.0), "n = 31")


def test_max_eval_bytes_at_the_bound_sizes():
    with running_server(ServerConfig(max_eval_bytes=200_000)) as (_, target), \
            adsvc.connect(target, timeout=60) as c, channel(target) as ch:
        x = np.linspace(0, 1, 20)
        close(c.grad(OUTER_SUM, x=x)["x"], _grad_outer_sum(x), "n = 20")
        with pytest.raises(LimitExceededError, match="max-eval-bytes"):
            c.grad(OUTER_SUM, x=np.ones(400))
        with pytest.raises(grpc.RpcError) as e:
            stub(ch).Evaluate(S.EvaluateRequest(graph=adsvc.to_proto(OUTER_SUM),
                                                inputs={"x": to_tensor(np.ones(400))}))
        assert e.value.code() == EXHAUSTED
        close(c.grad(OUTER_SUM, x=x)["x"], _grad_outer_sum(x), "n = 20 again")


def test_response_size_at_the_bound_sizes():
    with running_server(ServerConfig(max_message_bytes=64 * 1024)) as (_, target), \
            adsvc.connect(target, timeout=60) as c:
        x = np.arange(10.0)
        close(c.evaluate(OUTER, x=x)["out"], np.outer(x, x), "n = 10")
        with pytest.raises(LimitExceededError, match="message limit"):
            c.evaluate(OUTER, x=np.ones(200))  # 320 kB of output from 1.6 kB of input
        close(c.evaluate(OUTER, x=x)["out"], np.outer(x, x), "n = 10 again")


def test_local_max_eval_bytes_at_the_bound_sizes():
    c = adsvc.local(max_eval_bytes=200_000)
    x = np.linspace(0, 1, 20)
    close(c.grad(OUTER_SUM, x=x)["x"], _grad_outer_sum(x), "n = 20")
    with pytest.raises(LimitExceededError, match="max_eval_bytes"):
        c.grad(OUTER_SUM, x=np.ones(400))
    close(c.grad(OUTER_SUM, x=x)["x"], _grad_outer_sum(x), "n = 20 again")


def test_hand_built_symbolic_graph_over_the_wire(rpc):
    """A client writing the wire form by hand: x: f64[n] (dims -1, symbols "n"),
    out = sum(x * x)."""
    p = hand_graph([], [(1, "mul", [0, 0]), (2, "sum", [1])], [("out", 2)], ir_version=2)
    p.inputs.add(id=0, name="x", type=ir_pb2.TensorType(dtype=F64, dims=[-1], symbols=["n"]))
    for k in (0, 3, 7):
        x = np.arange(k, dtype=float)
        r = rpc.Evaluate(S.EvaluateRequest(graph=p, inputs={"x": to_tensor(x)}))
        assert float(from_tensor(r.outputs["out"])) == float(x @ x)


def test_cache_weights_count_the_plans_a_symbolic_graph_keeps():
    from adsvc.runtime.cost import held_bytes
    from adsvc.runtime.plan import SymbolicPlan
    c = adsvc.local()
    sym = adsvc.trace(lambda x: adsvc.sum(x * x), x=f64("n"))
    fixed = adsvc.trace(lambda x: adsvc.sum(x * x), x=f64(4))
    c.evaluate(sym, x=np.ones(3))
    c.evaluate(fixed, x=np.ones(4))
    g_sym = c._compile(sym, (), None, False, None).graph
    assert c.cache.weight[0] == held_bytes(g_sym) * (1 + SymbolicPlan.KEEP) + held_bytes(
        c._compile(fixed, (), None, False, None).graph)
    plan = c._compile(sym, (), None, False, None).handle
    for n in range(1, 3 * SymbolicPlan.KEEP):  # the plans kept stay bounded in count
        c.evaluate(sym, x=np.ones(n))
    assert len(plan._plans) == SymbolicPlan.KEEP
