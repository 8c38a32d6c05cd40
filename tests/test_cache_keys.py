"""Cache keys come from the nodes' structural digests: equal for the same graph (in any
process), different whenever anything that changes the compiled result differs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import adsvc
from adsvc.ir.node import constant, input_node, make

SEED = "import adsvc; g = adsvc.trace(lambda x, y: x * x + x * y + 2); print(g.key.hex())"


def seed_graph(name="seed"):
    return adsvc.trace(lambda x, y: x * x + x * y + 2, name=name)


def test_the_same_graph_has_the_same_key_here_and_in_another_process():
    assert seed_graph().key == seed_graph().key
    other = subprocess.run([sys.executable, "-c", SEED], capture_output=True, text=True,
                           check=True).stdout.strip()
    here = adsvc.trace(lambda x, y: x * x + x * y + 2).key.hex()
    assert other == here


def test_keys_differ_when_the_graph_differs():
    x = input_node("x", "float64", ())
    variants = {
        "base": make("add", (x, constant(1.0))),
        "label": make("add", (x, constant(1.0)), label="mine"),
        "negative zero": make("sub", (x, constant(-0.0))),
        "positive zero": make("sub", (x, constant(0.0))),
        "float32 constant": make("add", (make("cast", (x,), {"dtype": "float32"}),
                                         constant(np.float32(1.0)))),
        "sum keepdims": make("sum", (x,), {"keepdims": True}),
        "sum": make("sum", (x,), {"keepdims": False}),
    }
    keys = {k: adsvc.Graph([x], [("z", n)]).key for k, n in variants.items()}
    assert len(set(keys.values())) == len(keys), keys
    base = variants["base"]
    assert adsvc.Graph([x], [("z", base)]).key != adsvc.Graph([x], [("w", base)]).key
    assert adsvc.Graph([x], [("z", base)]).key != adsvc.Graph([x], [("z", base)], "g").key
    y = input_node("x", "float32", ())
    assert adsvc.Graph([y], [("z", y)]).key != adsvc.Graph([x], [("z", x)]).key
    two = [("a", base), ("b", x)]
    assert adsvc.Graph([x], two).key != adsvc.Graph([x], two[::-1]).key


def test_attribute_value_types_are_part_of_the_digest():
    x = input_node("v", "float64", (3,))
    ints = make("reshape", (x,), {"shape": (3, 1)})
    assert ints.digest != make("reshape", (x,), {"shape": (1, 3)}).digest
    assert make("sum", (ints,), {"axes": (1,), "keepdims": True}).digest != \
        make("sum", (ints,), {"axes": (1,), "keepdims": False}).digest


def test_server_handles_agree_across_servers():
    """A handle names the same compiled graph on every replica (no per-process state)."""
    from service_fixtures import channel, running_server, stub

    from adsvc_protocol.proto import service_pb2 as S

    request = S.DifferentiateRequest(graph=adsvc.to_proto(seed_graph()), omit_graph=True,
                                     differentiation=S.Differentiation(
                                         modes=[S.MODE_REVERSE], seed=True))
    handles = []
    for _ in range(2):
        with running_server() as (_, target), channel(target) as ch:
            handles.append(stub(ch).Differentiate(request, timeout=30).handle)
    assert handles[0] == handles[1] and len(handles[0]) == 64
