"""Property-based tests on random graphs: forward and reverse mode agree with each other
and with central finite differences, at first and second order."""

import numpy as np
from derivcheck import check_first_order, check_second_order
from hypothesis import given, settings
from hypothesis import strategies as st

import adsvc as ad

UNARY = [
    ad.sin, ad.cos, ad.tanh, ad.sigmoid, ad.softplus, ad.square, ad.neg,
    lambda a: ad.exp(ad.tanh(a)),
    lambda a: ad.log1p(ad.square(a)),
    lambda a: ad.sqrt(1.0 + ad.square(a)),
    lambda a: ad.reciprocal(1.0 + ad.square(a)),
]
BINARY = [
    ad.add, ad.sub, ad.mul,
    lambda a, b: a / (1.0 + b * b),
    lambda a, b: ad.pow(1.0 + a * a, ad.tanh(b)),
    lambda a, b: ad.where(a > b, a * b, a - b),
]

program = st.fixed_dictionaries({
    "n_inputs": st.integers(1, 3),
    "shape": st.sampled_from([(), (3,), (2, 2)]),
    "steps": st.lists(st.tuples(st.booleans(), st.integers(0, 100), st.integers(0, 100),
                                st.integers(0, 100)), min_size=1, max_size=12),
    "reduce": st.booleans(),
})
values = st.floats(-2.0, 2.0, allow_nan=False, width=64)


def build(p):
    names = [f"x{i}" for i in range(p["n_inputs"])]

    def fn(**xs):
        vals = [xs[n] for n in names]
        for is_unary, op, i, j in p["steps"]:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            vals.append(UNARY[op % len(UNARY)](a) if is_unary else
                        BINARY[op % len(BINARY)](a, b))
        return ad.sum(vals[-1]) if p["reduce"] else vals[-1]

    return ad.trace(fn, **{n: ad.f64(*p["shape"]) for n in names}), names


@settings(max_examples=60, deadline=None)
@given(program, st.data())
def test_random_graph_modes_agree_with_finite_differences(p, data):
    g, names = build(p)
    size = int(np.prod(p["shape"]))
    # The generated points are shifted by an irrational offset per element so that the
    # `where` kink (a == b) is never hit exactly (hypothesis likes 0.0 and repeats);
    # finite differences are only a valid oracle where the function is smooth.
    feeds = {n: (np.array(data.draw(st.lists(values, min_size=size, max_size=size)))
                 + np.sqrt(2.0) * (k + 1) / 7 + np.arange(size) * np.pi / 11)
             .reshape(p["shape"]) for k, n in enumerate(names)}
    out = ad.local().evaluate(g, feeds)["out"]
    if not np.all(np.isfinite(out)):
        return  # outside the domain: nothing to differentiate
    rng = np.random.default_rng(0)
    check_first_order(ad.local(), g, feeds, rng)
    check_second_order(ad.local(), g, feeds, rng)
    if p["reduce"]:
        c = ad.local()
        fwd, rev = c.grad(g, mode="forward", inputs=feeds), c.grad(g, inputs=feeds)
        for n in names:
            np.testing.assert_allclose(fwd[n], rev[n], rtol=1e-12, atol=1e-12)
