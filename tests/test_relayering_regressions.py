"""Regressions found reviewing the re-layering: each was wrong (or different from
before) at some commit of it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import adsvc
from adsvc.cli import main
from adsvc.ir.node import input_node, make
from adsvc_protocol.errors import InputError, InvalidRequestError, LimitExceededError
from adsvc_protocol.feeds import convert_feed
from adsvc_protocol.modes import normalize_modes


def colon_first_graph():
    """A user output whose name has ':' listed before the scalar one."""
    x = input_node("x", "float64", (3,))
    return adsvc.Graph([x], [("tangent:y", make("mul", (x, x))), ("s", make("sum", (x,)))])


def test_a_plain_gradient_needs_exactly_one_float_output_whatever_its_name():
    c = adsvc.local()
    x = np.array([1.0, 2.0, 3.0])
    for call in (lambda g: c.value_and_grad(g, x=x), lambda g: c.hessian(g, x=x),
                 lambda g: c.differentiate(g, "reverse", seed=True)):
        with pytest.raises(InvalidRequestError, match="exactly one scalar float output") as e:
            call(colon_first_graph())
        assert e.value.field == "outputs"
    # and the seed goes to the scalar output when there is exactly one
    s = input_node("x", "float64", (3,))
    g = adsvc.Graph([s], [("s", make("sum", (s,)))])
    assert np.array_equal(c.grad(g, x=x)["x"], np.ones(3))


def test_the_cli_refuses_the_same_graph_from_a_file(tmp_path, capsys):
    path = str(tmp_path / "colon.json")
    from adsvc import graphfile

    graphfile.save(colon_first_graph(), path)
    assert main(["grad", path, "--at", "x=[1,2,3]"]) == 1
    assert "exactly one scalar float output" in capsys.readouterr().err


def test_no_modes_is_an_error_for_clients():
    g = adsvc.trace(lambda x: x * x)
    with pytest.raises(InvalidRequestError, match="order must be an integer >= 1") as e:
        adsvc.local().differentiate(g, mode=())
    assert e.value.field == "order"
    with pytest.raises(InvalidRequestError):
        adsvc.differentiate(g, mode=())
    assert normalize_modes((), None, allow_empty=True) == ()


def test_a_huge_order_is_refused_before_anything_is_repeated():
    with pytest.raises(LimitExceededError):
        normalize_modes("reverse", 2**64)
    with pytest.raises(LimitExceededError):
        adsvc.local().differentiate(adsvc.trace(lambda x: x), "reverse", order=2**64)


def test_a_number_first_takes_the_dtype_of_an_array_operand():
    out = adsvc.add(2, np.array([1.0, 2.0, 3.0]))
    assert out.op == "constant" and np.array_equal(out.value, [3.0, 4.0, 5.0])
    assert adsvc.mul(2.5, np.ones(2, np.float32)).dtype == "float32"


def test_lossy_feed_casts_are_errors_not_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bad in (float("nan"), 1e30, 3e10):
            with pytest.raises(InputError, match="not exact int32"):
                convert_feed("n", bad, "int32", ())
        assert convert_feed("n", 3.0, "int32", ()).dtype == np.int32
