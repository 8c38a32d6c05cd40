"""Every op of the op table through the numerical derivative checks (float64)."""

import numpy as np
import pytest
from derivcheck import check_first_order, check_second_order
from optable_cases import CASES

import adsvc as ad
from adsvc.ir.opdef import OPS

PARAMS = [pytest.param(c, id=f"{op}-{i}") for op in sorted(CASES)
          for i, c in enumerate(CASES[op])]


def test_every_op_has_a_case():
    missing = sorted(set(OPS) - set(CASES))
    assert not missing, f"ops without a test case in tests/optable_cases.py: {missing}"


@pytest.mark.parametrize("case", PARAMS)
def test_first_order(case):
    c = ad.local()
    g = ad.trace(case.fn, **case.specs())
    check_first_order(c, g, case.feeds, np.random.default_rng(7), case.fd_fn)


@pytest.mark.parametrize("case", PARAMS)
def test_second_order(case):
    c = ad.local()
    g = ad.trace(case.fn, **case.specs())
    check_second_order(c, g, case.feeds, np.random.default_rng(11), case.grad_fn)


@pytest.mark.parametrize("case", [p for p in PARAMS if not p.values[0].f64_only])
def test_float32_evaluation_keeps_dtype(case):
    """The same graph traced in float32 evaluates in float32 and matches float64."""
    f32 = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
           for k, v in case.feeds.items()}
    c = ad.local()
    g32 = ad.trace(case.fn, **{k: ad.Spec(v.dtype.name, v.shape) for k, v in f32.items()})
    g64 = ad.trace(case.fn, **case.specs())
    o32, o64 = c.evaluate(g32, f32), c.evaluate(g64, case.feeds)
    for k in o64:
        if o64[k].dtype.kind == "f":
            assert o32[k].dtype == np.float32, k
            np.testing.assert_allclose(o32[k], o64[k], rtol=2e-5, atol=2e-5)
    grads = c.vjp(g32, f32, {k: np.ones_like(v) for k, v in o32.items()
                             if v.dtype.kind == "f"})[1]
    assert all(v.dtype == np.float32 for v in grads.values())
