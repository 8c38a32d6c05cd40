"""Pictures of graphs (adsvc.ir.dot, Graph.to_dot/render, `adsvc dot`): the structure,
the DOT text and the rendered SVG of the seed example in both modes, parsed (never
compared as bytes); styles by family; the summary of a 100k-node graph; no Graphviz.

Tests that draw with Graphviz's `dot` are skipped only where it is missing and CI is
not set: CI (.ci/run) installs Graphviz, so there they always run.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET

import pytest

import adsvc
from adsvc import graphfile
from adsvc.cli import main
from adsvc.ir import dot

SEED = ["x*x + x*y + 2", "--at", "x=3", "--at", "y=4"]
needs_graphviz = pytest.mark.skipif(
    not dot.have_graphviz() and not os.environ.get("CI"),
    reason="Graphviz's dot is not installed (CI installs it, so there this runs)")


def seed_graph():
    return adsvc.trace(lambda x, y: x * x + x * y + 2, name="seed")


# -- parsing what we draw ------------------------------------------------------------------
_STATEMENT = re.compile(r'^\s*(\w+)(?: -> (\w+))? \[(.*)\];$')
_ATTR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "l": "\n"}.get(m.group(1), m.group(1)),
                  text).rstrip("\n")


def parse_dot(text: str) -> tuple[dict[str, dict], list[tuple[str, str, dict]]]:
    """({node: attrs}, [(tail, head, attrs)]) of the node and edge statements of DOT
    text as `adsvc.ir.dot` writes it (one statement per line; quoted attributes)."""
    assert text.startswith("digraph ") and text.rstrip().endswith("}")
    nodes, edges = {}, []
    for line in text.splitlines():
        m = _STATEMENT.match(line)
        if not m:
            continue
        attrs = {k: _unescape(v) for k, v in _ATTR.findall(m.group(3))}
        if m.group(2):
            edges.append((m.group(1), m.group(2), attrs))
        else:
            nodes[m.group(1)] = attrs
    return nodes, edges


_SVG = "{http://www.w3.org/2000/svg}"


def parse_svg(data: bytes) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """({node name: its text lines}, [(tail, head)]) of an SVG drawn by Graphviz."""
    root = ET.fromstring(data)
    nodes, edges = {}, []
    for g in root.iter(f"{_SVG}g"):
        title = g.find(f"{_SVG}title")
        if title is None:
            continue
        texts = [t.text or "" for t in g.iter(f"{_SVG}text")]
        if g.get("class") == "node":
            nodes[title.text] = texts
        elif g.get("class") == "edge":
            tail, head = title.text.split("->")
            edges.append((tail, head))
    return nodes, edges


def drawn_nodes(nodes) -> list[str]:
    """The names of the drawn graph nodes ("n<i>"), without outputs, legend or notes."""
    return [n for n in nodes if re.fullmatch(r"n\d+", n)]


def labels(nodes: dict[str, dict]) -> dict[str, str]:
    return {k: a["label"] for k, a in nodes.items() if "label" in a}


# -- the structure -------------------------------------------------------------------------
def test_structure_of_the_seed_example():
    g = seed_graph()
    s = dot.structure(g)
    graph_nodes = {n: a for n, a in s.nodes(data=True) if n.startswith("n")}
    assert [a["op"] for _, a in sorted(graph_nodes.items(), key=lambda kv: kv[1]["id"])] == [
        "input", "input", "mul", "mul", "add", "constant", "add"]
    assert {a["family"] for a in graph_nodes.values()} == {"primal"}
    assert s.number_of_edges("n0", "n2") == 2  # x*x: x is used twice
    assert s.number_of_edges("n0", "n3") == 1 and s.number_of_edges("n1", "n3") == 1
    assert s.nodes["o0"]["role"] == "output" and s.nodes["o0"]["name"] == "out"
    assert list(s.predecessors("o0")) == ["n6"]
    assert s.graph["summary"] is None
    assert s.number_of_edges() == 2 + 1 + 1 + 2 + 2 + 1  # operands of 2..6, and the output


def test_families_of_differentiated_graphs():
    g = seed_graph()
    rev = adsvc.differentiate(g, "reverse", seed=True)
    fam = dot.families(rev)
    by_op = {i: fam[id(n)] for i, n in enumerate(rev.nodes)}
    assert all(by_op[i] == ("primal", 0) for i in range(7))
    assert by_op[7] == by_op[8] == ("cotangent", 1)  # grad:x = (y + x) + x
    fwd = adsvc.differentiate(g, "forward")
    fam = dot.families(fwd)
    assert fam[id(fwd.input("tangent:x"))] == ("tangent", 1)
    assert fam[id(fwd.output("tangent:out"))] == ("tangent", 1)
    assert fam[id(fwd.output("out"))] == ("primal", 0)
    hess = adsvc.differentiate(g, ("reverse", "forward"), seed=True)
    fam = dot.families(hess)
    assert fam[id(hess.input("tangent2:x"))] == ("tangent", 2)
    assert fam[id(hess.output("tangent2:grad:x"))] == ("tangent", 2)
    assert fam[id(hess.output("grad:x"))] == ("cotangent", 1)


# -- DOT text ------------------------------------------------------------------------------
def test_dot_of_the_seed_example_has_every_node_edge_and_output():
    g = seed_graph()
    nodes, edges = parse_dot(g.to_dot())
    text = labels(nodes)
    assert text["n0"] == "%0 x" and text["n1"] == "%1 y"
    assert text["n2"] == "%2 mul" and text["n4"] == "%4 add"
    assert text["n5"] == "%5 constant 2"
    assert text["o0"] == "out"
    pairs = [(a, b) for a, b, _ in edges]
    assert pairs.count(("n0", "n2")) == 2
    assert set(pairs) == {("n0", "n2"), ("n0", "n3"), ("n1", "n3"), ("n2", "n4"),
                          ("n3", "n4"), ("n4", "n6"), ("n5", "n6"), ("n6", "o0")}
    assert "legend" in g.to_dot() and "legend" not in g.to_dot(legend=False)


def test_dot_reverse_mode_with_values_shows_23_10_and_3():
    g = seed_graph()
    ex = adsvc.explain(g, "reverse", x=3.0, y=4.0)
    nodes, edges = parse_dot(ex.to_dot())
    text = labels(nodes)
    outputs = sorted(v for k, v in text.items() if k.startswith("o"))
    assert outputs == ["grad:x = 10", "grad:y = 3", "out = 23"]
    assert text["n6"] == "%6 add\n= 23" and text["n2"] == "%2 mul\n= 9"
    assert text["n7"] == "%7 add\n= 7" and text["n8"] == "%8 add\n= 10"
    # the cotangent nodes are styled apart from the primal ones
    fills = {k: nodes[k]["fillcolor"] for k in ("n2", "n6", "n7", "n8")}
    assert fills["n2"] == fills["n6"] != fills["n7"] == fills["n8"]
    # grad:y is x itself (d/dy of x*y); primal values reused by derivatives are dashed
    assert ("n0", "o2", ) in [(a, b) for a, b, _ in edges]
    dashed = {(a, b) for a, b, attrs in edges if attrs.get("style") == "dashed"}
    assert ("n1", "n7") in dashed and ("n0", "n8") in dashed


def test_dot_forward_mode_with_values_shows_one_sweep_per_input():
    g = seed_graph()
    nodes, _ = parse_dot(adsvc.explain(g, "forward", x=3.0, y=4.0).to_dot())
    text = labels(nodes)
    tangent_out = next(v for v in text.values() if v.startswith("tangent:out"))
    assert tangent_out == "tangent:out\n∂/∂x: 10\n∂/∂y: 3"
    assert any(v == "out = 23" for v in text.values())
    assert text["n2"] == "%2 tangent:x\n∂/∂x: 1\n∂/∂y: 0"
    assert text["n0"] == "%0 x\n= 3"


def test_dot_quotes_any_name():
    x = adsvc.ir.node.input_node('we"ird\\name\nwith\tcontrol', "float64", ())
    g = adsvc.Graph([x], [('out "1"', x * 2.0)])
    nodes, _ = parse_dot(g.to_dot())
    assert labels(nodes)["n0"] == '%0 we"ird\\name\nwith\\x09control'
    assert labels(nodes)["o0"] == 'out "1"'


def test_values_of_arrays_are_shortened():
    assert dot.format_value(23.0) == "23"
    assert dot.format_value(1 / 3) == "0.333333"
    assert dot.format_value(float("nan")) == "nan"
    assert dot.format_value(list(range(10))) == "[0, 1, 2, 3, 4, 5, …]"


def test_tensor_nodes_show_their_type():
    g = adsvc.trace(lambda a: adsvc.sum(a * a), a=adsvc.f64(3))
    text = labels(parse_dot(g.to_dot())[0])
    assert text["n0"] == "%0 a\nf64[3]"
    assert text["n2"].startswith("%2 sum")


# -- large graphs: the summary -------------------------------------------------------------
def ladder(steps: int) -> adsvc.Graph:
    def f(x, y):
        a, b = x, y
        for _ in range(steps):
            a, b = adsvc.sin(a * b) + a, a
        return a
    return adsvc.trace(f, name="ladder")


def test_summary_of_a_100k_node_graph():
    """bench/dot_summary.py measures how long this takes (well under 5 s)."""
    g = ladder(33_333)
    assert len(g.nodes) == 100_001
    assert dot.is_summary(g)
    s = dot.structure(g)
    summary = s.graph["summary"]
    assert summary["total"] == 100_001 and summary["shown"] == dot.DEFAULT_NEAREST
    assert dict(summary["ops"]) == {"mul": 33_333, "sin": 33_333, "add": 33_333, "input": 2}
    drawn = sorted(a["id"] for n, a in s.nodes(data=True) if n in drawn_nodes(s))
    assert drawn == list(range(100_001 - dot.DEFAULT_NEAREST, 100_001))  # nearest the output
    assert s.nodes["hidden"]["label"] == f"… {100_001 - dot.DEFAULT_NEAREST:,} more nodes"
    text = dot.to_dot(g)
    nodes, edges = parse_dot(text)
    note = nodes["note"]["label"]
    assert note.startswith("summary: 100,001 nodes, more than the limit of")
    assert "mul: 33,333" in note and "drawn: the 40 nodes nearest the outputs" in note
    assert len(drawn_nodes(nodes)) == dot.DEFAULT_NEAREST
    assert any(a == "hidden" for a, _, _ in edges)


def test_summary_limit_and_nearest_are_options():
    g = ladder(10)  # 32 nodes
    assert not dot.is_summary(g) and dot.structure(g).graph["summary"] is None
    s = dot.structure(g, limit=20, nearest=5)
    assert s.graph["summary"]["shown"] == 5
    assert len(dot.shown_nodes(g, limit=20, nearest=5)) == 5


# -- files, formats, Graphviz ----------------------------------------------------------------
def test_render_dot_needs_no_graphviz(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on it
    assert not dot.have_graphviz()
    path = seed_graph().render(tmp_path / "seed.dot")
    nodes, _ = parse_dot(path.read_text())
    assert "n6" in nodes
    with pytest.raises(dot.GraphvizNotFoundError) as e:
        seed_graph().render(tmp_path / "seed.svg")
    assert "apt-get install graphviz" in e.value.summary()
    assert not (tmp_path / "seed.svg").exists()
    assert seed_graph()._repr_svg_() is None


def test_unknown_picture_format():
    with pytest.raises(adsvc.errors.UsageError, match="use .svg, .png, .pdf or .dot"):
        dot.picture_format("seed.jpg")


@needs_graphviz
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_svg_of_the_seed_example(mode, tmp_path):
    ex = adsvc.explain(seed_graph(), mode, x=3.0, y=4.0)
    path = ex.render(tmp_path / "seed.svg")
    nodes, edges = parse_svg(path.read_bytes())
    dg = ex.differentiated
    assert {f"n{i}" for i in range(len(dg.nodes))} <= set(nodes)
    assert sum(len(n.inputs) for n in dg.nodes) + len(dg.outputs) == len(edges)
    assert ("n0", "n4" if mode == "forward" else "n2") in edges
    texts = {k: " | ".join(v) for k, v in nodes.items()}
    outputs = sorted(v for k, v in texts.items() if k.startswith("o"))
    if mode == "reverse":
        assert outputs == ["grad:x = 10", "grad:y = 3", "out = 23"]
    else:
        assert outputs == ["out = 23", "tangent:out | ∂/∂x: 10 | ∂/∂y: 3"]
    assert "legend" in texts["legend"]


@needs_graphviz
def test_png_and_pdf(tmp_path):
    g = seed_graph()
    assert g.render(tmp_path / "seed.png").read_bytes().startswith(b"\x89PNG")
    assert g.render(tmp_path / "seed.pdf").read_bytes().startswith(b"%PDF")
    svg = g._repr_svg_()
    assert "<svg" in svg and "%6 add" in svg


@needs_graphviz
def test_svg_of_any_name_is_valid(tmp_path):
    x = adsvc.ir.node.input_node('a"b\\c <&> d', "float64", ())
    g = adsvc.Graph([x], [("out", x * 2.0)])
    nodes, _ = parse_svg(g.render(tmp_path / "odd.svg").read_bytes())
    assert nodes["n0"] == ['%0 a"b\\c <&> d']


# -- adsvc dot -------------------------------------------------------------------------------
def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_cli_dot_with_values(capsys, tmp_path, mode):
    path = tmp_path / "seed.dot"
    rc, out, err = run(capsys, "dot", *SEED, "--mode", mode, "-o", str(path))
    assert rc == 0, err
    assert out.startswith(f"wrote {path} (dot: ") and "with values" in out
    text = labels(parse_dot(path.read_text())[0])
    outputs = sorted(v for k, v in text.items() if k.startswith("o"))
    if mode == "reverse":
        assert outputs == ["grad:x = 10", "grad:y = 3", "z = 23"]
    else:
        assert outputs == ["tangent:z\n∂/∂x: 10\n∂/∂y: 3", "z = 23"]


def test_cli_dot_plain_wrt_order_and_file(capsys, tmp_path):
    path = tmp_path / "g.dot"
    assert run(capsys, "dot", "x*x + x*y + 2", "-o", str(path))[0] == 0
    assert len(drawn_nodes(parse_dot(path.read_text())[0])) == 7
    assert run(capsys, "dot", *SEED, "--mode", "forward", "--wrt", "x", "-o", str(path))[0] == 0
    outputs = [v for k, v in labels(parse_dot(path.read_text())[0]).items()
               if k.startswith("o")]
    assert sorted(outputs) == ["tangent:z\n∂/∂x: 10", "z = 23"]
    assert run(capsys, "dot", *SEED, "--mode", "reverse,forward", "-o", str(path))[0] == 0
    text = labels(parse_dot(path.read_text())[0])
    assert "tangent2:grad:x\n∂/∂x: 2\n∂/∂y: 1" in text.values()
    file = tmp_path / "seed.json"
    graphfile.save(seed_graph(), str(file))
    rc, out, err = run(capsys, "dot", str(file), "--limit", "3", "--nearest", "2", "-o",
                       str(path))
    assert rc == 0, err
    assert "a summary of the 2 nodes nearest the outputs" in out


def test_cli_dot_errors_are_one_line(capsys, tmp_path, monkeypatch):
    rc, out, err = run(capsys, "dot", "x*x", "-o", str(tmp_path / "x.jpg"))
    assert rc == 2 and err.strip().count("\n") == 0 and "use .svg, .png, .pdf or .dot" in err
    rc, out, err = run(capsys, "dot", "x*x", "--wrt", "x", "-o", str(tmp_path / "x.dot"))
    assert rc == 2 and "--wrt needs --mode" in err
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, out, err = run(capsys, "dot", "x*x", "-o", str(tmp_path / "x.svg"))
    assert rc == 1 and out == ""
    assert err.strip().count("\n") == 0 and "apt-get install graphviz" in err
    assert run(capsys, "dot", "x*x", "-o", str(tmp_path / "x.dot"))[0] == 0


@needs_graphviz
def test_cli_dot_svg(capsys, tmp_path):
    path = tmp_path / "seed.svg"
    rc, out, err = run(capsys, "dot", *SEED, "--mode", "reverse", "-o", str(path))
    assert rc == 0, err
    nodes, _ = parse_svg(path.read_bytes())
    texts = sorted(" ".join(v) for k, v in nodes.items() if k.startswith("o"))
    assert texts == ["grad:x = 10", "grad:y = 3", "z = 23"]
