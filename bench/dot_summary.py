"""How long a picture of a 100k-node graph takes: the summary mode of `adsvc.ir.dot`.

    python bench/dot_summary.py [--nodes 100000] [--out DIR]

Builds a chain-and-ladder scalar graph of about --nodes nodes (and its reverse-mode
gradient graph), then times `to_dot` (structure + DOT text: a summary, as the graph is
over the node limit), the summary with node values (`adsvc.explain.picture` with
inputs), and Graphviz drawing the summary as SVG (if `dot` is installed). The issue's
promise: the summary of a 100k-node graph returns in under 5 s. Pictures go to --out
(default: a temporary directory), never into the repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import adsvc
from adsvc import graphfile
from adsvc.explain import picture
from adsvc.ir import dot


def big_graph(nodes: int) -> adsvc.Graph:
    """About `nodes` nodes: each step is a mul, an add and a sin of the previous steps."""
    def f(x, y):
        a, b = x, y
        for _ in range(nodes // 3):
            a, b = adsvc.sin(a * b) + a, a
        return a
    return adsvc.trace(f, name="ladder")


def timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"{label:<52} {time.perf_counter() - start:7.3f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="directory for the pictures")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="adsvc-dot-")
    os.makedirs(out, exist_ok=True)
    g = timed("trace the graph", lambda: big_graph(args.nodes))
    print(f"graph: {len(g.nodes):,} nodes")
    fresh = adsvc.Graph(g.inputs, g.outputs, g.name)  # nothing cached: nodes walked anew
    text = timed("to_dot (summary)", lambda: fresh.to_dot())
    assert dot.is_summary(g) and "summary:" in text
    timed("to_dot with values (evaluate, summary)",
          lambda: picture(g, inputs={"x": 0.5, "y": 0.25}))
    dg = timed("differentiate (reverse)", lambda: adsvc.differentiate(g, "reverse",
                                                                      seed=True))
    print(f"gradient graph: {len(dg.nodes):,} nodes")
    timed("to_dot of the gradient graph (summary)", lambda: dg.to_dot())
    if dot.have_graphviz():
        path = os.path.join(out, "ladder_summary.svg")
        timed("Graphviz: summary as SVG", lambda: g.render(path))
        print(f"wrote {path}")
    graph_file = os.path.join(out, "ladder.pb")
    graphfile.save(g, graph_file)
    picture_file = os.path.join(out, "ladder_cli" + (".svg" if dot.have_graphviz() else ".dot"))
    timed(f"adsvc dot ladder.pb -o {os.path.basename(picture_file)} (a new process)",
          lambda: subprocess.run([sys.executable, "-m", "adsvc", "dot", graph_file, "-o",
                                  picture_file], check=True, capture_output=True))


if __name__ == "__main__":
    main()
