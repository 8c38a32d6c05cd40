"""Numerical derivative checks that do not trust our own rules.

- JVP against central finite differences in a random direction;
- the inner-product identity <u, J v> == <J^T u, v> between forward and reverse mode;
- at order 2: forward-over-reverse Hessian-vector products against finite differences
  of the reverse gradient, and three second-order compositions (fwd-over-rev,
  rev-over-rev, fwd-over-fwd) against each other through inner-product identities.
"""

from __future__ import annotations

import numpy as np

H = 1e-6


def _vdot(a: dict, b: dict) -> float:
    return float(sum(np.vdot(np.asarray(a[k], float), np.asarray(b[k], float)) for k in a))


def _shift(feeds, direction, h):
    return {k: (v + h * direction[k] if k in direction else v) for k, v in feeds.items()}


def _close(actual, expected, what, rtol=1e-5, atol=1e-6):
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def random_like(feeds: dict, rng) -> dict:
    return {k: rng.standard_normal(np.shape(v)) for k, v in feeds.items()}


def float_names(feeds):
    return [k for k, v in feeds.items() if np.asarray(v).dtype.kind == "f"]


def check_first_order(c, g, feeds, rng, f_numpy=None):
    """JVP vs central differences; <u, Jv> == <J^T u, v>."""
    wrt = float_names(feeds)
    v = random_like({k: feeds[k] for k in wrt}, rng)
    out, tan = c.jvp(g, feeds, v)
    f = f_numpy or (lambda fd: c.evaluate(g, fd))
    plus, minus = f(_shift(feeds, v, H)), f(_shift(feeds, v, -H))
    floats = [k for k in out if np.asarray(out[k]).dtype.kind == "f"]
    assert set(tan) == set(floats)
    for k in floats:
        _close(tan[k], (np.asarray(plus[k]) - np.asarray(minus[k])) / (2 * H), f"JVP of {k}")
    u = random_like({k: out[k] for k in floats}, rng)
    _, grads = c.vjp(g, feeds, u, wrt=wrt)
    lhs, rhs = _vdot(u, tan), _vdot(grads, v)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-9,
                               err_msg="<u, J v> != <J^T u, v>")


def check_second_order(c, g, feeds, rng, grad_numpy=None):
    """Order 2 for s(x) = <u, f(x)>: H v by fwd-over-rev vs FD of the reverse gradient,
    and <w, H v> equal by fwd-over-rev, rev-over-rev and fwd-over-fwd."""
    wrt = float_names(feeds)
    out = c.evaluate(g, feeds)
    floats = [k for k in out if np.asarray(out[k]).dtype.kind == "f"]
    u = random_like({k: out[k] for k in floats}, rng)
    v = random_like({k: feeds[k] for k in wrt}, rng)
    w = random_like({k: feeds[k] for k in wrt}, rng)
    cts = {f"cotangent:{k}": u[k] for k in floats}

    fr = c.differentiate(g, ("reverse", "forward"), wrt=wrt)
    hv = c.evaluate(fr, {**feeds, **cts, **{f"tangent2:{k}": v[k] for k in wrt}})
    hv = {k: hv[f"tangent2:grad:{k}"] for k in wrt}

    def grad_s(fd):
        return grad_numpy(fd, u) if grad_numpy else c.vjp(g, fd, u, wrt=wrt)[1]

    gp, gm = grad_s(_shift(feeds, v, H)), grad_s(_shift(feeds, v, -H))
    for k in wrt:
        _close(hv[k], (gp[k] - gm[k]) / (2 * H), f"Hessian-vector product for {k}")

    rr = c.differentiate(g, ("reverse", "reverse"), wrt=wrt)
    hw = c.evaluate(rr, {**feeds, **cts, **{f"cotangent2:grad:{k}": w[k] for k in wrt}})
    hw = {k: hw[f"grad2:{k}"] for k in wrt}

    ff = c.differentiate(g, ("forward", "forward"), wrt=wrt)
    d2 = c.evaluate(ff, {**feeds, **{f"tangent:{k}": v[k] for k in wrt},
                         **{f"tangent2:{k}": w[k] for k in wrt}})
    d2 = {k: d2[f"tangent2:tangent:{k}"] for k in floats}

    a, b, cc = _vdot(w, hv), _vdot(hw, v), _vdot(u, d2)
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8, err_msg="<w,Hv> != <Hw,v>")
    np.testing.assert_allclose(a, cc, rtol=1e-8, atol=1e-8,
                               err_msg="fwd-over-rev != fwd-over-fwd")


def fd_grad(c, g, feeds, wrt=None, out="out"):
    """{input: d out/d input} by central differences of `c`'s evaluation, element by
    element (`wrt` None: every feed)."""
    grads = {}
    for k in (list(feeds) if wrt is None else wrt):
        x = np.asarray(feeds[k], float)
        gk = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = H
            plus = c.evaluate(g, {**feeds, k: x + e})[out]
            minus = c.evaluate(g, {**feeds, k: x - e})[out]
            gk[idx] = (plus - minus) / (2 * H)
        grads[k] = gk
    return grads


def fd_hessian(c, g, feeds, wrt):
    """{a: {b: d(grad a)/db}} by central differences of `c`'s reverse gradient."""
    hess = {a: {} for a in wrt}
    for b in wrt:
        x = np.asarray(feeds[b], float)
        cols = {a: np.zeros(np.shape(feeds[a]) + x.shape) for a in wrt}
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = H
            gp = c.grad(g, inputs={**feeds, b: x + e})
            gm = c.grad(g, inputs={**feeds, b: x - e})
            for a in wrt:
                cols[a][(...,) + idx] = (gp[a] - gm[a]) / (2 * H)
        for a in wrt:
            hess[a][b] = cols[a]
    return hess
