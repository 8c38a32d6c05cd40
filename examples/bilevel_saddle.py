"""A bilevel (saddle-point) problem solved with a nested gradient.

    min over x  of  max over y  of  f(x, y) = (x - 3)**2 + x*y - y**2

The inner problem is solved by K steps of gradient ascent on y — each step an
`adsvc.grad` *inside* the traced function — and the outer gradient differentiates
through those steps (so it sees how the inner solution moves with x). Analytically
y*(x) = x/2, F(x) = (x - 3)**2 + x**2/4, so the saddle point is x = 2.4, y = 1.2.

The outer loop runs on a graph compiled once (`c.value_and_grad` caches it); each
iteration is one evaluation.

    python examples/bilevel_saddle.py
"""

import adsvc

K = 25  # inner ascent steps, unrolled into the graph
INNER_RATE = 0.25
OUTER_RATE = 0.2


def f(x, y):
    return (x - 3.0) ** 2 + x * y - y ** 2


def inner_solution(x, y0):
    """y after K steps of gradient ascent on f(x, .) from y0: a function of x."""
    y = y0
    for _ in range(K):
        y = y + INNER_RATE * adsvc.grad(f, wrt="y")(x, y)
    return y


def outer_objective(x, y0):
    return f(x, inner_solution(x, y0))


def main() -> None:
    graph = adsvc.trace(outer_objective)  # x, y0: float64 scalars
    x, y0 = 0.0, 0.0
    with adsvc.local() as c:
        for _ in range(60):
            value, grads = c.value_and_grad(graph, wrt="x", x=x, y0=y0)
            x -= OUTER_RATE * float(grads["x"])
        y = float(c.evaluate(adsvc.trace(inner_solution), x=x, y0=y0)["out"])
    print(f"saddle point: x = {x:.6f}, y = {y:.6f} (analytic 2.4, 1.2); F(x) = {value:.6f}")
    assert abs(x - 2.4) < 1e-6 and abs(y - 1.2) < 1e-6, (x, y)


if __name__ == "__main__":
    main()
