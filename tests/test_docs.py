"""The documentation that is generated from code stays in sync with it."""

from pathlib import Path

import adsvc
from adsvc.ops.doc import op_table_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_protos_readme_lists_the_op_table():
    text = (ROOT / "protos" / "README.md").read_text()
    start = text.index("-->\n", text.index("<!-- op table")) + 4
    end = text.index("\n<!-- end op table -->")
    assert text[start:end] == op_table_markdown(), \
        "protos/README.md is out of date: paste the output of `python -m adsvc.ops.doc`"


def test_hand_written_json_example_in_protos_readme_works():
    from google.protobuf import json_format

    from adsvc.ir.codec import graph_from_proto
    from adsvc_protocol.proto import ir_pb2

    text = (ROOT / "protos" / "README.md").read_text()
    block = text.split("```json\n", 1)[1].split("```", 1)[0]
    g = graph_from_proto(json_format.Parse(block, ir_pb2.Graph()))
    c = adsvc.local()
    assert c.evaluate(g, x=3.0, y=4.0) == {"z": 23.0}
    for mode in ("reverse", "forward"):
        assert c.grad(g, mode=mode, x=3.0, y=4.0) == {"x": 10.0, "y": 3.0}


def test_readme_python_example_runs_and_its_comments_are_true():
    import numpy as np

    text = (ROOT / "README.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # the README's own example
    c, g = scope["c"], scope["g"]
    assert c.evaluate(g, x=3.0, y=4.0) == {"out": 23.0}
    assert c.hessian(g, x=3.0, y=4.0) == {"x": {"x": 2, "y": 1}, "y": {"x": 1, "y": 0}}
    out, tan = c.jvp(g, {"x": 3.0, "y": 4.0}, {"x": 1.0})
    assert out == {"out": 23.0} and tan == {"out": 10.0}
    out, grads = c.vjp(g, {"x": 3.0, "y": 4.0}, {"out": 1.0})
    assert grads == {"x": 10.0, "y": 3.0}
    assert {k: {i: float(np.asarray(v)) for i, v in row.items()}
            for k, row in c.jacobian(g, x=3.0, y=4.0).items()} == {"out": {"x": 10.0, "y": 3.0}}


def test_readme_loop_example_runs_and_its_comments_are_true():
    import adsvc

    text = (ROOT / "README.md").read_text()
    block = text.split("## Loops and branches", 1)[1].split("```python\n", 1)[1].split("```")[0]
    scope = {"adsvc": adsvc, "c": adsvc.local()}
    exec(compile(block, "README.md", "exec"), scope)
    g = scope["g"]
    body = next(n for n in g.nodes if n.op == "scan").attr("body")
    assert (len(g.nodes), len(body.nodes)) == (7, 27)
    grad = scope["c"].value_and_grad(g, k=1.5, x0=0.3)[1]
    h = 1e-6  # the gradient of the 1000-step RK4 against central differences
    for name, at in (("k", {"k": 1.5, "x0": 0.3}), ("x0", {"k": 1.5, "x0": 0.3})):
        up, down = dict(at), dict(at)
        up[name] += h
        down[name] -= h
        fd = (scope["c"].evaluate(g, up)["out"] - scope["c"].evaluate(g, down)["out"]) / (2 * h)
        assert abs(grad[name] - fd) < 1e-6 * max(1.0, abs(fd))


def test_readme_server_example_runs_against_a_real_server(capsys):
    from service_fixtures import running_server

    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    block = next(b for b in blocks if "127.0.0.1:50051" in b)
    with running_server() as (_, target):
        exec(compile(block.replace("127.0.0.1:50051", target), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "(array(23.), {'x': array(10.), 'y': array(3.)})"


def test_readme_gradient_request_json_works_against_a_server():
    from google.protobuf import json_format
    from service_fixtures import channel, running_server, stub

    from adsvc_protocol.proto import service_pb2
    from adsvc_protocol.tensors import from_tensor

    text = (ROOT / "README.md").read_text()
    start = text.index("```json", text.index("<!-- gradient request json -->")) + 7
    request = json_format.Parse(text[start:text.index("```", start)],
                                service_pb2.GradientRequest())
    with running_server() as (_, target), channel(target) as ch:
        resp = stub(ch).Gradient(request, timeout=30)
    assert float(from_tensor(resp.value)) == 23.0
    assert {k: float(from_tensor(v)) for k, v in resp.gradients.items()} == {"x": 10.0,
                                                                              "y": 3.0}
