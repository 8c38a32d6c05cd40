"""The `adsvc` command line: results in both modes, files, show/eval/export, one-line
errors (never a traceback), `python -m adsvc`, and a real server on port 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import adsvc
from adsvc import graphfile
from adsvc.cli import main

SEED = ["x*x + x*y + 2", "--at", "x=3", "--at", "y=4"]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys, *argv) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert err == ""
    return out


def fails(capsys, *argv, code=None) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc != 0
    if code is not None:
        assert rc == code
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adsvc: error: ")
    assert "Traceback" not in err
    return lines[0]


# -- grad ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_seed_example_plain(capsys, mode):
    out = ok(capsys, "grad", *SEED, "--mode", mode)
    assert out == "value: 23\ngradient: x = 10, y = 3\n"


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_seed_example_json(capsys, mode):
    out = ok(capsys, "grad", *SEED, "--mode", mode, "--json")
    assert json.loads(out) == {"value": 23, "gradient": {"x": 10, "y": 3}}


def test_default_mode_is_reverse_and_matches(capsys):
    assert ok(capsys, "grad", *SEED) == "value: 23\ngradient: x = 10, y = 3\n"


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_wrt_subset(capsys, mode):
    out = ok(capsys, "grad", *SEED, "--wrt", "y", "--mode", mode, "--json")
    assert json.loads(out) == {"value": 23, "gradient": {"y": 3}}
    out = ok(capsys, "grad", *SEED, "--wrt", "y,x", "--mode", mode)
    assert out.splitlines()[1] == "gradient: y = 3, x = 10"


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_vector_at(capsys, mode):
    out = ok(capsys, "grad", "sum(x*x) + dot(x, w)", "--at", "x=[1, 2, 3]",
             "--at", "w=[0.5,0.5,0.5]", "--mode", mode, "--json")
    doc = json.loads(out)
    assert doc["value"] == pytest.approx(14 + 3)
    np.testing.assert_allclose(doc["gradient"]["x"], [2.5, 4.5, 6.5])
    np.testing.assert_allclose(doc["gradient"]["w"], [1, 2, 3])
    out = ok(capsys, "grad", "sum(x*x)", "--at", "x=[[1,2],[3,4]]", "--mode", mode)
    assert out == "value: 30\ngradient: x = [[2, 4], [6, 8]]\n"


def test_leading_minus_expression(capsys):
    out = ok(capsys, "grad", "-x*y", "--at", "x=3", "--at", "y=4")
    assert out == "value: -12\ngradient: x = -4, y = -3\n"


def test_non_integer_values_print_in_full(capsys):
    out = ok(capsys, "grad", "x/3", "--at", "x=1", "--json")
    doc = json.loads(out)
    assert doc["value"] == pytest.approx(1 / 3)
    out = ok(capsys, "grad", "x/4", "--at", "x=1")
    assert out == "value: 0.25\ngradient: x = 0.25\n"


def test_show_ir(capsys):
    out = ok(capsys, "grad", *SEED, "--show-ir")
    head, ir = out.split("\n\n", 1)
    assert head == "value: 23\ngradient: x = 10, y = 3"
    assert ir.startswith("graph ") and "grad:x" in ir and "grad:y" in ir
    doc = json.loads(ok(capsys, "grad", *SEED, "--show-ir", "--json", "--mode", "forward"))
    assert doc["value"] == 23 and doc["gradient"] == {"x": 10, "y": 3}
    assert "tangent:x" in doc["ir"]


# -- eval / show / export -----------------------------------------------------------------
def test_eval(capsys):
    assert ok(capsys, "eval", "sin(x)*exp(y)", "--at", "x=0", "--at", "y=1") == "value: 0\n"
    doc = json.loads(ok(capsys, "eval", "x*2", "--at", "x=[1,2.5]", "--json"))
    assert doc == {"value": [2, 5], "outputs": {"z": [2, 5]}}
    assert ok(capsys, "eval", "x < 1", "--at", "x=0") == "value: true\n"


def test_show_graph_and_derivative(capsys):
    text = ok(capsys, "show", "x*x + x*y + 2")
    assert text.startswith("graph expr(x: f64[], y: f64[])")
    assert "grad:" not in text
    assert "grad:x" in ok(capsys, "show", "x*x + x*y + 2", "--mode", "reverse")
    fwd = ok(capsys, "show", "x*y", "--mode", "forward", "--wrt", "x")
    assert "tangent:x" in fwd and "tangent:y" not in fwd
    hvp = ok(capsys, "show", "x*x*y", "--mode", "reverse,forward")
    assert "tangent2:grad:x" in hvp
    assert "tangent2:tangent:z" in ok(capsys, "show", "x*x", "--mode", "forward",
                                      "--order", "2")
    assert "f64[4]" in ok(capsys, "show", "sum(x)", "--at", "x=[1,2,3,4]")


@pytest.mark.parametrize("ext", ["json", "pb"])
def test_export_and_file_round_trip(capsys, tmp_path, ext):
    path = str(tmp_path / f"graph.{ext}")
    out = ok(capsys, "export", "x*x + x*y + 2", "-o", path)
    assert out.startswith(f"wrote {path}")
    if ext == "json":
        doc = json.loads(open(path).read())
        assert {i["name"] for i in doc["inputs"]} == {"x", "y"}
    for mode in ("reverse", "forward"):
        out = ok(capsys, "grad", path, "--at", "x=3", "--at", "y=4", "--mode", mode)
        assert out == "value: 23\ngradient: x = 10, y = 3\n"
    assert ok(capsys, "eval", path, "--at", "x=3", "--at", "y=4") == "value: 23\n"
    assert "grad:x" in ok(capsys, "show", path, "--mode", "reverse")
    other = str(tmp_path / ("copy.pb" if ext == "json" else "copy.json"))
    ok(capsys, "export", path, "-o", other)  # convert between the formats
    assert ok(capsys, "grad", other, *SEED[1:], "--json") == \
        '{"value": 23.0, "gradient": {"x": 10.0, "y": 3.0}}\n'


def test_file_with_several_outputs_and_typed_inputs(capsys, tmp_path):
    g = adsvc.trace(lambda x, n: {"loss": adsvc.sum(x * x), "scaled": x * adsvc.cast(n, "float64")},
                    x=adsvc.f64(2), n=adsvc.i64())
    path = str(tmp_path / "multi.json")
    graphfile.save(g, path)
    out = ok(capsys, "eval", path, "--at", "x=[1,2]", "--at", "n=3")
    assert out == "loss: 5\nscaled: [3, 6]\n"
    doc = json.loads(ok(capsys, "eval", path, "--at", "x=[1,2]", "--at", "n=3", "--json"))
    assert doc == {"outputs": {"loss": 5, "scaled": [3, 6]}}
    line = fails(capsys, "eval", path, "--at", "x=[1,2]", "--at", "n=2.5")
    assert "int64" in line
    line = fails(capsys, "grad", path, "--at", "x=[1,2]", "--at", "n=3")
    assert "scalar float output" in line


# -- errors: one line, non-zero, no traceback ---------------------------------------------
ERRORS = [
    (["grad", "x*x +", "--at", "x=1"], "bad expression: invalid syntax"),
    (["grad", "__import__('os').system('true')", "--at", "x=1"],
     "attribute access is not allowed"),
    (["grad", "__import__('os')", "--at", "x=1"], "unknown function '__import__'"),
    (["grad", "os.path", "--at", "x=1"], "attribute access is not allowed"),
    (["eval", "(lambda: 1)()"], "calling an expression is not allowed"),
    (["eval", "lambda: x", "--at", "x=1"], "lambda is not allowed"),
    (["grad", "foo(x)", "--at", "x=1"], "unknown function 'foo'"),
    (["grad", "x*y", "--at", "x=1"], "no value for the expression's input 'y'"),
    (["grad", "x*y"], "--at x=VALUE --at y=VALUE"),
    (["grad", "x", "--at", "x"], "expected NAME=VALUE"),
    (["grad", "x", "--at", "=3"], "expected NAME=VALUE"),
    (["grad", "x", "--at", "x=abc"], "not a number"),
    (["grad", "x", "--at", "x=[1,2"], "not a JSON list"),
    (["grad", "x", "--at", "x=[[1],[2,3]]"], "rectangular"),
    (["grad", "x", "--at", "x=1", "--at", "x=2"], "given twice"),
    (["grad", "x", "--at", "x=1", "--at", "q=2"], "no variable 'q'"),
    (["grad", "x*y", "--at", "x=1", "--at", "y=2", "--wrt", "x,q"], "unknown variable 'q'"),
    (["grad", "x", "--at", "x=1", "--wrt", ","], "at least one variable"),
    (["grad", "x", "--at", "x=1", "--mode", "sideways"], "invalid choice"),
    (["grad", "x", "--at", "x=1", "--timeout", "0"], "positive number"),
    (["grad", "x*2", "--at", "x=[1,2]"], "InvalidRequestError"),
    (["grad", "x < 1", "--at", "x=1"], "Error"),
    (["show", "x", "--order", "2"], "--order needs --mode"),
    (["show", "x", "--wrt", "x"], "--wrt needs --mode"),
    (["show", "x", "--mode", "reverse,sideways"], "unknown mode 'sideways'"),
    (["show", "x", "--mode", "reverse,forward", "--order", "3"], "2 modes but --order is 3"),
    (["export", "x", "-o", "graph.txt"], "unknown graph file extension '.txt'"),
    (["eval", "missing.json"], "missing.json: cannot read graph file"),
    (["grad"], "required: EXPR"),
    (["grad", "-x", "--at", "x=1"], "starts with '-'"),
    (["bogus"], "invalid choice"),
    (["grad", "x", "--at", "x=1", "--frobnicate"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv,message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_errors_are_one_line(capsys, argv, message):
    line = fails(capsys, *argv)
    assert message in line


def test_usage_errors_exit_2_and_run_errors_exit_1(capsys):
    fails(capsys, "grad", "x +", "--at", "x=1", code=2)
    fails(capsys, "grad", "x*2", "--at", "x=[1,2]", code=1)


def test_bad_graph_files(capsys, tmp_path):
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff\xff\xff\xff not a proto")
    assert "not a binary Graph proto" in fails(capsys, "eval", str(garbage))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    assert "not a protobuf-JSON Graph" in fails(capsys, "eval", str(bad_json))
    wrong_field = tmp_path / "wrong.json"
    wrong_field.write_text('{"nodez": []}')
    assert "not a protobuf-JSON Graph" in fails(capsys, "eval", str(wrong_field))
    dangling = tmp_path / "dangling.json"
    dangling.write_text(json.dumps({
        "irVersion": 1, "opsetVersion": 1,
        "inputs": [{"id": 0, "name": "x", "type": {"dtype": "DTYPE_FLOAT64"}}],
        "nodes": [{"id": 1, "op": "sin", "operands": [7]}],
        "outputs": [{"name": "z", "id": 1}]}))
    line = fails(capsys, "grad", str(dangling), "--at", "x=1", code=1)
    assert "UndefinedReferenceError" in line and "nodes[id=1]" in line
    unknown_op = tmp_path / "unknown_op.json"
    unknown_op.write_text(json.dumps({
        "irVersion": 1, "opsetVersion": 1,
        "inputs": [{"id": 0, "name": "x", "type": {"dtype": "DTYPE_FLOAT64"}}],
        "nodes": [{"id": 1, "op": "frobnicate", "operands": [0]}],
        "outputs": [{"name": "z", "id": 1}]}))
    assert "UnknownOpError" in fails(capsys, "eval", str(unknown_op), "--at", "x=1")
    path = str(tmp_path / "g.json")
    ok(capsys, "export", "x*y", "-o", path)
    assert "has no input 'q'" in fails(capsys, "eval", path, "--at", "x=1", "--at", "y=1",
                                       "--at", "q=1")
    assert "no value for" in fails(capsys, "eval", path, "--at", "x=1")


def test_help_and_version(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "grad" in out and "serve" in out
    rc, out, _ = run(capsys, "grad", "--help")
    assert rc == 0 and "--at" in out and "--server" in out
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"adsvc {adsvc.__version__}"
    rc, _, err = run(capsys)
    assert rc == 2 and "COMMAND" in err


def test_serve_delegates_to_the_server_module(capsys):
    from adsvc.server.app import add_serve_arguments  # noqa: F401  (exists in this tree)

    rc, out, _ = run(capsys, "serve", "--help")
    assert rc == 0 and "--port" in out


def test_serve_reports_a_missing_server_module_in_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "adsvc.server.app", None)  # import now fails
    assert "the server is not available" in fails(capsys, "serve", "--port", "1", code=2)


# -- through a server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_address():
    from adsvc.server.app import create_server

    server, port = create_server("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_seed_example_through_a_server(capsys, server_address, mode):
    out = ok(capsys, "grad", *SEED, "--mode", mode, "--server", server_address,
             "--timeout", "30")
    assert out == "value: 23\ngradient: x = 10, y = 3\n"
    doc = json.loads(ok(capsys, "grad", *SEED, "--mode", mode, "--json",
                        "--server", server_address))
    assert doc == {"value": 23, "gradient": {"x": 10, "y": 3}}


def test_eval_show_and_errors_through_a_server(capsys, server_address, tmp_path):
    assert ok(capsys, "eval", "x*2", "--at", "x=[1,2]", "--server", server_address) == \
        "value: [2, 4]\n"
    assert "grad:y" in ok(capsys, "show", "x*y", "--mode", "reverse",
                          "--server", server_address)
    out = ok(capsys, "grad", "sum(x*x)", "--at", "x=[1,2,3]", "--show-ir",
             "--server", server_address)
    assert out.startswith("value: 14\ngradient: x = [2, 4, 6]\n\ngraph ")
    path = str(tmp_path / "g.pb")
    ok(capsys, "export", "x*x + x*y + 2", "-o", path)
    assert ok(capsys, "grad", path, *SEED[1:], "--server", server_address) == \
        "value: 23\ngradient: x = 10, y = 3\n"
    line = fails(capsys, "grad", "x*2", "--at", "x=[1,2]", "--server", server_address)
    assert "InvalidRequestError" in line


def test_unreachable_server_is_one_line(capsys):
    line = fails(capsys, "grad", *SEED, "--server", "127.0.0.1:1", "--timeout", "5", code=1)
    assert "Unavailable" in line or "connect" in line.lower()


# -- the real entry points ----------------------------------------------------------------
def _python_m(*argv):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("ADSVC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "adsvc", *argv], capture_output=True,
                          text=True, timeout=60, env=env)


def test_python_m_adsvc_seed_example():
    p = _python_m("grad", *SEED)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "value: 23\ngradient: x = 10, y = 3\n"
    p = _python_m("grad", *SEED, "--mode", "forward", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"value": 23, "gradient": {"x": 10, "y": 3}}


def test_python_m_adsvc_error_has_no_traceback():
    p = _python_m("grad", "__import__('os').system('echo pwned')", "--at", "x=1")
    assert p.returncode == 2
    assert p.stdout == ""
    assert "pwned" not in p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("adsvc: error: ")
