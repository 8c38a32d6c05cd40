"""Fit the parameters of an ODE by gradient descent through `adsvc.scan`.

A damped oscillator with unknown stiffness k, damping c and initial displacement x0,

    x'' = -k x - c x',    x(0) = x0,  x'(0) = 0,

is integrated by N = 100 classic Runge-Kutta (RK4) steps of DT = 0.1. One RK4 step is
the body of an `adsvc.scan`, so the traced graph holds one step, not N: its size does
not depend on the step count (checked by tracing 100 and 1000 steps). The loss is the
mean squared difference between the simulated x(t) and noisy observations, which are
made by a separate numpy RK4 from the true parameters k = 4, c = 0.5, x0 = 1.

Plain gradient descent fits (k, c, x0): the gradient comes from
`adsvc.local().value_and_grad` (reverse mode through the scan: a reverse scan over the
stored carries). The graph is compiled once, on the first call, and then evaluated
once per iteration. Checks:

- at the start, the loss equals the numpy loss, and its gradient agrees with central
  finite differences of the numpy loss and with the gradient of the same loss traced
  as a Python loop (100 RK4 steps unrolled into the graph);
- the fitted parameters are those of `scipy.optimize.least_squares` on the numpy
  model (the same minimiser, found without adsvc) and within the noise of the truth;
- the graph (and its gradient graph) has as many nodes for 1000 steps as for 100.

    python examples/ode_fit.py
"""

import sys
import time

import numpy as np
from scipy.optimize import least_squares

import adsvc

N = 100  # RK4 steps
DT = 0.1
TRUE = np.array([4.0, 0.5, 1.0])  # k, c, x0
START = np.array([3.0, 1.0, 0.5])
NOISE = 0.01  # standard deviation of the observation noise
RATE = 2.0
ITERATIONS = 200


# --- the model in adsvc: one RK4 step is the scan body -------------------------------

def rhs(state, p):
    """(x', v') of the oscillator with parameters p = (k, c, x0)."""
    x, v = state
    return v, -p[0] * x - p[1] * v


def rk4_step(state, p):
    """One classic Runge-Kutta step of DT."""
    def shifted(slope, h):
        return tuple(s + h * d for s, d in zip(state, slope))

    k1 = rhs(state, p)
    k2 = rhs(shifted(k1, DT / 2), p)
    k3 = rhs(shifted(k2, DT / 2), p)
    k4 = rhs(shifted(k3, DT), p)
    return tuple(s + DT / 6 * (a + 2 * b + 2 * c + d)
                 for s, a, b, c, d in zip(state, k1, k2, k3, k4))


def make_loss(steps: int, unrolled: bool = False):
    """loss(p, obs): mean squared misfit of x(t_1..t_steps), integrated by a scan (or,
    with `unrolled`, by a Python loop that puts every step into the graph)."""
    def loss(p, obs):
        init = (p[2], adsvc.zeros_like(p[2]))
        if unrolled:
            state, xs = init, []
            for _ in range(steps):
                state = rk4_step(state, p)
                xs.append(adsvc.reshape(state[0], (1,)))
            xs = adsvc.concat(xs, 0)
        else:
            def body(state, _):
                new = rk4_step(state, p)
                return new, new[0]

            _, xs = adsvc.scan(body, init, length=steps)
        r = xs - obs
        return adsvc.mean(r * r)

    return loss


def trace_loss(steps: int, unrolled: bool = False) -> adsvc.Graph:
    """The loss graph for `steps` RK4 steps."""
    return adsvc.trace(make_loss(steps, unrolled), p=adsvc.f64(3), obs=adsvc.f64(steps))


# --- the same model in numpy (independent of adsvc) ----------------------------------

def simulate_np(p: np.ndarray, steps: int = N) -> np.ndarray:
    """x(t_1..t_steps) by numpy RK4."""
    k, c, x0 = p
    a = np.array([[0.0, 1.0], [-k, -c]])  # the ODE is linear: u' = a u
    u, out = np.array([x0, 0.0]), np.empty(steps)
    for i in range(steps):
        s1 = a @ u
        s2 = a @ (u + DT / 2 * s1)
        s3 = a @ (u + DT / 2 * s2)
        s4 = a @ (u + DT * s3)
        u = u + DT / 6 * (s1 + 2 * s2 + 2 * s3 + s4)
        out[i] = u[0]
    return out


def loss_np(p: np.ndarray, obs: np.ndarray) -> float:
    """The loss, by numpy."""
    return float(np.mean((simulate_np(p) - obs) ** 2))


def central_differences(p: np.ndarray, obs: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of the numpy loss."""
    e = np.eye(len(p)) * h
    return np.array([(loss_np(p + d, obs) - loss_np(p - d, obs)) / (2 * h) for d in e])


# --- the checks ----------------------------------------------------------------------

def check_start(c, graph, obs) -> bool:
    """Value and gradient at START: numpy, finite differences, the unrolled loop."""
    started = time.perf_counter()
    value, grads = c.value_and_grad(graph, wrt="p", p=START, obs=obs)
    first = time.perf_counter() - started  # differentiating, planning, one evaluation
    fd = central_differences(START, obs)
    unrolled = trace_loss(N, unrolled=True)
    u_value, u_grads = c.value_and_grad(unrolled, wrt="p", p=START, obs=obs)
    grad = grads["p"]
    scale = np.abs(grad).max()
    fd_error = np.abs(grad - fd).max() / scale
    unrolled_error = np.abs(grad - u_grads["p"]).max() / scale
    print(f"start p = {START}: loss {float(value):.9e} (numpy {loss_np(START, obs):.9e}); "
          f"first call (compile + evaluate) {first * 1e3:.0f} ms")
    print(f"  gradient (reverse through scan) {grad}")
    print(f"  central finite differences      {fd} (relative difference {fd_error:.1e})")
    print(f"  unrolled loop ({len(unrolled.nodes)} nodes)      {u_grads['p']} "
          f"(relative difference {unrolled_error:.1e})")
    return (abs(value - loss_np(START, obs)) < 1e-12 * max(1.0, abs(value))
            and abs(value - u_value) < 1e-12 * max(1.0, abs(value))
            and fd_error < 1e-6 and unrolled_error < 1e-10)


def fit(c, graph, obs) -> tuple[np.ndarray, float, np.ndarray]:
    """Gradient descent from START on the compiled graph; returns (p, loss, gradient)."""
    p = START.copy()
    started = time.perf_counter()
    for i in range(ITERATIONS):
        value, grads = c.value_and_grad(graph, wrt="p", p=p, obs=obs)
        if i % 50 == 0:
            print(f"  iteration {i:3d}: loss {float(value):.6e}, p = {p}")
        p = p - RATE * grads["p"]
    each = (time.perf_counter() - started) / ITERATIONS
    value, grads = c.value_and_grad(graph, wrt="p", p=p, obs=obs)
    print(f"  after {ITERATIONS}: loss {float(value):.6e}, p = {p}, |grad| = "
          f"{np.linalg.norm(grads['p']):.1e} ({each * 1e3:.1f} ms per iteration)")
    return p, float(value), grads["p"]


def check_sizes(c) -> bool:
    """The loss graph and its gradient graph have the same size for 100 and 1000 steps."""
    sizes = {}
    for steps in (N, 10 * N):
        g = trace_loss(steps)
        sizes[steps] = (len(g.nodes), len(c.differentiate(g, "reverse", wrt="p",
                                                          seed=True).nodes))
    print(f"graph nodes (loss, gradient): {N} steps {sizes[N]}, "
          f"{10 * N} steps {sizes[10 * N]}")
    return sizes[N] == sizes[10 * N]


def main() -> int:
    """Make the data, check the gradient, fit, compare with scipy, check graph sizes."""
    rng = np.random.default_rng(0)
    obs = simulate_np(TRUE) + NOISE * rng.standard_normal(N)
    graph = trace_loss(N)
    with adsvc.local() as c:
        ok = check_start(c, graph, obs)
        print(f"gradient descent, rate {RATE}:")
        p, value, grad = fit(c, graph, obs)
        ok &= check_sizes(c)
    ref = least_squares(lambda q: simulate_np(q) - obs, START, xtol=1e-14, ftol=1e-14,
                        gtol=1e-14).x
    print(f"true p = {TRUE}; fitted {p}; scipy least_squares (numpy model) {ref}")
    ok &= (np.allclose(p, ref, atol=1e-6) and np.allclose(p, TRUE, atol=0.02)
          and np.linalg.norm(grad) < 1e-9 and abs(value - loss_np(ref, obs)) < 1e-12)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
