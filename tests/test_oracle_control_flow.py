"""Loops and branches against an independent AD system (PyTorch autograd), in float64.

Each program is written twice: in adsvc with scan / fori_loop / while_loop / cond, and in
torch with plain Python loops of the same trip count. Gradients (both modes), JVPs,
VJPs and Hessians must agree to rtol 1e-10.

Needs the optional extra: pip install '.[oracle]' (CI installs it in a second step).
"""

import functools
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest

import adsvc as ad

torch = pytest.importorskip("torch", reason="optional oracle extra not installed: "
                            "pip install '.[oracle]'")

RNG = np.random.default_rng(11)
L = ad.local()
RTOL, ATOL = 1e-10, 1e-12


# --- RK4 of Lorenz-96 with a time-dependent forcing, params as inputs (fori_loop) ---
N_RK, DT = 100, 0.01


def _l96_ad(y, f, k, t):
    def roll(v, s):
        return ad.concat([v[-s:], v[:-s]], 0)
    return (roll(y, -1) - roll(y, 2)) * roll(y, 1) - k * y + f * (1.0 + 0.1 * ad.sin(t))


def _l96_t(y, f, k, t):
    return ((torch.roll(y, -1) - torch.roll(y, 2)) * torch.roll(y, 1) - k * y
            + f * (1.0 + 0.1 * np.sin(t)))


def _rk4_step(rhs, y, t):
    k1 = rhs(y, t)
    k2 = rhs(y + 0.5 * DT * k1, t + 0.5 * DT)
    k3 = rhs(y + 0.5 * DT * k2, t + 0.5 * DT)
    k4 = rhs(y + DT * k3, t + DT)
    return y + DT / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def rk4_ad(y0, f, k, checkpoint=None):
    """The Lorenz-96 state after N_RK RK4 steps (a fori_loop; the counter gives the time)."""
    def body(i, y):
        t = ad.cast(i, "float64") * DT
        return _rk4_step(lambda v, s: _l96_ad(v, f, k, s), y, t)
    return ad.fori_loop(0, N_RK, body, y0, checkpoint=checkpoint)


def rk4_t(y0, f, k):
    """rk4_ad in torch: a Python loop of N_RK RK4 steps."""
    y = y0
    for i in range(N_RK):
        y = _rk4_step(lambda v, s: _l96_t(v, f, k, s), y, i * DT)
    return y


# --- Elman RNN over a sequence: xs = the sequence, weights read from the enclosing trace ---
def rnn_ad(xs, h0, wx, wh, b, checkpoint=None):
    """The hidden states of an Elman RNN over `xs` (a scan; weights are captured)."""
    def step(h, x):
        h = ad.tanh(x @ wx + h @ wh + b)
        return h, h
    _, hs = ad.scan(step, h0, xs, checkpoint=checkpoint)
    return hs


def rnn_t(xs, h0, wx, wh, b):
    """rnn_ad in torch: a Python loop over the rows of `xs`."""
    h, hs = h0, []
    for x in xs:
        h = torch.tanh(x @ wx + h @ wh + b)
        hs.append(h)
    return torch.stack(hs)


# --- a projectile with quadratic drag, simulated while it is above the ground ---
SIM_DT, SIM_MAX = 0.02, 500


def _sim_step(state, drag, g, sqrt):
    pos, vel = state
    speed = sqrt(vel[0] * vel[0] + vel[1] * vel[1])
    acc_x = -drag * speed * vel[0]
    acc_y = -drag * speed * vel[1] - g
    vel = vel + SIM_DT * _pair(acc_x, acc_y, sqrt)
    return pos + SIM_DT * vel, vel


def _pair(a, b, sqrt):
    if sqrt is ad.sqrt:
        return ad.concat([ad.reshape(a, (1,)), ad.reshape(b, (1,))], 0)
    return torch.stack([a, b])


def sim_loop_ad(p0, v0, drag, g):
    """(trips, position, velocity) of the projectile when it reaches the ground."""
    def body(c):
        n, pos, vel = c
        pos, vel = _sim_step((pos, vel), drag, g, ad.sqrt)
        return n + 1, pos, vel
    return ad.while_loop(lambda c: c[1][1] > 0.0, body, (0, p0, v0), max_iters=SIM_MAX)


def sim_ad(p0, v0, drag, g):
    """Position and velocity at the ground (a while_loop stopped by the height)."""
    _, pos, vel = sim_loop_ad(p0, v0, drag, g)
    return ad.concat([pos, vel], 0)


def sim_t(p0, v0, drag, g):
    """sim_ad in torch: as many Euler steps as adsvc's while_loop ran."""
    state = (p0, v0)
    for _ in range(_sim_trips()):
        state = _sim_step(state, drag, g, torch.sqrt)
    return torch.cat(state)


# --- piecewise dynamics: a cond inside the scan body, reading the body's row and params ---
def piecewise_ad(z0, xs, w, a):
    """Final state and per-step energies of a scan whose body branches (cond)."""
    def step(z, x):
        z = ad.cond(ad.sum(z * x) > 0.0,
                    lambda u: ad.sin(u * w) + 0.3 * x,
                    lambda u: 0.8 * ad.tanh(u + a * x) - 0.1 * u, z)
        return z, ad.sum(z * z)
    z, ys = ad.scan(step, z0, xs)
    return ad.concat([z, ys], 0)


def _piecewise_step_t(z, x, w, a):
    if float((z * x).sum().detach()) > 0.0:
        return torch.sin(z * w) + 0.3 * x, True
    return 0.8 * torch.tanh(z + a * x) - 0.1 * z, False


def piecewise_t(z0, xs, w, a):
    """piecewise_ad in torch: a Python `if` per step."""
    z, ys = z0, []
    for x in xs:
        z, _ = _piecewise_step_t(z, x, w, a)
        ys.append((z * z).sum())
    return torch.cat([z, torch.stack(ys)])


# --- a scan inside a scan body; the inner body reads the outer carry ---
def nested_ad(h0, xs, w, u):
    """Inner-scan outputs of every block and the final outer carry (scan in scan)."""
    def outer(h, block):
        def inner(g, row):
            g = ad.tanh(g @ w + row * h)
            return g, ad.sum(g * u)
        g, ys = ad.scan(inner, h * u, block)
        return 0.5 * h + ad.sin(g), ys
    h, ys = ad.scan(outer, h0, xs)
    t, k = xs.shape[:2]
    return ad.concat([ad.reshape(ys, (t * k,)), h], 0)


def nested_t(h0, xs, w, u):
    """nested_ad in torch: two nested Python loops."""
    h, out = h0, []
    for block in xs:
        g = h * u
        for row in block:
            g = torch.tanh(g @ w + row * h)
            out.append((g * u).sum())
        h = 0.5 * h + torch.sin(g)
    return torch.cat([torch.stack(out), h])


# --- a grad inside the scan body: gradient descent on an energy with params m, a ---
LR, N_GD = 0.05, 12


def _energy_ad(m, a):
    return lambda q: ad.sum(0.25 * a * q * q * q * q) + ad.sum(ad.cos(q @ m))


def graddesc_ad(q0, m, a):
    """Final point and energies of gradient descent (ad.grad inside the scan body)."""
    def step(q, _):
        q = q - LR * ad.grad(_energy_ad(m, a))(q)
        return q, _energy_ad(m, a)(q)
    q, es = ad.scan(step, q0, length=N_GD)
    return ad.concat([q, es], 0)


def _energy_t(q, m, a):
    return (0.25 * a * q ** 4).sum() + torch.cos(q @ m).sum()


def graddesc_t(q0, m, a):
    """graddesc_ad in torch: autograd.grad with create_graph=True per step."""
    q, es = q0, []
    for _ in range(N_GD):
        if not q.requires_grad:  # q0 not differentiated: the inner grad still needs a graph
            q = q.detach().requires_grad_()
        (gq,) = torch.autograd.grad(_energy_t(q, m, a), q, create_graph=True)
        q = q - LR * gq
        es.append(_energy_t(q, m, a))
    return torch.cat([q, torch.stack(es)])


@dataclass
class Case:
    """One program: its adsvc and torch versions (a vector result) and its inputs."""
    f_ad: object
    f_t: object
    feeds: dict
    hess_wrt: list = field(default_factory=list)  # empty: every input


def _r(*shape, scale=1.0):
    return scale * RNG.standard_normal(shape)


CASES = {
    "rk4_fori_loop": Case(rk4_ad, rk4_t, {"y0": _r(10), "f": np.array(2.5),
                                          "k": 1.0 + 0.2 * _r(10)}),
    "elman_rnn_scan": Case(rnn_ad, rnn_t, {"xs": _r(12, 3), "h0": _r(5, scale=0.5),
                                           "wx": _r(3, 5, scale=0.6),
                                           "wh": _r(5, 5, scale=0.4), "b": _r(5, scale=0.2)}),
    "while_sim": Case(sim_ad, sim_t, {"p0": np.array([0.0, 1.0]), "v0": np.array([3.0, 4.0]),
                                      "drag": np.array(0.15), "g": np.array(9.81)}),
    "cond_in_scan": Case(piecewise_ad, piecewise_t, {"z0": _r(4), "xs": _r(15, 4),
                                                     "w": _r(4), "a": np.array(0.7)}),
    "scan_in_scan": Case(nested_ad, nested_t, {"h0": _r(3), "xs": _r(5, 4, 3),
                                               "w": _r(3, 3, scale=0.5), "u": _r(3)}),
    "grad_in_scan": Case(graddesc_ad, graddesc_t, {"q0": _r(3), "m": _r(3, 3, scale=0.5),
                                                   "a": 1.0 + 0.1 * _r(3)}),
}
# the long RNN whose reverse sweep recomputes segments (7 does not divide 50)
_LONG = {"xs": _r(50, 3), "h0": _r(5, scale=0.5), "wx": _r(3, 5, scale=0.6),
         "wh": _r(5, 5, scale=0.4), "b": _r(5, scale=0.2)}
for _ck in (True, 7):
    CASES[f"rnn_checkpoint_{_ck}"] = Case(functools.partial(rnn_ad, checkpoint=_ck), rnn_t,
                                          _LONG, hess_wrt=["wh", "b", "h0"])
    CASES[f"rk4_checkpoint_{_ck}"] = Case(functools.partial(rk4_ad, checkpoint=_ck), rk4_t,
                                          CASES["rk4_fori_loop"].feeds, hess_wrt=["f", "k"])


@functools.cache
def _sim_trips() -> int:
    """The trip count adsvc's while_loop ran (the counter it carries)."""
    feeds = CASES["while_sim"].feeds
    g = _graph(lambda **kw: sim_loop_ad(**kw)[0], feeds)
    return int(L.evaluate(g, feeds)["out"])


def _graph(fn, feeds, scalar=False):
    def traced(**kw):
        v = fn(**kw)
        return ad.sum(v * ad.cos(v)) if scalar else v
    return ad.trace(traced, **{k: ad.Spec(v.dtype.name, v.shape) for k, v in feeds.items()})


def _loss_t(v):
    return (v * torch.cos(v)).sum()


def _tensors(feeds, grad=True):
    return {k: torch.tensor(v, requires_grad=grad) for k, v in feeds.items()}


def _close(got, want):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_gradient_matches_torch(name, mode):
    """value_and_grad of the scalarized program, both modes, against backward()."""
    c = CASES[name]
    value, grad = L.value_and_grad(_graph(c.f_ad, c.feeds, scalar=True), mode=mode,
                                   inputs=c.feeds)
    ti = _tensors(c.feeds)
    out = _loss_t(c.f_t(**ti))
    out.backward()
    assert value == pytest.approx(out.item(), rel=1e-12)
    for k, t in ti.items():
        _close(grad[k], t.grad)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jvp_and_vjp_match_torch(name):
    """J·v by forward mode against torch's double-backward trick; Jᵀ·u by reverse mode."""
    c = CASES[name]
    g = _graph(c.f_ad, c.feeds)
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # the same draws however run
    tangents = {k: rng.standard_normal(v.shape) for k, v in c.feeds.items()}
    outs, jv = L.jvp(g, c.feeds, tangents)
    ti = _tensors(c.feeds)
    y = c.f_t(**ti)
    _close(outs["out"], y)
    u = torch.zeros_like(y, requires_grad=True)
    vjp_u = torch.autograd.grad(y, list(ti.values()), u, create_graph=True)
    want_jv = torch.autograd.grad(vjp_u, u, [torch.tensor(tangents[k]) for k in ti])[0]
    _close(jv["out"], want_jv)
    cot = rng.standard_normal(y.shape)
    _, vjp = L.vjp(g, c.feeds, {"out": cot})
    want = torch.autograd.grad(y, list(ti.values()), torch.tensor(cot))
    for k, w in zip(ti, want):
        _close(vjp[k], w)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hessian_matches_torch(name):
    """Forward-over-reverse Hessian against torch.autograd.functional.hessian."""
    c = CASES[name]
    wrt = c.hess_wrt or list(c.feeds)
    h = L.hessian(_graph(c.f_ad, c.feeds, scalar=True), wrt=wrt, inputs=c.feeds)
    fixed = _tensors({k: v for k, v in c.feeds.items() if k not in wrt}, grad=False)
    th = torch.autograd.functional.hessian(
        lambda *xs: _loss_t(c.f_t(**dict(zip(wrt, xs)), **fixed)),
        tuple(torch.tensor(c.feeds[k]) for k in wrt))
    for i, a in enumerate(wrt):
        for j, b in enumerate(wrt):
            _close(h[a][b], th[i][j])


def test_while_loop_trip_count_matches_torch():
    """torch's own while loop (same condition) stops after the trips adsvc's counter
    reports, and the stop is not a rounding tie: the height is clearly negative."""
    c = CASES["while_sim"]
    state, n = tuple(torch.tensor(c.feeds[k]) for k in ("p0", "v0")), 0
    drag, g = (torch.tensor(c.feeds[k]) for k in ("drag", "g"))
    while float(state[0][1]) > 0.0 and n < SIM_MAX:
        state, n = _sim_step(state, drag, g, torch.sqrt), n + 1
    assert 20 < n == _sim_trips() < SIM_MAX
    assert float(state[0][1]) < -1e-3


def test_cond_in_scan_takes_both_branches():
    """The piecewise case really switches between its branches along the sequence."""
    c = CASES["cond_in_scan"]
    ti = _tensors(c.feeds, grad=False)
    z, taken = ti["z0"], []
    for x in ti["xs"]:
        z, branch = _piecewise_step_t(z, x, ti["w"], ti["a"])
        taken.append(branch)
    assert 3 <= sum(taken) <= len(taken) - 3


@pytest.mark.parametrize("program, n", [("rnn", 50), ("rk4", N_RK)])
@pytest.mark.parametrize("checkpoint", [True, 7])
def test_checkpointed_cases_store_segments(program, n, checkpoint):
    """The checkpointed cases really recompute: the reverse graph's forward scan keeps
    one carry every k steps (k = ceil(sqrt(n)) for True), not all n."""
    c = CASES[f"{program}_checkpoint_{checkpoint}"]
    d = ad.differentiate(_graph(c.f_ad, c.feeds, scalar=True), "reverse", seed=True)
    forward = [x for x in d.nodes if x.op == "scan" and not x.attr("reverse")]
    k = int(np.ceil(np.sqrt(n))) if checkpoint is True else checkpoint
    assert [x.attr("save") for x in forward] == [k]
    assert forward[0].types[-1][1][0] == -(-n // k)
