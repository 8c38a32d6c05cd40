"""Forward-mode differentiation, step by step: one sweep per input.

    z = x*x + x*y + 2      at x = 3, y = 4:   z = 23, ∂z/∂x = 2x + y = 10, ∂z/∂y = x = 3

A forward sweep carries, next to each node's value v, its tangent v̇ = ∂v/∂input from
the inputs (the leaves) to the output (the root). The sweep for x seeds ẋ = 1, ẏ = 0
and ends with ∂z/∂x; the sweep for y seeds ẋ = 0, ẏ = 1 and ends with ∂z/∂y: one sweep
per input. This script prints both sweeps node by node (`adsvc.explain`), checks them
against two Jacobian-vector products of the in-process client, and draws the forward
graph with every node's value and its tangent in each sweep.

    python examples/forward_sweeps.py [PICTURE_DIR]

Pictures go to PICTURE_DIR, else $ADSVC_PICTURES, else a new temporary directory; SVG
with Graphviz's `dot` installed, else DOT text (draw it with `dot -Tsvg`).
"""

import os
import sys
import tempfile
from pathlib import Path

import adsvc
from adsvc.ir.dot import have_graphviz


def picture_dir() -> Path:
    """The first argument, else $ADSVC_PICTURES, else a new temporary directory."""
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ADSVC_PICTURES")
    path = Path(target) if target else Path(tempfile.mkdtemp(prefix="adsvc-pictures-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    g = adsvc.trace(lambda x, y: x * x + x * y + 2, name="seed")
    ex = adsvc.explain(g, "forward", x=3.0, y=4.0)
    print(ex.text())

    # The same two sweeps as Jacobian-vector products: seed one input's tangent with 1.
    with adsvc.local() as c:
        _, along_x = c.jvp(g, {"x": 3.0, "y": 4.0}, {"x": 1.0, "y": 0.0})
        _, along_y = c.jvp(g, {"x": 3.0, "y": 4.0}, {"x": 0.0, "y": 1.0})
    dz_dx, dz_dy = float(along_x["out"]), float(along_y["out"])
    print(f"sweep seeded on x: ∂z/∂x = {dz_dx:g};  sweep seeded on y: ∂z/∂y = {dz_dy:g}")
    last = ex.table()[-1]
    assert (dz_dx, dz_dy) == (10.0, 3.0) == (float(last.derivative["x"]),
                                             float(last.derivative["y"]))

    path = picture_dir() / ("seed_forward" + (".svg" if have_graphviz() else ".dot"))
    ex.render(path)
    print(f"picture: {path}")


if __name__ == "__main__":
    main()
