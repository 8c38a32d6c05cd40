"""The safe expression parser: values against numpy, gradients against central
differences, and every refused construct with a one-line message."""

from __future__ import annotations

import numpy as np
import pytest

import adsvc
from adsvc.expr import FUNCTIONS, OUTPUT_NAMES, ExprError, output_name, parse, to_graph


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# (expression, numpy function of the env, env)
CASES = [
    ("x*x + x*y + 2", lambda x, y: x * x + x * y + 2, dict(x=3.0, y=4.0)),
    ("sin(x)*exp(y)", lambda x, y: np.sin(x) * np.exp(y), dict(x=0.7, y=-0.3)),
    ("x**2 - -y / 3", lambda x, y: x**2 - -y / 3, dict(x=1.5, y=2.0)),
    ("-(x - 1e-3) ** 3 + +y", lambda x, y: -(x - 1e-3) ** 3 + y, dict(x=0.4, y=0.9)),
    ("log(x) + log1p(y) + expm1(x) + sqrt(y)",
     lambda x, y: np.log(x) + np.log1p(y) + np.expm1(x) + np.sqrt(y), dict(x=0.8, y=1.7)),
    ("tan(x) * cos(y) + tanh(x*y)",
     lambda x, y: np.tan(x) * np.cos(y) + np.tanh(x * y), dict(x=0.3, y=1.1)),
    ("sigmoid(x) + softplus(y) + square(x) + reciprocal(y)",
     lambda x, y: _sigmoid(x) + np.log1p(np.exp(y)) + x**2 + 1 / y, dict(x=-0.4, y=2.5)),
    ("abs(x) * sign(y) + relu(x) + relu(y)",
     lambda x, y: np.abs(x) * np.sign(y) + max(x, 0) + max(y, 0), dict(x=-1.2, y=0.6)),
    ("maximum(x, y) + minimum(x, y) * max(x, 2*y) - min(x, 0.5)",
     lambda x, y: max(x, y) + min(x, y) * max(x, 2 * y) - min(x, 0.5), dict(x=0.3, y=0.7)),
    ("pow(x, y) + x**y", lambda x, y: 2 * x**y, dict(x=1.3, y=2.2)),
    ("where(x < y, x*y, x - y) + where(x >= 1, 1, 0) + where(y <= x, 5, 0)",
     lambda x, y: (x * y if x < y else x - y) + (1 if x >= 1 else 0) + (5 if y <= x else 0),
     dict(x=0.5, y=0.8)),
    ("where(x > y, exp(x), exp(y)) / (1 + x*x)",
     lambda x, y: np.exp(max(x, y)) / (1 + x * x), dict(x=0.9, y=0.2)),
    ("pi * x", lambda x: np.pi * x, dict(x=2.0)),
    ("(x*(y+(x*(y+1))))", lambda x, y: x * (y + x * (y + 1)), dict(x=1.1, y=-0.7)),
]


@pytest.mark.parametrize("text,ref,env", CASES, ids=[c[0] for c in CASES])
def test_values_match_numpy(text, ref, env):
    g = to_graph(text)
    out = adsvc.local().evaluate(g, env)
    (value,) = out.values()
    np.testing.assert_allclose(value, ref(**env), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("text,ref,env", CASES, ids=[c[0] for c in CASES])
def test_gradients_match_central_differences(text, ref, env, mode):
    g = to_graph(text)
    _, grads = adsvc.local().value_and_grad(g, mode=mode, inputs=env)
    assert set(grads) == set(env)
    h = 1e-6
    for name in env:
        up, down = dict(env), dict(env)
        up[name] += h
        down[name] -= h
        fd = (ref(**up) - ref(**down)) / (2 * h)
        np.testing.assert_allclose(grads[name], fd, rtol=1e-6, atol=1e-6, err_msg=name)


def test_vector_inputs_and_reductions():
    x = np.array([0.5, -1.0, 2.0])
    y = np.array([1.0, 2.0, 3.0])
    text = "sum(x*y) + mean(exp(x)) + dot(x, x) + max(x) + min(y) + logsumexp(x)"
    g = parse(text).graph({"x": (3,), "y": (3,)})
    c = adsvc.local()
    value, grads = c.value_and_grad(g, x=x, y=y)
    ref = (np.sum(x * y) + np.mean(np.exp(x)) + x @ x + x.max() + y.min()
           + np.log(np.sum(np.exp(x))))
    np.testing.assert_allclose(value, ref)
    soft = np.exp(x) / np.exp(x).sum()
    np.testing.assert_allclose(grads["x"], y + np.exp(x) / 3 + 2 * x + [0, 0, 1] + soft)
    np.testing.assert_allclose(grads["y"], x + [1, 0, 0])


def test_variables_in_order_of_appearance_and_shared():
    e = parse("y * x + sin(y) + pi")
    assert e.variables == ["y", "x"]
    g = e.graph()
    assert g.input_names == ["y", "x"]
    assert [n.shape for n in g.inputs] == [(), ()]
    assert g.output_names == ["z"]


def test_output_name_avoids_a_variable_called_z():
    g = to_graph("z * 2")
    assert g.input_names == ["z"] and g.output_names == ["out"]


def test_output_name_never_collides_even_when_every_preferred_name_is_taken():
    """Regression: with z, out, value, result and f all variables, choosing the output
    name raised StopIteration (`next()` over the five preferred names ran dry)."""
    assert output_name([]) == "z"
    assert output_name(["z", "out"]) == "value"
    assert output_name(OUTPUT_NAMES) == "z_1"
    assert output_name([*OUTPUT_NAMES, "z_1", "z_2", "z_4"]) == "z_3"
    taken = [*OUTPUT_NAMES, *(f"z_{k}" for k in range(1, 1000))]
    assert output_name(taken) == "z_1000"
    g = to_graph("z + out + value + result + f")
    assert g.output_names == ["z_1"] and "z_1" not in g.input_names
    value = adsvc.local().evaluate(g, z=1.0, out=2.0, value=3.0, result=4.0, f=5.0)
    assert float(value["z_1"]) == 15.0


def test_an_explicit_output_name_may_not_be_a_variable():
    assert parse("x + y").graph(output="loss").output_names == ["loss"]
    with pytest.raises(ExprError, match="'x' is also a variable"):
        parse("x + y").graph(output="x")


def test_checking_and_building_do_not_recurse():
    """A chain as long as Python's parser accepts (thousands of levels, beyond the
    interpreter's recursion limit) is checked and built; variables keep their order."""
    import sys

    n = sys.getrecursionlimit() * 2
    e = parse(" + ".join(f"v{i % 7}" for i in range(n)))
    assert e.variables == [f"v{i}" for i in range(7)]
    value = adsvc.local().evaluate(e.graph(), {f"v{i}": 1.0 for i in range(7)})
    assert float(value["z"]) == n
    e = parse("**".join(["x"] * n))  # right-nested
    assert e.variables == ["x"]
    assert sum(node.op == "pow" for node in e.graph().nodes) == n - 1


def test_what_the_parser_cannot_take_is_a_clear_error():
    with pytest.raises(ExprError, match="too deeply nested for the parser"):
        to_graph("+".join(["x"] * 40_000))
    with pytest.raises(ExprError, match="integer literal is too long"):
        to_graph("1" * 5000 + " * x")


def test_integer_literals_become_float64_constants():
    g = to_graph("x**2 + 1")
    consts = [n for n in g.nodes if n.op == "constant"]
    assert consts and all(n.dtype == "float64" for n in consts)
    assert float(adsvc.local().evaluate(to_graph("7"))["z"]) == 7.0


def test_every_function_in_the_table_builds():
    for name, fn in FUNCTIONS.items():
        for arity in fn.arities:
            args = ["x < y", "x", "y"] if name == "where" else ["x", "y"][:arity]
            if arity == 1:
                args = ["x"]
            g = to_graph(f"{name}({', '.join(args)})")
            assert g.outputs, name


BAD = [
    ("__import__('os')", "unknown function '__import__'"),
    ("os.system('ls')", "attribute access is not allowed"),
    ("x.real", "attribute access is not allowed"),
    ("(lambda: 1)()", "calling an expression is not allowed"),
    ("lambda: 1", "lambda is not allowed"),
    ("foo(x)", "unknown function 'foo' at column 1"),
    ("x + bar(y)", "unknown function 'bar' at column 5"),
    ("x +", "unexpected end of expression"),
    ("x y", "invalid syntax at column 3 near 'y'"),
    ("sin(x", "'(' was never closed"),
    ("x[0]", "indexing is not allowed"),
    ("x if y else 1", "use where(cond, a, b)"),
    ("x and y", "'and'/'or' is not allowed"),
    ("not x", "the operator 'not' is not allowed"),
    ("x % 2", "the operator '%' is not allowed"),
    ("x // 2", "the operator '//' is not allowed"),
    ("'abc'", "a str literal"),
    ("1j * x", "complex number literal"),
    ("True + x", "a bool literal"),
    ("[x, y]", "a list is not allowed"),
    ("x < y < 1", "chained comparison"),
    ("x is y", "'is'/'in'"),
    ("sin(x, y)", "sin() takes 1 argument, got 2"),
    ("where(x, y)", "where() takes 3 arguments, got 2"),
    ("max(x, y, 1)", "max() takes 1 or 2 arguments, got 3"),
    ("sin(x=1)", "keyword argument"),
    ("sin(*x)", "'*' unpacking"),
    ("sin + 1", "'sin' is a function"),
    ("_secret * 2", "the name '_secret' is not allowed"),
    ("(y := 2)", "':=' is not allowed"),
    ("f'{x}'", "an f-string is not allowed"),
    ("[i for i in x]", "is not allowed"),
    ("where(x, y, 2)", "condition must be bool"),
    ("", "empty expression"),
    ("   ", "empty expression"),
    ("x\0", "NUL"),
    ("1e999999 * x", None),  # parses to inf: allowed, not an error
]


@pytest.mark.parametrize("text,message", BAD, ids=[b[0] or "empty" for b in BAD])
def test_refused_with_one_line_message(text, message):
    if message is None:
        assert np.isinf(adsvc.local().evaluate(to_graph(text), x=1.0)["z"])
        return
    with pytest.raises(ExprError) as info:
        to_graph(text)
    msg = str(info.value)
    assert message in msg
    assert "\n" not in msg


def test_deep_nesting_is_a_clear_error_not_a_crash():
    with pytest.raises(ExprError, match="too deeply nested|invalid syntax"):
        to_graph("(" * 5000 + "x" + ")" * 5000)


def test_long_but_flat_expression_builds():
    g = to_graph(" + ".join(f"x*{i}" for i in range(500)))
    value = adsvc.local().evaluate(g, x=1.0)["z"]
    assert float(value) == sum(range(500))


def test_no_code_is_executed(tmp_path, monkeypatch):
    """A hostile expression must not run: it is refused before anything is built."""
    marker = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    for text in (f"__import__('os').system('touch {marker}')",
                 f"open('{marker}', 'w')", "exec('x=1')", "eval('1')"):
        with pytest.raises(ExprError):
            to_graph(text)
    assert not marker.exists()
