"""The Hessian as forward-over-reverse: a forward sweep over the gradient graph.

    f = x*x*y + sin(y)     at x = 1, y = 2

Reverse mode turns f into its gradient graph (outputs grad:x, grad:y); that graph is a
graph like any other, so forward mode differentiates it again: the sweep that seeds the
tangent of x with 1 gives the Hessian's x column (∂grad:x/∂x, ∂grad:y/∂x), the sweep for
y its y column. One reverse pass and n forward sweeps: the full Hessian of n inputs; one
forward sweep with any direction v gives the Hessian-vector product H·v, without
building H. This script prints the pass-2 account (`adsvc.explain` with modes
("reverse", "forward")), checks it against `c.hessian` and the analytic Hessian

    [[2y, 2x], [2x, -sin(y)]] = [[4, 2], [2, -0.909297]]

computes H·v for v = (1, -1) by one evaluation of the forward-over-reverse graph, and
draws that graph with every value: primal, cotangent (pass 1) and tangent (pass 2)
nodes in their own colours, the Hessian columns on the tangent2:grad outputs.

    python examples/hessian_forward_over_reverse.py [PICTURE_DIR]

Pictures go to PICTURE_DIR, else $ADSVC_PICTURES, else a new temporary directory; SVG
with Graphviz's `dot` installed, else DOT text (draw it with `dot -Tsvg`).
"""

import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import adsvc
from adsvc.ir.dot import have_graphviz

AT = {"x": 1.0, "y": 2.0}


def picture_dir() -> Path:
    """The first argument, else $ADSVC_PICTURES, else a new temporary directory."""
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ADSVC_PICTURES")
    path = Path(target) if target else Path(tempfile.mkdtemp(prefix="adsvc-pictures-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    g = adsvc.trace(lambda x, y: x * x * y + adsvc.sin(y), name="f")
    ex = adsvc.explain(g, ("reverse", "forward"), inputs=AT)
    print(ex.text())

    x, y = AT["x"], AT["y"]
    analytic = np.array([[2 * y, 2 * x], [2 * x, -math.sin(y)]])
    dg = ex.differentiated  # inputs x, y, tangent2:x, tangent2:y
    ids = {id(n): i for i, n in enumerate(dg.nodes)}
    rows = {r.id: r for r in ex.table()}
    from_account = np.array([[float(rows[ids[id(dg.output(f"grad:{a}"))]].derivative[b])
                              for b in "xy"] for a in "xy"])
    with adsvc.local() as c:
        h = c.hessian(g, inputs=AT)
        client = np.array([[float(h[a][b]) for b in "xy"] for a in "xy"])
        v = {"tangent2:x": 1.0, "tangent2:y": -1.0}
        out = c.evaluate(dg, {**AT, **v})  # one forward sweep of the gradient graph
    hv = np.array([float(out["tangent2:grad:x"]), float(out["tangent2:grad:y"])])
    print("Hessian (rows grad:x, grad:y; columns x, y):")
    for row in from_account:
        print("   " + "  ".join(f"{v:10.6g}" for v in row))
    print(f"H·v for v = (1, -1), one sweep: ({hv[0]:.6g}, {hv[1]:.6g})")
    assert np.allclose(from_account, analytic) and np.allclose(client, analytic)
    assert np.allclose(hv, analytic @ np.array([1.0, -1.0]))

    path = picture_dir() / ("hessian" + (".svg" if have_graphviz() else ".dot"))
    ex.render(path)
    print(f"picture: {path}")


if __name__ == "__main__":
    main()
