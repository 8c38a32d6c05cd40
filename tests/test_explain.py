"""`adsvc.explain`: the step-by-step account of a sweep for the seed example in both
modes (rows, text), consistent with the picture it draws and with the clients'
derivatives; `node_values` with sweeps; several passes (a Hessian); tensors."""

from __future__ import annotations

import numpy as np
import pytest
from test_dot import labels, parse_dot

import adsvc
from adsvc.explain import Row, node_values

X, Y = 3.0, 4.0


def seed_graph():
    return adsvc.trace(lambda x, y: x * x + x * y + 2, name="seed")


def table(ex) -> list[tuple]:
    """Rows with plain numbers: (id, op, value, {seed: derivative})."""
    return [(r.id, r.op, float(r.value), {k: float(v) for k, v in r.derivative.items()})
            for r in ex.table()]


def test_forward_account_of_the_seed_example():
    ex = adsvc.explain(seed_graph(), "forward", x=X, y=Y)
    assert all(isinstance(r, Row) for r in ex.table())
    assert table(ex) == [
        (0, "input x", 3, {"x": 1, "y": 0}),
        (1, "input y", 4, {"x": 0, "y": 1}),
        (4, "mul %0, %0", 9, {"x": 6, "y": 0}),
        (5, "mul %0, %1", 12, {"x": 4, "y": 3}),
        (6, "add %4, %5", 21, {"x": 10, "y": 3}),
        (7, "constant 2", 2, {"x": 0, "y": 0}),
        (8, "add %6, %7", 23, {"x": 10, "y": 3}),
    ]
    text = ex.text()
    assert "Forward mode at x = 3, y = 4: one sweep per input (2 sweeps)" in text
    assert "Result: out = 23; ∂out/∂x = 10, ∂out/∂y = 3 (2 forward sweeps for 2 inputs)" in text
    for line in ("%4  mul %0, %0      9      6      0", "%8  add %6, %7     23     10      3"):
        assert line in text


def test_reverse_account_of_the_seed_example():
    ex = adsvc.explain(seed_graph(), "reverse", x=X, y=Y)
    assert table(ex) == [
        (0, "input x", 3, {"out": 10}),
        (1, "input y", 4, {"out": 3}),
        (2, "mul %0, %0", 9, {"out": 1}),
        (3, "mul %0, %1", 12, {"out": 1}),
        (4, "add %2, %3", 21, {"out": 1}),
        (5, "constant 2", 2, {"out": 0}),
        (6, "add %4, %5", 23, {"out": 1}),
    ]
    text = ex.text()
    forward, backward = text.split("Backward sweep (reverse order):")
    assert "Forward sweep (evaluation order):" in forward
    ids = [line.split()[0] for line in backward.strip().splitlines()[1:8]]
    assert ids == ["%6", "%5", "%4", "%3", "%2", "%1", "%0"]  # root to leaves
    assert "Result: out = 23; ∂out/∂x = 10, ∂out/∂y = 3 (1 backward sweep for 2 inputs)" in text
    # the adjoint of y is x itself (d(x*y)/dy), of x the node grad:x is
    assert ex.derivative_nodes[1] == 0
    assert ex.derivative_nodes[0] == ex.differentiated.nodes.index(
        ex.differentiated.output("grad:x"))


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_the_account_matches_the_picture(mode):
    """Every row's value is on its node, and its derivative on its derivative node."""
    ex = adsvc.explain(seed_graph(), mode, x=X, y=Y)
    text = labels(parse_dot(ex.to_dot())[0])
    for r in ex.table():
        assert f"= {adsvc.ir.dot.format_value(r.value)}" in text[f"n{r.id}"].splitlines()
        d = ex.derivative_nodes[r.id]
        if d is None:
            continue
        lines = text[f"n{d}"].splitlines()
        for seed, value in r.derivative.items():
            shown = adsvc.ir.dot.format_value(value)
            assert (f"∂/∂{seed}: {shown}" in lines if mode == "forward"
                    else f"= {shown}" in lines), (r, lines)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_derivatives_agree_with_the_client(mode):
    g = adsvc.trace(lambda x, y: adsvc.sin(x) * adsvc.exp(y) + x / y, name="f")
    ex = adsvc.explain(g, mode, x=0.7, y=1.3)
    grads = adsvc.local().grad(g, x=0.7, y=1.3)
    rows = {r.op: r for r in ex.table()}
    for name in ("x", "y"):
        d = rows[f"input {name}"].derivative
        if mode == "reverse":
            assert float(d["out"]) == pytest.approx(float(grads[name]), rel=1e-12)
    if mode == "forward":
        out = ex.table()[-1]
        assert float(out.derivative["x"]) == pytest.approx(float(grads["x"]), rel=1e-12)
        assert float(out.derivative["y"]) == pytest.approx(float(grads["y"]), rel=1e-12)


def test_hessian_as_forward_over_reverse():
    g = seed_graph()
    ex = adsvc.explain(g, ("reverse", "forward"), x=X, y=Y)
    hessian = adsvc.local().hessian(g, x=X, y=Y)
    dg = ex.differentiated
    ids = {id(n): i for i, n in enumerate(dg.nodes)}
    by_id = {r.id: r for r in ex.table()}
    for wrt in ("x", "y"):
        row = by_id[ids[id(dg.output(f"grad:{wrt}"))]]
        for other in ("x", "y"):
            assert float(row.derivative[other]) == float(hessian[wrt][other])
    assert "∂grad:x/∂x = 2, ∂grad:x/∂y = 1, ∂grad:y/∂x = 1, ∂grad:y/∂y = 0" in " ".join(
        ex.text().split())
    text = labels(parse_dot(ex.to_dot())[0])
    assert "tangent2:grad:x\n∂/∂x: 2\n∂/∂y: 1" in text.values()


def test_evaluation_only():
    ex = adsvc.explain(seed_graph(), None, x=X, y=Y)
    assert [(r.id, float(r.value), r.derivative) for r in ex.table()] == [
        (0, 3, {}), (1, 4, {}), (2, 9, {}), (3, 12, {}), (4, 21, {}), (5, 2, {}), (6, 23, {})]
    assert ex.text().startswith("Evaluation at x = 3, y = 4")


def test_tensors_and_several_outputs():
    g = adsvc.trace(lambda a: (adsvc.sum(a * a), adsvc.sum(adsvc.sin(a))), a=adsvc.f64(3))
    a = np.array([1.0, 2.0, 3.0])
    ex = adsvc.explain(g, "reverse", a=a)
    assert ex.columns == ["out0", "out1"]  # one backward sweep per output
    row = next(r for r in ex.table() if r.op == "input a")
    np.testing.assert_allclose(row.derivative["out0"], 2 * a)
    np.testing.assert_allclose(row.derivative["out1"], np.cos(a))
    assert "2 backward sweeps for 1 input" in ex.text()


def test_node_values_sweeps_and_given_seeds():
    dg = adsvc.differentiate(seed_graph(), "forward")
    values = node_values(dg, {"x": X, "y": Y})
    out = values[dg.output("tangent:out")]
    assert {k: float(v) for k, v in out.items()} == {"∂/∂x": 10, "∂/∂y": 3}
    assert float(values[dg.output("out")]) == 23  # primal values do not vary by sweep
    given = node_values(dg, {"x": X, "y": Y, "tangent:x": 2.0, "tangent:y": 1.0})
    assert float(given[dg.output("tangent:out")]) == 2 * 10 + 3


def test_explain_takes_protos_and_inputs_by_dict():
    g = seed_graph()
    ex = adsvc.explain(adsvc.to_proto(g), mode="reverse", inputs={"x": X, "y": Y})
    assert float(ex.table()[0].derivative["out"]) == 10
    with pytest.raises(adsvc.AdsvcError):
        adsvc.explain(g, "sideways", x=X, y=Y)
    with pytest.raises(adsvc.errors.InputError, match="missing input 'y'"):
        adsvc.explain(g, "reverse", x=X)


def test_render_from_explanation(tmp_path):
    ex = adsvc.explain(seed_graph(), "reverse", x=X, y=Y)
    path = ex.render(tmp_path / "seed.dot")
    text = labels(parse_dot(path.read_text())[0])
    assert "grad:x = 10" in text.values()
    assert "reverse mode at x = 3, y = 4" in path.read_text()
