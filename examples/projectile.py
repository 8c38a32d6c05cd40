"""Aim a projectile with quadratic air drag, differentiating through `adsvc.while_loop`.

A projectile launched from the ground at speed V0 = 50 m/s and angle theta moves by

    x'' = -DRAG |v| vx,    y'' = -G - DRAG |v| vy        (DRAG = 0.005 / m)

and is simulated with explicit Euler steps of DT = 0.01 s inside an `adsvc.while_loop`
that runs until it lands (y < 0), bounded by MAX_ITERS steps (more would be an
EvaluationError). The trip count is piecewise constant in theta, so the position after
the last step jumps when it changes; the carry therefore keeps the previous state too
and the landing point is interpolated linearly between the last two states (where the
segment crosses y = 0), which is continuous in theta and smooth between trip-count
changes.

The angle is chosen so that the projectile lands at TARGET = 120 m: Gauss-Newton on the
squared miss J(theta) = (landing - TARGET)**2, with J' from reverse mode through the
while loop (`value_and_grad`; a counted reverse scan over the recorded carries). With
J = r**2 and J' = 2 r r', the step -r/r' is -2 J / J'. There are two solutions (drag
makes the range largest below 45 degrees), found from a low and a high start. Checks:

- J' (reverse mode, and forward mode) agrees with central finite differences of a
  numpy simulation of the same steps with a step h small enough that the trip count
  stays the same at theta - h, theta and theta + h (h is halved until it does), and
  J'' (forward-over-reverse through the loop) with central differences of J';
- each angle found hits the target within 1e-6 m, and a plain Python loop (numpy)
  simulating that angle gives the same landing point and the same number of steps;
- a loop that needs more than its max_iters raises EvaluationError.

    python examples/projectile.py
"""

import math
import sys
import time

import numpy as np

import adsvc

G = 9.81
DRAG = 0.005  # 1/m: acceleration DRAG * |v| * v
V0 = 50.0
DT = 0.01
MAX_ITERS = 2000
TARGET = 120.0
STARTS = (0.2, 1.35)  # radians: one start for the low and one for the high solution
TOLERANCE = 1e-6  # metres
MAX_NEWTON = 20


# --- the simulation in adsvc ---------------------------------------------------------

def euler(state):
    """One explicit Euler step of DT of (x, y, vx, vy)."""
    x, y, vx, vy = state
    speed = (vx * vx + vy * vy) ** 0.5
    return (x + DT * vx, y + DT * vy,
            vx - DT * DRAG * speed * vx, vy - DT * (G + DRAG * speed * vy))


def flight(theta, max_iters: int = MAX_ITERS):
    """(landing distance, number of Euler steps) of a launch at angle theta."""
    zero = adsvc.zeros_like(theta)
    start = (zero, zero, V0 * adsvc.cos(theta), V0 * adsvc.sin(theta))

    def in_the_air(carry):
        return carry["now"][1] >= 0.0

    def step(carry):
        return {"before": carry["now"], "now": euler(carry["now"]), "steps": carry["steps"] + 1}

    end = adsvc.while_loop(in_the_air, step, {"before": start, "now": start, "steps": zero},
                           max_iters=max_iters)
    (x0, y0, _, _), (x1, y1, _, _) = end["before"], end["now"]
    return x0 + (x1 - x0) * y0 / (y0 - y1), end["steps"]


def squared_miss(theta):
    """J(theta) = (landing distance - TARGET)**2."""
    landing, _ = flight(theta)
    return (landing - TARGET) ** 2


# --- the same simulation as a plain Python loop --------------------------------------

def flight_np(theta: float) -> tuple[float, int]:
    """(landing distance, number of Euler steps) by a Python loop over numpy floats."""
    x, y, vx, vy = 0.0, 0.0, V0 * np.cos(theta), V0 * np.sin(theta)
    before, steps = (x, y), 0
    while y >= 0.0 and steps < MAX_ITERS:
        before = (x, y)
        speed = np.hypot(vx, vy)
        x, y, vx, vy = (x + DT * vx, y + DT * vy,
                        vx - DT * DRAG * speed * vx, vy - DT * (G + DRAG * speed * vy))
        steps += 1
    (x0, y0) = before
    return float(x0 + (x - x0) * y0 / (y0 - y)), steps


def same_trips_step(theta: float, h: float = 1e-6) -> float:
    """A finite-difference step at most h with the same trip count at theta - h, theta,
    theta + h."""
    trips = flight_np(theta)[1]
    for _ in range(40):
        if flight_np(theta - h)[1] == trips == flight_np(theta + h)[1]:
            return h
        h /= 2
    raise RuntimeError(f"no finite-difference step keeps the trip count at {theta}")


# --- the checks ----------------------------------------------------------------------

def check_derivatives(c, graph, theta: float) -> bool:
    """J' (reverse, forward) and J'' against central differences at the same trip count."""
    h = same_trips_step(theta)
    def j_np(t):
        return (flight_np(t)[0] - TARGET) ** 2
    fd = (j_np(theta + h) - j_np(theta - h)) / (2 * h)
    value, grads = c.value_and_grad(graph, theta=theta)
    forward = float(c.grad(graph, mode="forward", theta=theta)["theta"])
    second = float(c.hessian(graph, theta=theta)["theta"]["theta"])
    h2 = same_trips_step(theta, 1e-5)
    fd2 = (float(c.grad(graph, theta=theta + h2)["theta"])
           - float(c.grad(graph, theta=theta - h2)["theta"])) / (2 * h2)
    reverse = float(grads["theta"])
    print(f"at theta = {theta}: J = {float(value):.6f} (numpy {j_np(theta):.6f}), "
          f"{flight_np(theta)[1]} steps")
    print(f"  J'  reverse {reverse:.9f}, forward {forward:.9f}, "
          f"central differences (h = {h:.1e}) {fd:.9f}")
    print(f"  J'' forward-over-reverse {second:.6f}, central differences of J' "
          f"(h = {h2:.1e}) {fd2:.6f}")
    return (abs(value - j_np(theta)) < 1e-9 * max(1.0, abs(value))
            and abs(reverse - fd) < 1e-5 * abs(fd) and abs(forward - reverse) < 1e-9 * abs(fd)
            and abs(second - fd2) < 1e-6 * abs(fd2))


def aim(c, graph, theta: float) -> float:
    """Gauss-Newton on the squared miss from theta: theta -= 2 J / J'."""
    for i in range(MAX_NEWTON):
        value, grads = c.value_and_grad(graph, theta=theta)
        print(f"  step {i}: theta = {theta:.12f} rad, miss = {math.sqrt(value):.3e} m")
        if math.sqrt(value) < TOLERANCE / 10:
            break
        theta -= 2 * float(value) / float(grads["theta"])
    return theta


def check_max_iters(theta: float) -> bool:
    """A while_loop needing more than max_iters steps fails to evaluate (typed error)."""
    short = adsvc.trace(lambda theta: flight(theta, max_iters=100)[0])
    try:
        adsvc.local().evaluate(short, theta=theta)
    except adsvc.errors.EvaluationError as e:
        print(f"max_iters = 100 at theta = {theta}: EvaluationError: {e}")
        return True
    print("max_iters = 100 did not fail")
    return False


def main() -> int:
    """Check derivatives, find both angles, compare with the numpy loop."""
    graph = adsvc.trace(squared_miss)
    trips_graph = adsvc.trace(lambda theta: flight(theta))
    ok = True
    with adsvc.local() as c:
        started = time.perf_counter()
        for start in STARTS:
            ok &= check_derivatives(c, graph, start)
        print(f"  (the derivative checks took {time.perf_counter() - started:.2f} s)")
        for start in STARTS:
            print(f"Gauss-Newton from theta = {start} rad:")
            started = time.perf_counter()
            theta = aim(c, graph, start)
            seconds = time.perf_counter() - started
            out = c.evaluate(trips_graph, theta=theta)
            landing, steps = float(out["out0"]), int(out["out1"])
            landing_np, steps_np = flight_np(theta)
            print(f"  theta = {theta:.12f} rad = {math.degrees(theta):.6f} deg: lands at "
                  f"{landing:.9f} m after {steps} steps; the Python loop: {landing_np:.9f} m "
                  f"after {steps_np} steps ({seconds:.2f} s)")
            ok &= (abs(landing - TARGET) < TOLERANCE and steps == steps_np
                   and abs(landing - landing_np) < 1e-9)
        ok &= check_max_iters(STARTS[1])
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
